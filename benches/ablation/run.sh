#!/usr/bin/env bash
# The objective ablation: same model, data, steps and seed for every row;
# only the objectives differ. Writes <out>/<row>/eval.md and a summary table
# to stdout.
#   bash benches/ablation/run.sh [steps] [tokenizer_steps]
# Environment:
#   ROWS="itc_kl mvlm"   runs only the rows named
#   CONFIG=FILE          base run config (default configs/demo.toml, the
#                        embedded synthetic data); its [objectives] are replaced
#   OUT=DIR              where rows go (default runs/ablation)
#   EVAL_DATA=FILE       evaluate on this data config's test split instead of
#                        the run's own (e.g. data/emoji/eval-google.toml)
#   COTS=BIN             the cots binary (default: build target/release/cots)
# The emoji rows: CONFIG=configs/emoji.toml OUT=runs/ablation-emoji \
#   EVAL_DATA=data/emoji/eval-google.toml bash benches/ablation/run.sh 400
# With the frozen pretrained towers (no MVLM row: the CNN has no patches):
#   CONFIG=configs/emoji-effnet.toml OUT=runs/ablation-effnet ROWS="clip itc_queue itc_kl" \
#   EVAL_DATA=data/emoji/eval-google.toml bash benches/ablation/run.sh 1500
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-300}
tokenizer_steps=${2:-300}
config=${CONFIG:-configs/demo.toml}
out=${OUT:-runs/ablation}
if [ -z "${COTS:-}" ]; then
  cargo build --release -q -p cots
  cots=target/release/cots
else
  cots=$COTS
fi
mkdir -p "$out"
# The visual tokenizer for masked vision modeling, trained on the base
# config's images and matched to its ViT (the small preset: 64 px, patch 8).
# Only when the mvlm row runs (a CNN image tower has no patches to mask).
if [ -z "${ROWS:-}" ] || [[ " $ROWS " == *" mvlm "* ]]; then
  [ -f "$out/dvae/dvae.safetensors" ] || $cots -q train-tokenizer --config "$config" --preset small --steps "$tokenizer_steps" --out "$out/dvae"
fi
base=$(sed '/^\[objectives/,$d' "$config")
eval_data=()
[ -n "${EVAL_DATA:-}" ] && eval_data=(--data-config "$EVAL_DATA")
row() { # name, objectives TOML
  local name=$1 cfg="$out/$1.toml"
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return 0; fi
  printf '%s\n%s\n' "$base" "$2" | sed "s#^out = .*#out = \"$out/$name\"#; s#^steps = .*#steps = $steps#" > "$cfg"
  if [ "$name" = mvlm ]; then sed -i "s#^\[model\]#[model]\ndvae = \"$out/dvae\"#" "$cfg"; fi
  # Noisy rows: 20% of the training images carry another image's captions.
  if [[ "$name" == *_noisy ]]; then sed -i "s#^\[data\]\$#[data]\nnoisy_pairs = 0.2#" "$cfg"; fi
  rm -rf "$out/$name"
  $cots -q train --config "$cfg"
  $cots -q eval --run "$out/$name" "${eval_data[@]}" --markdown "$out/$name/eval.md" --json "$out/$name/eval.json" > /dev/null
  echo "== $name"; cat "$out/$name/eval.md"
}
queue='[objectives.queue]
size = 4096'
no_amf='[objectives.amf]
enabled = false'
itc='[[objectives.objectives]]
kind = "itc"'
kl='[[objectives.objectives]]
kind = "kl"'
row clip "$no_amf
[[objectives.objectives]]
kind = \"clip\""
row itc_queue "$queue
$no_amf
$itc"
row itc_kl "$queue
$no_amf
$itc
$kl"
row mvlm "$queue
$no_amf
$itc
$kl
[[objectives.objectives]]
kind = \"mvlm\""
# The adaptive momentum filter against injected noisy pairs: the same ITC + KL
# run on data with 20% mismatched training pairs, without and with the filter
# (a 100-step warm-up so it acts within the budget).
row itc_kl_noisy "$queue
$no_amf
$itc
$kl"
row itc_kl_amf_noisy "$queue
[objectives.amf]
enabled = true
warmup_steps = 100
$itc
$kl"
