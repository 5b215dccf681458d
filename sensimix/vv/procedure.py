"""The certified procedure of KOTCA KST-21-049 (SENSIMIX.md section 6): thresholds, workload, defaults, and the
environment record a certificate names."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from ..calibration_record import FAST_ACCURACY_DELTA, FAST_AGREEMENT  # noqa: F401 - the agreement bar, one home

SCHEMA = "sensimix-kotca-report/2"
SIZE_THRESHOLD = 0.10          # criterion 1: SensiMix / BERT pytorch_model.bin
TIME_THRESHOLD = 0.20          # criterion 2: SensiMix / BERT fp32 inference time, mean of per-trial ratios
FP16_TIME_THRESHOLD = 0.20     # beyond the certificate: vs the fp16 BERT a GPU user would deploy instead
CERTIFIED_EXAMPLES = 104_743   # "Num examples = 104743" in the certified logs (QNLI train size)
CPU_DEFAULT_EXAMPLES = 256     # two batches: BERT-base fp32 takes 15-90 s per 128 x 128 batch on 2 cores
# GLUE's QNLI/dev.tsv (download_glue_data.py; 5,463 pairs): a timing file that differs is named in the report
QNLI_DEV_SHA256 = "ac19409dcb04631eaaa094bdebdcf621086bc352503dfb6a1a648b614986f4fd"
BATCH_SIZE = 128
MAX_SEQ_LENGTH = 128
TRIALS = 3
BERT_BASE_BIN_BYTES = 438_000_000  # the certified BERT pytorch_model.bin (438.0 MB)
CERTIFIED = {  # KST-21-049, RTX 2080 Ti, CUDA 10.1, PyTorch 1.7.1 -- shown beside our figures
    "compression_ratio": 42.2 / 438.0,
    "inference_time_ratio": 0.121,
    "bert_ms": [254_339, 254_550, 254_698],
    "sensimix_ms": [31_729, 29_395, 31_566],
}
BERT_FP32, BERT_FP16, SENSIMIX = "bert-fp32", "bert-fp16", "sensimix"
MODEL_TITLES = {BERT_FP32: "BERT fp32", BERT_FP16: "BERT fp16", SENSIMIX: "SensiMix"}
CRITERION_IDS = ("compression_ratio", "inference_time_ratio", "inference_time_ratio_fp16",
                 "accuracy_gap", "sensimix_accuracy", "fast_agreement")
SENSIMIX_PRECISIONS = ("fp32", "fp16", "bf16", "fast")  # sensimix.inference.PRECISIONS (kept light here)


def default_examples(device: str) -> int:
    """The certified 104,743 examples on CUDA; a CI-sized count on CPU (ratios, not absolute times, are judged)."""
    return CERTIFIED_EXAMPLES if str(device).startswith("cuda") else CPU_DEFAULT_EXAMPLES


def default_warmup_batches(device: str) -> int:
    # CUDA needs a few batches (context, cuBLAS handles, autotuning); on CPU one batch of BERT-base is 15-90 s.
    return 3 if str(device).startswith("cuda") else 1


def sensimix_precision(requested: str | None, device: str) -> str:
    """SensiMix's inference precision. ``auto``: the runtime's ``fast`` recipe on every device -- the exact path's
    fastest kernels, padded tokens skipped, unless the folder's calibration record lets the approximate ``int16``
    kernel run (the V&V's untrained (2+1) has none) -- so the timed model computes what the trained model computes
    (fp16, the paper's GPU inference, flips too many trained-model predictions: see
    ``sensimix.inference.plan.fast_index8_kernel``; ask for it by name). The accuracy criterion evaluates SensiMix
    with the same precision, and the fast-vs-exact agreement on trained models is a criterion of its own. BERT is
    always timed in fp32 (certified) and, on CUDA, in fp16 beside it."""
    if requested in (None, "auto"):
        return "fast"
    if requested not in SENSIMIX_PRECISIONS:
        raise ValueError(f"SensiMix precision must be auto or one of {', '.join(SENSIMIX_PRECISIONS)}, "
                         f"got {requested!r}")
    return requested


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    return (_git("rev-parse", "--short", "HEAD") or "").strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the commit alone then does not name the code that ran)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def _usable_cores() -> int | None:
    """The cores this process may run on (a container's or taskset's share), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def environment(device: str) -> dict[str, Any]:
    """What a certificate names: card, CPU (model and kernel-relevant flags), OS, library versions, commit."""
    import torch
    import transformers

    from ..version import __version__
    from ..devices import cpu_features, device_name

    env: dict[str, Any] = {
        "device": device,
        "device_name": device_name(device),
        "cpu": device_name("cpu"),
        "cpu_flags": sorted(cpu_features()),
        "cpu_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "sensimix": __version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env
