"""Kernels for the SensiMix runtime, behind one dispatch by name and device.

One module per backend family: :mod:`.base` (the interfaces), :mod:`.reference` (pure-torch definitions every
kernel is tested against), :mod:`.torch_ops` (plain torch ops, CPU and CUDA), :mod:`.onednn` (bf16 GEMMs with
fused epilogues), :mod:`.fbgemm` (torch's quantized engine), :mod:`.popcount` and :mod:`.int16` (C, AVX2; built
by :mod:`.native`), :mod:`.cuda` (FP8 tensor cores), :mod:`.triton_kernels`; for A8 checkpoints :mod:`.a8` (torch
ops), :mod:`.a8native` (C) and :mod:`.a8triton` (int8 tensor cores in Triton: the CUDA default).

1-bit linear (``sign(x) @ sign(W)^T + b``, exact in every kernel):

============= ======================================================= ======================================
name          compute                                                 default where
============= ======================================================= ======================================
``fp8``       ±1 e4m3, ``torch._scaled_mm`` (fp32 accumulation)        CUDA sm_89+ (Ada, Hopper)
``int8``      ±1 int8 (activations as {0,1} bits), ``torch._int_mm``   CUDA sm_80-86; CPUs with VNNI/AMX
``popcount``  packed bits, AVX2 XNOR-popcount (C, built at install)    other x86 CPUs with AVX2
``fbgemm``    {0,1} x ±1 on fbgemm's int8 GEMM, rounded back           x86 CPUs where ``popcount`` cannot run
``float``     ±1 fp32, dense GEMM                                     fallback
``xnor``      packed bits, Triton XNOR-popcount                       (opt-in; needs triton)
``reference`` ±1 int64 matmul                                         tests
============= ======================================================= ======================================

8-bit index linear (``x @ W_hat^T + b``): ``dequant`` (int8 in memory, dequantized per call into a reused
buffer; exact; the CPU default), ``dense`` (dequantized once at load to the model dtype; exact; the CUDA default:
fp32 weights, or fp16 ones as in the paper with precision fp16), ``int8`` (dynamic per-row int8 activations through
``torch._int_mm``; APPROXIMATE), ``fbgemm`` (torch's quantized dynamic linear, per-tensor int8 activations;
APPROXIMATE; CPU), ``bf16`` (bf16 weights and activations, bias/GELU in oneDNN's GEMM epilogue; APPROXIMATE),
``int16`` (per-row 15-bit integer activations, exact int8 weights, an AVX2 int16 GEMM in C; APPROXIMATE; CPU),
``bf16x3`` (fp32 activations split exactly into three bf16 parts, one bf16 tensor-core GEMM with fp32 accumulation:
fp32-grade results, not bitwise the QAT model's; CUDA, by name until a GPU times it), ``reference``. Approximate
kernels are never a default; ``fast`` runs one (``int16``) only for a checkpoint whose calibration record shows it
kept that model's predictions (:mod:`sensimix.calibration_record`, :func:`sensimix.inference.plan.fast_index8_kernel`);
otherwise they are chosen by name.
"""

from __future__ import annotations

import torch

from .a8 import A8ReferenceKernel, A8TorchKernel
from .a8native import A8NativeKernel
from .a8triton import A8TritonKernel
from .base import BinaryKernel, Index8Kernel, Prepared
from .cuda import Fp8BinaryKernel, SplitBf16Index8Kernel, fp8_supported
from .fbgemm import FbgemmBinaryKernel, FbgemmIndex8Kernel, quantized_engine
from .int16 import Int16Index8Kernel
from .onednn import Bf16Index8Kernel
from .popcount import PopcountBinaryKernel
from .torch_ops import (
    DenseIndex8Kernel,
    DequantIndex8Kernel,
    DynamicInt8Index8Kernel,
    FloatBinaryKernel,
    Int8BinaryKernel,
    ReferenceBinaryKernel,
    ReferenceIndex8Kernel,
    index8_embedding,
)
from .triton_kernels import XnorBinaryKernel

__all__ = [
    "BINARY_KERNELS", "INDEX8_KERNELS", "BinaryKernel", "Index8Kernel", "Prepared", "binary_kernel", "index8_kernel",
    "default_binary_kernel", "default_index8_kernel", "fp8_supported", "index8_embedding", "quantized_engine",
]

BINARY_KERNELS: dict[str, BinaryKernel] = {
    k.name: k for k in (Fp8BinaryKernel(), Int8BinaryKernel(), PopcountBinaryKernel(), FbgemmBinaryKernel(),
                        FloatBinaryKernel(), XnorBinaryKernel(), ReferenceBinaryKernel())
}
INDEX8_KERNELS: dict[str, Index8Kernel] = {
    k.name: k for k in (DenseIndex8Kernel(), DequantIndex8Kernel(), DynamicInt8Index8Kernel(), FbgemmIndex8Kernel(),
                        Bf16Index8Kernel(), Int16Index8Kernel(), SplitBf16Index8Kernel(), ReferenceIndex8Kernel(),
                        A8TritonKernel(), A8NativeKernel("a8-vnni"), A8NativeKernel("a8-avx2"), A8TorchKernel(),
                        A8ReferenceKernel())
}
# A8 checkpoints: the fastest exact A8 kernel the device runs
_A8_PREFERENCE = ("a8-triton", "a8-vnni", "a8-avx2", "a8-torch")
_BINARY_PREFERENCE = ("fp8", "int8", "popcount", "fbgemm", "float")  # exact kernels, fastest first where each is fast


def default_binary_kernel(device: torch.device | str) -> str:
    """The fastest exact 1-bit kernel on ``device`` (see the module table)."""
    device = torch.device(device)
    for name in _BINARY_PREFERENCE:
        kernel = BINARY_KERNELS[name]
        if kernel.unavailable(device) is None and kernel.fast_on(device):
            return name
    return "float"


def default_index8_kernel(device: torch.device | str, activations: str = "fp32") -> str:
    """The exact 8-bit kernel for ``device`` and a checkpoint's ``activations``: for fp32 activations ``dequant``
    on CPU (int8 weight memory, dequantized per call at ~1-2% of the GEMM's time), ``dense`` on CUDA (dequantized
    once at load: GEMMs are too fast there for a pass over the weights per call); for A8 the first A8 kernel of
    the preference list that runs there fast."""
    device = torch.device(device)
    if activations == "a8":
        for name in _A8_PREFERENCE:
            kernel = INDEX8_KERNELS[name]
            if kernel.unavailable(device) is None and kernel.fast_on(device):
                return name
        return "a8-torch"
    return "dequant" if device.type == "cpu" else "dense"


def _resolve(kind: str, table: dict, name: str | None, device: torch.device | str, default):
    device = torch.device(device)
    key = default(device) if name in (None, "auto") else name
    if key not in table:
        raise ValueError(f"unknown {kind} kernel {name!r}; choose one of: auto, {', '.join(table)}")
    reason = table[key].unavailable(device)
    if reason:
        raise ValueError(f"{kind} kernel {key!r} cannot run on {device}: {reason}")
    return table[key]


def binary_kernel(name: str | None, device: torch.device | str) -> BinaryKernel:
    """The 1-bit kernel called ``name`` (None/"auto": the device default), checked to run on ``device``."""
    return _resolve("binary", BINARY_KERNELS, name, device, default_binary_kernel)


def index8_kernel(name: str | None, device: torch.device | str, activations: str = "fp32") -> Index8Kernel:
    """The 8-bit kernel called ``name`` (None/"auto": the default for the device and the checkpoint's
    ``activations``), checked to run on ``device`` and to compute that arithmetic."""
    kernel = _resolve("index8", INDEX8_KERNELS, name, device, lambda d: default_index8_kernel(d, activations))
    if kernel.activations != activations:
        names = ", ".join(n for n, k in INDEX8_KERNELS.items() if k.activations == activations)
        what = "an A8 checkpoint (8-bit activations)" if activations == "a8" else "a checkpoint with fp32 activations"
        raise ValueError(f"index8 kernel {kernel.name!r} computes {kernel.activations} activations, but this is "
                         f"{what}: choose one of {names}")
    return kernel
