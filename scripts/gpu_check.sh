#!/usr/bin/env bash
# The one prepared device check (issues 3 and 4), run ON the lent GPU machine from the repository root:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=590)
# after `bash scripts/gpu_prepare.sh` here. Uses the machine's own python3 (torch + CUDA, transformers,
# pytest, pytest-benchmark); installs only the carried wheels; nothing is downloaded. Each step has its own
# time limit, so a slow step cannot eat the others'. Everything lands in $OUT (at most 8 files come back):
#   gpu.log                     the whole console output
#   benchmark-<card>.json       scripts/benchmark.py: BERT fp32 / fp16+SDPA vs SensiMix (2+1), (3+3); GEMMs
#   acceptance-<card>.json      pytest-benchmark JSON of `pytest acceptance --kotca-device cuda`
#   report/report.{json,md,png} the acceptance session's KOTCA report
# Budget (H100/H200): CUDA unit tests ~1 min, benchmark ~1-2 min, acceptance ~5 min (the certified 104,743
# examples x 3 trials for BERT fp32, fp16 and SensiMix, plus the CI-sized accuracy run). For a rerun in the
# same 15-minute lease, shorten it: KOTCA_EXAMPLES=32768 bash scripts/gpu_check.sh.
# A dry run on a CPU machine (checks the plumbing, not the GPU):
#   PY=.venv/bin/python DEVICE=cpu KOTCA_EXAMPLES=256 BENCH_ARGS="--skip-gemm --rounds 1" \
#     ACCEPTANCE_ARGS=--ignore=acceptance/test_accuracy.py OUT=/tmp/gpu-dry bash scripts/gpu_check.sh
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/report"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/gpu.log") 2>&1
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "WARNING: carried wheels did not install; the data steps will fail"
export PYTHONPATH=/tmp/site:$PWD SENSIMIX_PRETRAINED=$PWD/.gpu/minilm GLUE_DIR=$PWD/.gpu/glue
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
CARD=$($PY -c "from sensimix.evaluate import device_name; print(device_name('$DEVICE'))" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
$PY -c "import torch, transformers, datasets, sensimix; print('card', '$CARD', '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| datasets', datasets.__version__)"
step() {  # step <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) ==="
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s ==="
}
step 90 "kernel and runtime tests" \
  $PY -m pytest -q -p no:cacheprovider -o addopts=-ra unit/test_kernels.py unit/test_runtime.py
step 120 "benchmark (scripts/benchmark.py)" \
  $PY scripts/benchmark.py --device "$DEVICE" --json "$OUT/benchmark-$CARD.json" ${BENCH_ARGS:-}
step 360 "pytest acceptance on $DEVICE" \
  $PY -m pytest acceptance -p no:cacheprovider --kotca-device "$DEVICE" ${KOTCA_EXAMPLES:+--kotca-examples "$KOTCA_EXAMPLES"} \
    --benchmark-json "$OUT/acceptance-$CARD.json" --kotca-report "$OUT/report" ${ACCEPTANCE_ARGS:-}
rm -f "$OUT/report/history.jsonl"  # one run: nothing to add beyond report.json
ls -la "$OUT" "$OUT/report"
