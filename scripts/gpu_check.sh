#!/usr/bin/env bash
# The one prepared GPU check, run ON the lent GPU machine from the repository root (the steps, their time budget
# and what comes back: scripts/gpu_check.py). After `bash scripts/gpu_prepare.sh` in the checkout that calls:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=590)              # MODE=full, <= 540 s
#   run(command="MODE=short bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=300)   # a rerun, <= 180 s
# PY picks the python (default: the machine's python3, which holds torch there).
exec "${PY:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
