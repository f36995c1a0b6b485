-- wrk script for benches/serve/load.sh: POST /api/search with text
-- queries taken in turn from a fixed list (each wrk thread walks it from a
-- different start).
local queries = {
  "a large red circle left of a small blue square",
  "small green triangle",
  "a blue cross above a yellow diamond",
  "red",
  "large purple square left of a small orange circle",
  "diamond",
  "a small yellow cross",
  "green circle above red triangle",
  "blue square",
  "a large white square above a small green cross",
  "cross",
  "an orange diamond left of a green square",
  "two circles",
  "a small red triangle above a large blue circle",
  "yellow",
  "a purple diamond",
}
local i = math.random(#queries)
local headers = { ["Content-Type"] = "application/json" }

request = function()
  i = i % #queries + 1
  return wrk.format("POST", "/api/search", headers,
    '{"text":"' .. queries[i] .. '","k":10}')
end
