#!/usr/bin/env bash
# Create .venv and install refinedet with the extras for training, export, serving, scaling out and tests.
# torch/torchvision: the pins below are what the project is tested with; pyproject admits a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
  || .venv/bin/python -m pip install -q "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
# scale: Ray (Serve, Data), tritonclient and kubernetes-validate for tests/scaleout, the OIP and k8s tests
# (about 340 MB more; REFINEDET_EXTRAS=dev leaves them out and those tests skip with the reason).
.venv/bin/python -m pip install -q -e ".[${REFINEDET_EXTRAS:-dev,scale}]"
echo "refinedet installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
