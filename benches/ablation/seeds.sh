#!/usr/bin/env bash
# The instance-level ablation over seeds: rows x seeds, then a Markdown table
# of mean +- sd (sample standard deviation, n - 1) of RSUM and R@1 both ways.
# Same model (configs/demo.toml), data, steps, lr, schedule and batch in every
# row; only the objectives differ. The seed goes into `train.seed`, which
# seeds the initial weights, dropout, the masks AND the loader's data order;
# the synthetic dataset's own seed (`data.synthetic.seed`) is left alone, so
# every run is tested on the same 300 test scenes.
#   bash benches/ablation/seeds.sh [steps]
# Environment:
#   ROWS="clip itc_queue"  only these rows (default: all rows below, in order)
#   SEEDS="0 1 2"          seeds (default 0 1 2)
#   OUT=DIR                where runs go (default runs/ablation-seeds);
#                          finished runs (with eval.json) are kept, not rerun
#   CONFIG=FILE            base config (default configs/demo.toml); its
#                          [objectives] are replaced
#   COTS=BIN               the cots binary (default: build target/release/cots)
#   TABLE_ONLY=1           only (re)write the table from the finished runs
#   QUEUE=N                queue slots of the queue rows (default 4096)
#   SMALL_QUEUE=N          slots of the `itc_online_small_queue` row (default 1024)
#   START=N                queue start step of the `*_late*` rows (default steps / 2)
#   TEMP_MIN=T             temperature floor of the `*_floor*` rows (default 0.03)
#   KL_OPTS='weight = 0.1' extra lines of every KL objective (default none)
#   DVAE=DIR               the visual tokenizer of the MVM rows (no default)
# The fast screen on the tiny preset (seconds per run):
#   CONFIG=benches/ablation/tiny.toml QUEUE=128 SMALL_QUEUE=32 \
#   OUT=runs/ablation-tiny bash benches/ablation/seeds.sh 150
# Writes <out>/<row>/seed<s>/eval.json and <out>/table.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-300}
config=${CONFIG:-configs/demo.toml}
out=${OUT:-runs/ablation-seeds}
seeds=${SEEDS:-0 1 2}
if [ -z "${COTS:-}" ]; then
  cargo build --release -q -p cots
  cots=target/release/cots
else
  cots=$COTS
fi
mkdir -p "$out"
base=$(sed '/^\[objectives/,$d' "$config")

qsize=${QUEUE:-4096}
small=${SMALL_QUEUE:-1024}
start=${START:-$((steps / 2))}
tmin=${TEMP_MIN:-0.03}
late="[objectives.queue]
size = $qsize
start_step = $start
[objectives.amf]
enabled = false"
queue="[objectives.queue]
size = $qsize
[objectives.amf]
enabled = false"
kl="[[objectives.objectives]]
kind = \"kl\"
${KL_OPTS:-}"
# ITC with the batch's own momentum keys as negatives too (ALBEF), the
# instance objective of every `*_late*` row.
itc_ib="[[objectives.objectives]]
kind = \"itc\"
in_batch_negatives = true"
# name | description | objectives TOML
declare -a names descs
declare -A toml
add() { names+=("$1"); descs+=("$2"); toml[$1]=$3; }
add clip "CLIP in-batch" '[objectives.amf]
enabled = false
[[objectives.objectives]]
kind = "clip"'
add itc_queue "ITC, momentum keys + $qsize queue (the old default)" "$queue
[[objectives.objectives]]
kind = \"itc\""
add itc_momentum_batch "ITC, momentum keys in-batch, no queue (MoCo v3)" "$queue
[[objectives.objectives]]
kind = \"itc\"
in_batch_negatives = true
queue_negatives = false"
add itc_online "ITC, online keys in-batch + $qsize momentum queue" "$queue
[[objectives.objectives]]
kind = \"itc\"
keys = \"online\""
add itc_online_small_queue "ITC, online keys + $small queue" "[objectives.queue]
size = $small
[objectives.amf]
enabled = false
[[objectives.objectives]]
kind = \"itc\"
keys = \"online\""
# Momentum 0.999 instead of the config's: slower drift of the queue's keys.
add itc_online_m999 "ITC, online keys + $qsize queue, momentum 0.999" "$queue
[[objectives.objectives]]
kind = \"itc\"
keys = \"online\""
add itc_online_kl "ITC online keys + queue, + KL" "$queue
[[objectives.objectives]]
kind = \"itc\"
keys = \"online\"
$kl"
add itc_momentum_batch_kl "ITC momentum keys in-batch (no queue), + KL over the queue" "$queue
[[objectives.objectives]]
kind = \"itc\"
in_batch_negatives = true
queue_negatives = false
$kl"
add itc_queue_kl "ITC momentum keys + queue, + KL (the old demo)" "$queue
[[objectives.objectives]]
kind = \"itc\"
$kl"

# Rows whose name contains `_floor` train with the temperature floored at
# $tmin (`model.two_stream.temp_min`); the others keep the default floor.
add clip_floor "CLIP in-batch, temperature >= $tmin" '[objectives.amf]
enabled = false
[[objectives.objectives]]
kind = "clip"'
add itc_queue_floor "ITC, momentum keys + $qsize queue, temperature >= $tmin" "$queue
[[objectives.objectives]]
kind = \"itc\""
add itc_late "ITC, momentum keys in-batch, + $qsize queue from step $start" "$late
$itc_ib"
add itc_late_kl "ITC, momentum keys in-batch, + queue from step $start, + KL" "$late
$itc_ib
$kl"
add itc_late_floor "ITC, momentum keys in-batch, + queue from step $start, temperature >= $tmin" "$late
$itc_ib"
add itc_late_floor_kl "ITC in-batch + queue from step $start, + KL, temperature >= $tmin" "$late
$itc_ib
$kl"

# The token level on top of ITC + queue from mid-run + KL (temperature
# floor): masked language modeling only, masked vision modeling only (the
# visual tokenizer at $DVAE), both. The MVM rows need DVAE=<dir of
# dvae.json + dvae.safetensors> (`cots train-tokenizer --out DIR`).
mvlm() { printf '%s\n%s\n[[objectives.objectives]]\nkind = "mvlm"\nmlm = %s\nmvm = %s' "$late" "$itc_ib
$kl" "$1" "$2"; }
add itc_late_floor_kl_mlm "ITC in-batch + queue from step $start, + KL, + MLM, temperature >= $tmin" "$(mvlm true false)"
add itc_late_floor_kl_mvm "ITC in-batch + queue from step $start, + KL, + MVM, temperature >= $tmin" "$(mvlm false true)"
add itc_late_floor_kl_mvlm "ITC in-batch + queue from step $start, + KL, + MLM + MVM, temperature >= $tmin" "$(mvlm true true)"

# Under noise: rows whose name ends in `_noisy` train on data where 20 % of
# the training images carry another image's captions (`data.noisy_pairs`),
# logging every 5th step (the filter's precision and recall, pooled over
# the last 100 steps, go into <out>/amf.md). The test split stays clean.
add clip_noisy "CLIP in-batch, 20 % noisy pairs" '[objectives.amf]
enabled = false
[[objectives.objectives]]
kind = "clip"'
add itc_late_floor_kl_noisy "ITC in-batch + queue from step $start, + KL, temperature >= $tmin, 20 % noisy pairs" "$late
$itc_ib
$kl"
add itc_late_floor_kl_amf_noisy "the same + AMF (rank rule, quantile 0.5), 20 % noisy pairs" "$(printf '%s\n' "$late" | sed 's#^enabled = false#enabled = true\nquantile = 0.5#')
$itc_ib
$kl"
# The rank rule's `quantile` trades recall for precision: a wrong caption's
# rank is about uniform, so a quantile q drops about q of them.
add itc_late_floor_kl_amf_q07_noisy "the same + AMF (rank rule, quantile 0.7, the default), 20 % noisy pairs" "$(printf '%s\n' "$late" | sed 's#^enabled = false#enabled = true\nquantile = 0.7#')
$itc_ib
$kl"

selected() { [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" $1 "* ]]; }

if [ -z "${TABLE_ONLY:-}" ]; then
  for seed in $seeds; do
    for name in "${names[@]}"; do
      selected "$name" || continue
      dir="$out/$name/seed$seed"
      [ -f "$dir/eval.json" ] && continue
      mkdir -p "$out/$name"
      cfg="$out/$name/seed$seed.toml"
      printf '%s\n%s\n' "$base" "${toml[$name]}" \
        | sed "s#^out = .*#out = \"$dir\"#; s#^steps = .*#steps = $steps#; s#^\[train\]\$#[train]\nseed = $seed#" > "$cfg"
      if [[ "$name" == *_m999 ]]; then sed -i "s#^momentum = .*#momentum = 0.999#" "$cfg"; fi
      if [[ "$name" == *_floor* ]]; then
        grep -q '^temp_init = ' "$cfg" || { echo "$name needs a temp_init line in [model.two_stream] of $config" >&2; exit 2; }
        sed -i "/^temp_min = /d; s#^temp_init = \(.*\)#temp_init = \1\ntemp_min = $tmin#" "$cfg"
      fi
      if [[ "$name" == *_mvm || "$name" == *_mvlm ]]; then
        [ -f "${DVAE:-}/dvae.json" ] || { echo "$name needs DVAE=<dir with dvae.json> (cots train-tokenizer --out DIR)" >&2; exit 2; }
        sed -i "s#^\[model\]\$#[model]\ndvae = \"$DVAE\"#" "$cfg"
      fi
      if [[ "$name" == *_noisy ]]; then
        sed -i "s#^\[data\]\$#[data]\nnoisy_pairs = 0.2#; s#^\[train\]\$#[train]\nlog_every = 5#" "$cfg"
      fi
      rm -rf "$dir"
      t0=$(date +%s)
      $cots -q train --config "$cfg"
      $cots -q eval --run "$dir" --json "$dir/eval.json" --markdown "$dir/eval.md" > /dev/null
      echo "== $name seed $seed ($(( $(date +%s) - t0 )) s): $(tr -d '\n' < "$dir/eval.md" | grep -o 'RSUM [0-9.]*' | head -1)"
    done
  done
fi

# The table: one line per row with at least one finished seed.
rows_arg=()
for i in "${!names[@]}"; do
  selected "${names[$i]}" && rows_arg+=("${names[$i]}=${descs[$i]}")
done
python3 - "$out" "$seeds" "${rows_arg[@]}" > "$out/table.md" <<'PY'
import json, os, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split()
def r1(direction):
    # `recall` is a list of [k, percent] pairs.
    return dict((int(k), v) for k, v in direction["recall"])[1]
print("| objectives | seeds | RSUM | i2t R@1 | t2i R@1 | RSUM per seed |")
print("|---|---|---|---|---|---|")
for arg in sys.argv[3:]:
    name, desc = arg.split("=", 1)
    vals = []
    for s in seeds:
        p = os.path.join(out, name, f"seed{s}", "eval.json")
        if os.path.exists(p):
            r = json.load(open(p))
            vals.append((s, r["rsum"], r1(r["i2t"]), r1(r["t2i"])))
    if not vals:
        continue
    def ms(xs):
        m = statistics.mean(xs)
        sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        return f"{m:.1f} ± {sd:.1f}" if len(xs) > 1 else f"{m:.1f}"
    cols = [ms([v[i] for v in vals]) for i in (1, 2, 3)]
    per = ", ".join(f"{v[1]:.1f}" for v in vals)
    print(f"| {desc} (`{name}`) | {' '.join(v[0] for v in vals)} | {cols[0]} | {cols[1]} | {cols[2]} | {per} |")
PY
# The filter's precision and recall against the injected labels, pooled
# over the logged steps of the last 100 (sums of `amf_true_drops`,
# `amf_dropped`, `amf_noisy` from metrics.jsonl).
python3 - "$out" "$seeds" "$steps" "${rows_arg[@]}" > "$out/amf.md" <<'PY'
import json, os, statistics, sys
out, seeds, steps = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
rows = []
for arg in sys.argv[4:]:
    name, desc = arg.split("=", 1)
    if "_amf" not in name:
        continue
    per = []
    for s in seeds:
        p = os.path.join(out, name, f"seed{s}", "metrics.jsonl")
        if not (os.path.exists(p) and os.path.exists(os.path.join(out, name, f"seed{s}", "eval.json"))):
            continue
        t = d = n = 0.0
        active = 0
        for line in open(p):
            r = json.loads(line)
            if r.get("step", 0) <= steps - 100 or "amf_noisy" not in r:
                continue
            t += r["amf_true_drops"]; d += r["amf_dropped"]; n += r["amf_noisy"]
            active += int(r.get("amf_active", 0))
        prec = t / d if d else float("nan")
        rec = t / n if n else float("nan")
        per.append((s, prec, rec, d, n, active))
    if per:
        rows.append((name, desc, per))
if rows:
    print("| objectives | seeds | precision | recall | per seed: precision / recall (dropped, noisy, active logged steps) |")
    print("|---|---|---|---|---|")
    for name, desc, per in rows:
        def ms(xs):
            xs = [x for x in xs if x == x]
            if not xs:
                return "-"
            return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"
        detail = "; ".join(f"{p:.2f} / {r:.2f} ({d:.0f}, {n:.0f}, {a})" for _, p, r, d, n, a in per)
        print(f"| {desc} (`{name}`) | {' '.join(x[0] for x in per)} | {ms([x[1] for x in per])} | {ms([x[2] for x in per])} | {detail} |")
PY
cat "$out/table.md"
[ -s "$out/amf.md" ] && cat "$out/amf.md"
true
