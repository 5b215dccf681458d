#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device session: gathers what scripts/gpu_check.sh needs there,
# in git-ignored folders that the device `run` call carries (carry: [".whl", ".gpu"]; 64 MiB in all):
#   .whl/         wheels of the packages the device image lacks (datasets and the two it needs beyond the image)
#   .gpu/glue/    QNLI dev and SST-2 from $GLUE_DIR (the ../shared folder does not travel)
#   .gpu/minilm/  the packaged MiniLM-L6 with fp16 weights (the fp32 file is 91 MB, over the carry limit);
#                 config.json says float32, so it loads as fp32 and only the last mantissa bits differ
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GLUE=${GLUE_DIR:-../shared/data/glue}
rm -rf .whl .gpu && mkdir -p .whl .gpu/glue
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==$($PY -c 'import datasets; print(datasets.__version__)')" \
  "dill==$($PY -c 'import dill; print(dill.__version__)')" \
  "multiprocess==$($PY -c 'import multiprocess; print(multiprocess.__version__)')"
for task in QNLI SST-2; do
  mkdir -p ".gpu/glue/$task" && cp "$GLUE/$task/"*.tsv ".gpu/glue/$task/"
done
$PY - <<'PYEOF'
import json, shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sensimix.data import offline_bert

src, out = Path(offline_bert()), Path(".gpu/minilm")
out.mkdir(parents=True)
tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
config = json.loads((src / "config.json").read_text())
config["torch_dtype"] = config["dtype"] = "float32"  # load (and fine-tune) in fp32
(out / "config.json").write_text(json.dumps(config, indent=2))
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy(src / name, out / name)
PYEOF
du -sh .whl .gpu
echo "device call: run(command='bash scripts/gpu_check.sh', carry=['.whl', '.gpu'], timeout_s=590)"
