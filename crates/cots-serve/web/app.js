// The COTS search page: text and image queries against the JSON API of the
// same server. No framework and no build step; every request goes through
// `api()`, which adds the access token when the server asks for one.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "cots-token";

const state = {
  info: null,
  lastQuery: null, // {kind: "text", text} or {kind: "image", blob, name}
  blobUrls: [], // object URLs of the current results, revoked on the next search
  thumbs: new Map(), // id -> thumbnail Blob of the current results ("Find similar" sends it)
  hits: [],
  seq: 0, // only the newest search may draw its results
};

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const t = token();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401) {
    showTokenForm();
    throw new Error("This server needs an access token. Enter it in the form below and search again.");
  }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try {
      const body = await resp.json();
      if (body && body.error) message = body.error;
    } catch (_) {
      // Not JSON: keep the status line.
    }
    const err = new Error(message);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

// ---- messages ---------------------------------------------------------------

function showError(message) {
  const box = $("error");
  box.textContent = "";
  const strong = document.createElement("strong");
  strong.textContent = "Sorry, that did not work. ";
  box.append(strong, document.createTextNode(politely(message)));
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// Server messages are precise; give the common ones a friendlier front.
function politely(message) {
  if (/Failed to fetch|NetworkError|Load failed/i.test(message)) {
    return "The server could not be reached. Is `cots serve` still running?";
  }
  if (/busy/i.test(message)) return "The server is busy right now; please try again in a moment.";
  return message.endsWith(".") ? message : `${message}.`;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showTokenForm() {
  $("token-form").hidden = false;
  $("token").focus();
}

// ---- start-up ---------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await (await api("/api/info")).json();
    state.info = info;
    const run = String(info.encoder.run).split("/").filter(Boolean).pop() || info.encoder.run;
    $("index-info").textContent =
      `${info.items.toLocaleString()} items · ${info.dim}-d · model ${run}`;
    $("index-info").title = `weights ${info.encoder.weights_hash}`;
    const approx = $("approximate");
    approx.disabled = !info.approximate;
    if (!info.approximate) {
      $("approx-label").title = "This index has no approximate-search graph.";
      $("approx-label").classList.add("disabled");
    }
    buildFilters(info.filters || {});
    buildExamples(info.examples || []);
    $("q").maxLength = info.limits.max_query_chars;
  } catch (e) {
    $("index-info").textContent = "Not connected";
    showError(e.message);
  }
}

function buildFilters(filters) {
  const box = $("filters");
  box.textContent = "";
  for (const [key, values] of Object.entries(filters)) {
    if (!values.length) continue;
    const label = document.createElement("label");
    label.textContent = key;
    const select = document.createElement("select");
    select.dataset.key = key;
    const any = new Option("any", "");
    select.append(any, ...values.map((v) => new Option(v, v)));
    label.append(select);
    box.append(label);
  }
}

function buildExamples(examples) {
  const box = $("examples");
  box.textContent = "";
  if (!examples.length) return;
  const lead = document.createElement("span");
  lead.textContent = "Try:";
  box.append(lead);
  for (const text of examples) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = text;
    b.addEventListener("click", () => {
      $("q").value = text;
      searchText();
    });
    box.append(b);
  }
}

// ---- searching --------------------------------------------------------------

function options() {
  const filter = {};
  for (const s of $("filters").querySelectorAll("select")) {
    if (s.value) filter[s.dataset.key] = s.value;
  }
  return {
    k: Number($("k").value),
    approximate: $("approximate").checked,
    filter,
  };
}

async function searchText() {
  const text = $("q").value.trim();
  if (!text) {
    showError("Type a few words to search for");
    $("q").focus();
    return;
  }
  clearQueryImage();
  state.lastQuery = { kind: "text", text };
  syncUrl(text);
  const o = options();
  const body = JSON.stringify({ text, k: o.k, filter: o.filter, approximate: o.approximate });
  await run(`“${text}”`, () =>
    api("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body,
    }),
  );
}

async function searchImage(blob, name) {
  if (!blob.type.startsWith("image/") && blob.type !== "") {
    showError(`${name} is not an image`);
    return;
  }
  state.lastQuery = { kind: "image", blob, name };
  showQueryImage(blob, name);
  const o = options();
  await run(name, () => {
    const form = new FormData();
    form.append("image", blob, name);
    form.append("k", String(o.k));
    if (Object.keys(o.filter).length) form.append("filter", JSON.stringify(o.filter));
    if (o.approximate) form.append("approximate", "true");
    return api("/api/search/image", { method: "POST", body: form });
  });
}

async function run(label, send) {
  const seq = ++state.seq;
  clearError();
  setStatus("Searching…");
  document.body.classList.add("busy");
  const t0 = performance.now();
  try {
    const result = await (await send()).json();
    if (seq !== state.seq) return;
    const roundTrip = performance.now() - t0;
    render(result.hits);
    const n = result.hits.length;
    setStatus(
      `${n} result${n === 1 ? "" : "s"} for ${label} in ${fmtMs(roundTrip)} ` +
        `(server ${fmtMs(result.took_ms)}: encode ${fmtMs(result.encode_ms)}, search ${fmtMs(result.search_ms)})`,
    );
  } catch (e) {
    if (seq !== state.seq) return;
    setStatus("");
    showError(e.message);
  } finally {
    if (seq === state.seq) document.body.classList.remove("busy");
  }
}

function fmtMs(ms) {
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

// ---- results ----------------------------------------------------------------

function render(hits) {
  for (const u of state.blobUrls) URL.revokeObjectURL(u);
  state.blobUrls = [];
  state.thumbs.clear();
  state.hits = hits;
  $("intro").hidden = true;
  const grid = $("grid");
  grid.textContent = "";
  if (!hits.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "Nothing matched. Try other words, or fewer filters.";
    grid.append(li);
    return;
  }
  const best = hits[0].score;
  hits.forEach((hit, i) => grid.append(card(hit, i, best)));
}

function card(hit, rank, best) {
  const li = document.createElement("li");
  li.className = "card";
  const a = document.createElement("a");
  a.href = `#item=${encodeURIComponent(hit.id)}`;
  a.className = "card-link";
  a.dataset.id = hit.id;
  const caption = hit.captions[0] || hit.id;
  a.setAttribute("aria-label", `Result ${rank + 1}: ${caption}, score ${hit.score.toFixed(3)}`);

  const figure = document.createElement("div");
  figure.className = "thumb";
  if (hit.kind === "text") {
    figure.classList.add("text-item");
    figure.textContent = caption;
  } else {
    const img = document.createElement("img");
    img.alt = caption;
    img.decoding = "async";
    figure.append(img);
    loadImage(hit, img, figure);
  }
  const badge = document.createElement("span");
  badge.className = "rank";
  badge.textContent = String(rank + 1);
  figure.append(badge);

  const body = document.createElement("div");
  body.className = "card-body";
  const score = document.createElement("div");
  score.className = "score";
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.setProperty("--w", `${Math.max(0, Math.min(1, (hit.score + 1) / 2)) * 100}%`);
  const num = document.createElement("span");
  num.className = "num";
  num.textContent = hit.score.toFixed(3);
  score.append(bar, num);
  const cap = document.createElement("p");
  cap.className = "caption";
  cap.textContent = caption;
  const id = document.createElement("p");
  id.className = "id";
  id.textContent = hit.id;
  body.append(score, cap);
  if (hit.captions.length > 1) {
    const more = document.createElement("p");
    more.className = "more";
    more.textContent = `+${hit.captions.length - 1} more caption${hit.captions.length > 2 ? "s" : ""}`;
    body.append(more);
  }
  body.append(id);
  const meta = Object.entries(hit.metadata).slice(0, 3);
  if (meta.length) {
    const chips = document.createElement("div");
    chips.className = "chips";
    for (const [k, v] of meta) {
      const c = document.createElement("span");
      c.className = "tag";
      c.textContent = `${k}: ${v}`;
      chips.append(c);
    }
    body.append(chips);
  }
  a.append(figure, body);
  a.addEventListener("click", (ev) => {
    ev.preventDefault();
    openDetail(hit, rank);
  });
  li.append(a);
  return li;
}

// Images are fetched (not linked) so that the token travels with them.
async function loadImage(hit, img, figure) {
  try {
    const blob = await (await api(hit.thumbnail)).blob();
    state.thumbs.set(hit.id, blob);
    const u = URL.createObjectURL(blob);
    state.blobUrls.push(u);
    img.src = u;
  } catch (_) {
    figure.classList.add("missing");
    img.remove();
    const p = document.createElement("span");
    p.className = "no-thumb";
    p.textContent = "no preview";
    figure.prepend(p);
  }
}

// ---- details ----------------------------------------------------------------

function openDetail(hit, rank) {
  const d = $("detail");
  $("detail-title").textContent = hit.id;
  $("detail-score").textContent = `Rank ${rank + 1} · score ${hit.score.toFixed(4)} · ${hit.kind}`;
  const img = $("detail-image");
  img.removeAttribute("src");
  img.alt = hit.captions[0] || hit.id;
  const thumbImg = document.querySelector(`.card-link[data-id="${CSS.escape(hit.id)}"] img`);
  if (thumbImg && thumbImg.src) img.src = thumbImg.src;
  img.hidden = hit.kind === "text";
  const caps = $("detail-captions");
  caps.textContent = "";
  for (const c of hit.captions) {
    const li = document.createElement("li");
    li.textContent = c;
    caps.append(li);
  }
  const meta = $("detail-meta");
  meta.textContent = "";
  for (const [k, v] of Object.entries(hit.metadata)) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    meta.append(dt, dd);
  }
  const similar = $("detail-similar");
  const blob = state.thumbs.get(hit.id);
  similar.hidden = hit.kind === "text" || !blob;
  similar.onclick = () => {
    d.close();
    searchImage(blob, `${hit.id} (similar)`);
  };
  const orig = $("detail-original");
  orig.hidden = !hit.original;
  if (hit.original) {
    if (token()) {
      // A link cannot carry the token: fetch the file and link to it.
      orig.removeAttribute("href");
      api(hit.original)
        .then((r) => r.blob())
        .then((b) => {
          const u = URL.createObjectURL(b);
          state.blobUrls.push(u);
          orig.href = u;
        })
        .catch(() => (orig.hidden = true));
    } else {
      orig.href = hit.original;
    }
  }
  d.showModal();
}

// ---- the query image --------------------------------------------------------

function showQueryImage(blob, name) {
  const box = $("query-image");
  const u = URL.createObjectURL(blob);
  const img = $("query-image-preview");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = u;
  img.src = u;
  $("query-image-name").textContent = `Searching with ${name}`;
  box.hidden = false;
}

function clearQueryImage() {
  const img = $("query-image-preview");
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  delete img.dataset.url;
  img.removeAttribute("src");
  $("query-image").hidden = true;
}

// ---- the address bar -------------------------------------------------------

// The page's address carries the text query (`/?q=red+circle`), so a search
// can be bookmarked or sent to someone. replaceState, not pushState: each
// keystroke would otherwise be a step of the Back button.
function syncUrl(text) {
  const url = new URL(window.location.href);
  if (text) url.searchParams.set("q", text);
  else url.searchParams.delete("q");
  if (url.href !== window.location.href) history.replaceState(null, "", url);
}

// A query in the address runs once the page knows the index (its filters
// and limits come from /api/info).
function searchFromUrl() {
  const text = (new URLSearchParams(window.location.search).get("q") || "").trim();
  if (!text) return;
  $("q").value = text;
  searchText();
}

// ---- wiring -----------------------------------------------------------------

function wire() {
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    searchText();
  });
  $("q").addEventListener("input", () => syncUrl($("q").value.trim()));
  $("image-button").addEventListener("click", () => $("image-input").click());
  $("image-input").addEventListener("change", () => {
    const f = $("image-input").files[0];
    if (f) searchImage(f, f.name);
    $("image-input").value = "";
  });
  $("query-image-clear").addEventListener("click", () => {
    clearQueryImage();
    $("q").focus();
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token-form").hidden = true;
    clearError();
    loadInfo();
    $("q").focus();
  });
  for (const id of ["k", "approximate"]) {
    $(id).addEventListener("change", rerun);
  }
  $("filters").addEventListener("change", rerun);

  // `/` focuses the search box from anywhere but a text field.
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    const typing = t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement ||
      t instanceof HTMLSelectElement || (t && t.isContentEditable);
    if (ev.key === "/" && !typing && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      ev.preventDefault();
      $("q").focus();
      $("q").select();
    }
  });

  // Drop an image anywhere.
  let depth = 0;
  const overlay = $("drop-overlay");
  const hasFiles = (ev) => ev.dataTransfer && Array.from(ev.dataTransfer.types).includes("Files");
  document.addEventListener("dragenter", (ev) => {
    if (!hasFiles(ev)) return;
    depth++;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (ev) => {
    if (hasFiles(ev)) ev.preventDefault();
  });
  document.addEventListener("drop", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const f = ev.dataTransfer.files[0];
    if (f) searchImage(f, f.name);
  });
  // Pasting an image searches with it too.
  document.addEventListener("paste", (ev) => {
    const f = Array.from(ev.clipboardData?.files || []).find((x) => x.type.startsWith("image/"));
    if (f) {
      ev.preventDefault();
      searchImage(f, f.name || "pasted image");
    }
  });
}

function rerun() {
  const q = state.lastQuery;
  if (!q) return;
  if (q.kind === "text") searchText();
  else searchImage(q.blob, q.name);
}

wire();
loadInfo().then(searchFromUrl);
