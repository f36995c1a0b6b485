#!/usr/bin/env bash
# Measures what compositing transparent pixels over a background is worth
# (issue #22): one trained run evaluated on a held-out style's raw RGBA
# artwork, read two ways:
#   composited  the raw PNGs as they are; cots composites them over the run's
#               background (white), as the builder did for training
#   dropped     the same PNGs with alpha dropped and the hidden RGB kept
#               (PIL's convert("RGB"), the same pixels `to_rgb8` gave before
#               the fix)
# and, for reference, the builder's own composited gallery (eval-STYLE.toml).
#
#   bash benches/alpha/run.sh [RUN] [STYLE]     (defaults: runs/emoji-effnet twitter)
#
# Needs data/emoji and its package cache (cargo xtask data emoji), a trained
# run (configs/emoji-effnet.toml), python3 with Pillow, and a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
run=${1:-runs/emoji-effnet}
style=${2:-twitter}
out=data/alpha/$style
mkdir -p "$out/dropped"
python3 - "$style" "$out" <<'PY'
import json, os, sys
from pathlib import Path
from PIL import Image

style, out = sys.argv[1], Path(sys.argv[2])
dirs = {"twitter": "emoji-datasource-twitter/img/twitter/64",
        "google": "emoji-datasource-google/img/google/64"}
raw_dir = Path("data/cache/packages") / dirs[style]

def key(stem):
    parts = [p.lower().lstrip("0").rjust(4, "0") for p in stem.split("-")]
    return "-".join(p for p in parts if p != "fe0f")

raw = {key(p.stem): p for p in raw_dir.glob("*.png")}
lines = Path(f"data/emoji/test-{style}.jsonl").read_text().splitlines()
composited, dropped, alpha_items = [], [], 0
for line in lines:
    item = json.loads(line)
    k = Path(item["image"]).stem
    src = raw.get(key(k))
    if src is None:
        sys.exit(f"no raw {style} PNG for {k} in {raw_dir}")
    img = Image.open(src)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        alpha_items += 1
    flat = out / "dropped" / f"{k}.png"
    img.convert("RGBA").convert("RGB").save(flat)
    composited.append({**item, "image": str(src.resolve())})
    dropped.append({**item, "image": str(flat.resolve())})
for name, rows in (("composited", composited), ("dropped", dropped)):
    (out / f"test-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"eval-{name}.toml").write_text(
        f'[data]\nkind = "manifest"\npath = "{(out / f"test-{name}.jsonl").resolve()}"\n')
print(f"{len(lines)} test items, {alpha_items} with an alpha channel, from {raw_dir}")
PY
for variant in builder composited dropped; do
  if [ "$variant" = builder ]; then cfg=data/emoji/eval-$style.toml; else cfg=$out/eval-$variant.toml; fi
  target/release/cots eval --quiet --run "$run" --data-config "$cfg" --json "$out/$variant.json" >/dev/null
  python3 - "$variant" "$out/$variant.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
def find(d, name):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == name:
                return v
            f = find(v, name)
            if f is not None:
                return f
    return None
rsum = find(r, "rsum")
print(f"{sys.argv[1]:<11} RSUM {rsum:6.1f}  mean of six {rsum / 6:5.1f}")
PY
done
