#!/usr/bin/env bash
# Makes the Python environment of the PyTorch reference scripts in this
# folder (train_step.py, encoders.py, queue_loss.py): a virtual environment
# with torch, outside the repository.
#
#   benches/reference/setup.sh            # -> ~/.cache/cots/torch-venv
#   COTS_TORCH_VENV=/some/dir benches/reference/setup.sh
#
# It prints the venv's python on its last line; benches/train_step.sh finds
# the venv at the same default place. The default PyPI wheel is used (it
# bundles CUDA libraries it never loads here; no CPU-only index is assumed
# reachable). Nothing in the Rust build or tests needs this.
set -euo pipefail

venv="${COTS_TORCH_VENV:-$HOME/.cache/cots/torch-venv}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "$venv/bin/pip" install --quiet torch numpy
fi
"$venv/bin/python" - <<'EOF' >&2
import torch
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default, "
      f"MKL-DNN {torch.backends.mkldnn.is_available()}")
EOF
echo "$venv/bin/python"
