#!/usr/bin/env bash
# Our training step against PyTorch's, in the same shell, with the same
# thread count (issue #23; docs/perf-training.md). Prints one Markdown table:
# median ms per step after warm-up and peak RSS of each process.
#
#   benches/train_step.sh                 # demo small base
#   benches/train_step.sh demo            # one size
#   THREADS=2 STEPS=20 WARMUP=5 benches/train_step.sh demo small
#   SDPA=1 benches/train_step.sh demo     # adds PyTorch with scaled_dot_product_attention
#
# Environment: THREADS (default: nproc) sets RAYON_NUM_THREADS for ours and
# COTS_THREADS (torch.set_num_threads) + OMP_NUM_THREADS for PyTorch;
# WARMUP (3) and STEPS (10) per size, BASE_STEPS (5) and BASE_WARMUP (2) for
# the base size; COTS_TORCH_VENV: the venv of benches/reference/setup.sh
# (made on first use). Raw JSON lines go to $OUT (default
# target/train-step). Run it on a quiet machine: timings taken while other
# work shares the cores mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(demo small base)
threads="${THREADS:-$(nproc)}"
out="${OUT:-target/train-step}"
mkdir -p "$out"

cargo build --release -p cots-benches --bin step_profile >&2
# A private copy: a rebuild elsewhere cannot change the binary mid-run.
bin="$out/step_profile"
cp target/release/step_profile "$bin"

venv="${COTS_TORCH_VENV:-$HOME/.cache/cots/torch-venv}"
py="$venv/bin/python"
if ! "$py" -c 'import torch' 2>/dev/null; then
    py="$(benches/reference/setup.sh | tail -n 1)"
fi

rows=()
for size in "${sizes[@]}"; do
    if [[ "$size" == base ]]; then
        w="${BASE_WARMUP:-2}" n="${BASE_STEPS:-5}"
    else
        w="${WARMUP:-3}" n="${STEPS:-10}"
    fi
    echo "== $size: ours ($threads threads, $w warm-up + $n steps)" >&2
    RAYON_NUM_THREADS="$threads" "$bin" time --size "$size" --warmup "$w" --steps "$n" \
        --spec-out "$out/$size-spec.json" | tee "$out/$size-cots.json" >&2
    impls=(torch)
    [[ -n "${SDPA:-}" ]] && impls+=(torch-sdpa)
    for impl in "${impls[@]}"; do
        echo "== $size: $impl" >&2
        flag=()
        [[ "$impl" == torch-sdpa ]] && flag=(--sdpa)
        COTS_THREADS="$threads" OMP_NUM_THREADS="$threads" "$py" benches/reference/train_step.py \
            --spec "$out/$size-spec.json" --warmup "$w" --steps "$n" "${flag[@]}" \
            | tee "$out/$size-$impl.json" >&2
        rows+=("$out/$size-cots.json:$out/$size-$impl.json")
    done
done

python3 - "${rows[@]}" <<'EOF'
import json, sys
print("| size | threads | ours ms/step | PyTorch ms/step | PyTorch / ours (>1: ours faster) "
      "| ours peak RSS MiB | PyTorch peak RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for pair in sys.argv[1:]:
    a, b = pair.split(":")
    ours, ref = json.load(open(a)), json.load(open(b))
    name = ours["size"] + ("" if ref["impl"] == "torch" else f" ({ref['impl']})")
    print(f"| {name} | {ours['threads']} | {ours['ms_median']:.1f} | {ref['ms_median']:.1f} "
          f"| {ref['ms_median'] / ours['ms_median']:.2f} | {ours['peak_rss_mib']:.0f} "
          f"| {ref['peak_rss_mib']:.0f} |")
EOF
