#!/usr/bin/env bash
# The prepared GPU check, run ON the lent GPU machine from the repository root (the steps, their time budget and
# what comes back: scripts/gpu_check.py). After `bash scripts/gpu_prepare.sh` in the checkout that calls, two calls,
# the second at once after the first:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=470)              # MODE=full, <= 460 s
#   run(command="MODE=bench bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=300)   # MODE=bench, <= 290 s
#   run(command="MODE=short bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=190)   # a rerun, <= 180 s
# PY picks the python (default: the machine's python3, which holds torch there).
exec "${PY:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
