#!/usr/bin/env bash
# Create .venv with PyTorch and HSAM (with its test and demo extras). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision together so torchvision's compiled ops match torch.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, torchvision, segment_anything, hsam; print('HSAM', hsam.__version__, 'torch', torch.__version__)"
