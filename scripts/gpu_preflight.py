"""The GPU check's preflight (scripts/gpu_check.py runs it as its first step, ``gpu_check.py --preflight``): CUDA,
versions, the carried files, free GPU memory and disk; one ``MISSING:`` line per missing thing, then one
``PREFLIGHT-JSON`` line. No torch at import: the driver holds no CUDA context."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"torch": "2.11", "transformers": "5.17", "triton": "3.6"}  # the GPU image's, as measured
MIN_FREE_GPU_GIB = 16.0  # BERT-base fp32 at batch 128 x 128 plus the fp16 copies: a few GiB; a busy card fails here
MIN_FREE_DISK_GB = 4.0  # the BERT-base folder (.bin + .safetensors, 876 MB) and the SensiMix and accuracy folders
CARRIED = {  # path under GPU_DIR -> what it is
    "minilm/config.json": "the fp16 MiniLM copy (accuracy criterion)",
    "minilm/model.safetensors": "the fp16 MiniLM copy (accuracy criterion)",
    "minilm/vocab.txt": "the bert-base-uncased vocabulary (tokenizer of every model)",
    "glue/QNLI/dev.tsv": "QNLI dev (the timed examples)",
    "glue/SST-2/train.tsv": "SST-2 train (accuracy criterion)",
    "glue/SST-2/dev.tsv": "SST-2 dev (accuracy criterion)",
}


def preflight(cfg: Any) -> int:
    """Print one ``MISSING:`` line per missing thing and return 2, or 0; then one ``PREFLIGHT-JSON`` line."""
    import importlib
    import platform
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT))  # this checkout's sensimix (it is not installed on the GPU machine)
    problems: list[str] = []
    notes: list[str] = []
    info: dict[str, object] = {"python": platform.python_version(), "device": cfg.device, "mode": cfg.mode}

    def missing(what: str) -> None:
        problems.append(what)
        print(f"MISSING: {what}", flush=True)

    def note(what: str) -> None:
        notes.append(what)
        print(f"NOTE: {what}", flush=True)

    for name in ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "tqdm", "pytest",
                 "pytest_benchmark", "triton", "matplotlib"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - any import failure is a missing package here
            if name == "matplotlib":
                note(f"matplotlib: {type(exc).__name__}: {exc} (no report.png; everything else runs)")
            elif name == "triton" and not cfg.device.startswith("cuda"):
                note("triton is not installed (the CPU dry run does not need it)")
            else:
                missing(f"python package {name}: {type(exc).__name__}: {exc}")
    for name, want in EXPECTED.items():
        have = str(info.get(name, ""))
        if have and not have.startswith(want) and cfg.device.startswith("cuda"):
            note(f"{name} {have} is not the GPU image's {want}.x that the budget was measured with")
    try:
        sys.modules.setdefault("datasets", None)  # the GPU image has no `datasets`: nothing here may need it
        for name in ("sensimix", "sensimix.vv", "sensimix.train", "sensimix.kernels", "sensimix.inference"):
            importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing(f"import sensimix: {type(exc).__name__}: {exc}")

    slug = "unknown-card"
    if "torch" in info:
        import torch

        info["cuda"] = torch.version.cuda
        if cfg.device.startswith("cuda"):
            if not torch.cuda.is_available():
                missing(f"CUDA: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU "
                        f"(torch.cuda.is_available() is False)")
            else:
                dev = torch.device(cfg.device)
                free, total = torch.cuda.mem_get_info(dev)
                cap = torch.cuda.get_device_capability(dev)
                info.update(gpu=torch.cuda.get_device_name(dev), capability=f"{cap[0]}.{cap[1]}",
                            gpu_free_gib=round(free / 2**30, 1), gpu_total_gib=round(total / 2**30, 1))
                if free / 2**30 < MIN_FREE_GPU_GIB:
                    missing(f"free GPU memory: {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
                            f"(< {MIN_FREE_GPU_GIB:.0f} GiB: is another process on the card?)")
                if cap < (8, 9):
                    note(f"compute capability {cap[0]}.{cap[1]} < 8.9: no FP8 tensor cores, the 1-bit FFNs run on "
                         f"the int8 kernel")
        if "sensimix" in sys.modules and not any(p.startswith(("CUDA", "import sensimix")) for p in problems):
            from sensimix.devices import card_slug

            slug = card_slug(cfg.device)
    info["card"] = slug

    absent = [(rel, what) for rel, what in CARRIED.items() if not (cfg.gpu_dir / rel).is_file()]
    for rel, what in absent:
        missing(f"{cfg.gpu_dir / rel}: {what}")
    if absent:
        note("carried files: run `bash scripts/gpu_prepare.sh` in the checkout that makes the call, and carry [\".gpu\"]")
    if not (ROOT / "scripts" / "benchmark.py").is_file():
        missing(f"{ROOT / 'scripts' / 'benchmark.py'}")
    free_disk = shutil.disk_usage(tempfile.gettempdir()).free / 1e9
    info["tmp_free_gb"] = round(free_disk, 1)
    if free_disk < MIN_FREE_DISK_GB:
        missing(f"disk: {free_disk:.1f} GB free in {tempfile.gettempdir()} (< {MIN_FREE_DISK_GB:.0f} GB)")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        probe = cfg.out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        missing(f"OUT={cfg.out} is not writable: {exc}")
    info["problems"], info["notes"] = problems, notes
    print("PREFLIGHT-JSON " + json.dumps(info, sort_keys=True), flush=True)
    return 2 if problems else 0
