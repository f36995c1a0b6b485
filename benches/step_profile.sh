#!/usr/bin/env bash
# Where our training step's time goes (issue #23; docs/perf-training.md).
#
#   benches/step_profile.sh            # demo
#   benches/step_profile.sh base
#   THREADS=2 STEPS=20 benches/step_profile.sh small
#
# Writes to $OUT (default target/step-profile):
#   SIZE-phases.md    median ms of forward, backward, clip, AdamW, EMA, enqueue
#   SIZE-step.md      perf samples of whole steps, by kind of op and symbol
#   SIZE-forward.md   the same for the forward half alone
#   SIZE-*.txt        perf report --no-children --sort symbol (the raw table)
# perf samples only the timed steps (perf's control FIFO, enabled by the
# binary after warm-up), every thread of the process, user and kernel.
# Needs /usr/bin/perf and kernel.perf_event_paranoid <= 1 (or root).
set -euo pipefail
cd "$(dirname "$0")/.."

size="${1:-demo}"
threads="${THREADS:-$(nproc)}"
if [[ "$size" == base ]]; then
    w="${WARMUP:-2}" n="${STEPS:-5}"
else
    w="${WARMUP:-3}" n="${STEPS:-20}"
fi
out="${OUT:-target/step-profile}"
mkdir -p "$out"

cargo build --release -p cots-benches --bin step_profile >&2
bin="$out/step_profile"
cp target/release/step_profile "$bin"
export RAYON_NUM_THREADS="$threads"

"$bin" phases --size "$size" --warmup "$w" --steps "$n" | tee "$out/$size-phases.md"

fifo_dir="$(mktemp -d)"
trap 'rm -rf "$fifo_dir"' EXIT
for what in step forward; do
    flag=()
    [[ "$what" == forward ]] && flag=(--forward-only)
    ctl="$fifo_dir/ctl-$what" ack="$fifo_dir/ack-$what"
    mkfifo "$ctl" "$ack"
    perf record -F "${FREQ:-999}" -D -1 --control "fifo:$ctl,$ack" -o "$out/$size-$what.data" -- \
        "$bin" time --size "$size" --warmup "$w" --steps "$n" "${flag[@]}" \
        --perf-ctl "$ctl,$ack" > "$out/$size-$what.json"
    perf report -i "$out/$size-$what.data" --no-children --sort symbol --stdio \
        --percent-limit 0.05 2>/dev/null > "$out/$size-$what.txt"
    {
        echo "perf samples, size $size, $what, $threads threads, $n timed steps ($(cat "$out/$size-$what.json")):"
        echo
        "$bin" fold "$out/$size-$what.txt"
    } | tee "$out/$size-$what.md"
done
