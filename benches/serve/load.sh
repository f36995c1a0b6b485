#!/usr/bin/env bash
# Load test of `cots serve` over loopback: text queries per second and
# latency percentiles at a fixed concurrency, with and without dynamic
# batching, and the server's resident memory sampled every 5 s.
#
#   benches/serve/load.sh [RUN] [SECONDS] [CONNECTIONS] [MODES]
#
# RUN defaults to runs/demo (the small model), SECONDS to 60, CONNECTIONS to
# 16, MODES to "batching no-batching". The index is ITEMS (default 100,000)
# random unit vectors stamped with RUN's weights hash (built once, by
# benches/src/bin/random_index.rs, under target/serve-load/): the query
# path measured is the real one, the text encoder plus an exact search over
# every row. Needs wrk (apt-get install wrk) and curl. wrk runs on the same
# machine with 2 threads, so on a small machine it takes CPU from the server.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=${1:-runs/demo}
seconds=${2:-60}
conns=${3:-16}
modes=${4:-batching no-batching}
items=${ITEMS:-100000}
port=${PORT:-18080}
out=target/serve-load
idx=$out/index-$items
bin=target/release/cots
mkdir -p "$out"

command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)"; exit 1; }
cargo build --release -q -p cots -p cots-benches --bin cots --bin random_index
if [ ! -f "$idx/index.json" ]; then
  target/release/random_index --run "$run" --out "$idx" --items "$items"
fi

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in $modes; do
  flags=()
  [ "$mode" = no-batching ] && flags=(--no-batching)
  RUST_LOG=warn "$bin" --device cpu serve --index "$idx" --run "$run" \
    --addr "127.0.0.1:$port" "${flags[@]}" 2>"$out/server-$mode.log" &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$out/server-$mode.log"; exit 1; }
    sleep 0.2
  done
  rss="$out/rss-$mode.txt"
  (
    t0=$(date +%s)
    while kill -0 "$pid" 2>/dev/null; do
      echo "$(( $(date +%s) - t0 )) $(awk '/VmRSS/{print $2}' /proc/"$pid"/status 2>/dev/null)"
      sleep 5
    done
  ) >"$rss" &
  sampler=$!
  echo
  echo "== $mode: $conns connections, ${seconds} s, $items items =="
  # The server's CPU time (user + system, clock ticks) around the run: CPU
  # per query is less sensitive than wall time to other jobs on the machine.
  cpu0=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
  wrk -t2 -c"$conns" -d"${seconds}s" --latency -s benches/serve/search.lua \
    "http://127.0.0.1:$port/" | tee "$out/wrk-$mode.txt"
  cpu1=$(awk '{print $14 + $15}' /proc/"$pid"/stat)
  n=$(awk '/requests in/ {print $1}' "$out/wrk-$mode.txt")
  awk -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" -v n="$n" \
    'BEGIN { printf "server CPU: %.1f s for %d requests = %.2f ms per query\n", t / hz, n, 1000 * t / hz / n }'
  curl -sf "http://127.0.0.1:$port/metrics" >"$out/metrics-$mode.txt" || true
  kill -TERM "$pid"
  wait "$pid" || true
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  awk 'NF == 2 { if (!first) first = $2; last = $2; if ($2 > max) max = $2; n++ }
       END { printf "RSS (KiB): %d samples, first %d, last %d, max %d\n", n, first, last, max }' "$rss"
  grep -E '^cots_text_encoder_batch_size_(sum|count)' "$out/metrics-$mode.txt" || true
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
