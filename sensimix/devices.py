"""Devices, dtypes and what the processor can do: one home for each (light imports; torch inside functions)."""

from __future__ import annotations

import functools
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "fp16", "bf16")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
            "bf16": "bf16", "bfloat16": "bf16"}


def resolve_device(device: object = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` -> ``cuda:<current>``. A CUDA request without
    CUDA, or another device type, is a ValueError naming the choices."""
    import torch

    name = str(device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was requested but CUDA is not available "
                             f"(torch.cuda.is_available() is False); use cpu or auto")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}" if dev.index is not None else "cuda"
    if dev.type != "cpu":
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return "cpu"


def dtype_name(dtype: object) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` for a torch dtype or any of its spellings."""
    import torch

    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        if dtype not in names:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return names[dtype]
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return _ALIASES[key]


def torch_dtype(dtype: object) -> torch.dtype:
    """The torch dtype of ``fp32`` / ``fp16`` / ``bf16`` (or a torch dtype, checked)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(dtype)]


def certified_fp32(device: str) -> None:
    """fp32 as certified: no TF32 in CUDA matmuls/convolutions (a process-wide torch setting)."""
    import torch

    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def card_slug(device: str) -> str:
    """The card's name as a file-name part: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (lower case,
    every run of other characters one ``-``). The one naming of result files and benchmark histories per card
    (scripts/gpu_check.py, .github/workflows/gpu-acceptance.yml); on CPU, the CPU model's slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug or "unknown-device"


# x86 flags that decide which CPU kernels are fast (names as /proc/cpuinfo spells them)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_int8", "amx_bf16", "avx512_vpopcntdq")


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The kernel-relevant flags of this CPU (:data:`CPU_FLAGS`), from /proc/cpuinfo; empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(set(line.split(":", 1)[1].split()) & set(CPU_FLAGS))
    except OSError:
        pass
    return frozenset()


def cpu_has_vnni() -> bool:
    """int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): oneDNN's int8 GEMMs (``torch._int_mm``) are
    fast only with them; without them torch falls back to a reference loop (~2 GOPS measured on a 2-core AVX2
    EPYC, 20x slower than an fp32 GEMM)."""
    return bool(cpu_features() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_bf16() -> bool:
    """Native bf16 GEMMs (AVX512-BF16 or AMX); elsewhere oneDNN emulates them, slower than fp32."""
    import torch

    if cpu_features() & {"avx512_bf16", "amx_bf16"}:
        return True
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False
