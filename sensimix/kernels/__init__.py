"""Kernels for the SensiMix runtime, behind one dispatch by name and device.

1-bit linear (``sign(x) @ sign(W)^T + b``, exact in every kernel):

=========== ======================================================== ==========================
name        compute                                                  default on
=========== ======================================================== ==========================
``int8``    ±1 int8 (activations as {0,1} bits), ``torch._int_mm``    CPU; CUDA sm_80..sm_86
``fp8``     ±1 e4m3, ``torch._scaled_mm`` (fp32 accumulation)         CUDA sm_89+ (Ada, Hopper)
``xnor``    packed bits, Triton XNOR-popcount                         (needs triton)
``float``   ±1 fp32, dense GEMM                                       fallback
``reference`` ±1 int64 matmul                                         tests
=========== ======================================================== ==========================

8-bit index linear (``x @ W_hat^T + b``): ``dense`` (dequantize at load; exact; CPU default), ``dequant``
(int8 in memory, dequantize per call; exact; CUDA default), ``int8`` (dynamic per-row int8 activations through
``torch._int_mm``; APPROXIMATE), ``fbgemm`` (torch's quantized dynamic linear, per-tensor int8 activations;
APPROXIMATE; CPU), ``bf16`` (bf16 weights and activations, bias/GELU in oneDNN's GEMM epilogue; APPROXIMATE;
the 8-bit kernel of the runtime's ``dtype="fast"`` on CPUs with native bf16), ``reference``. The approximate
kernels are never a default; ``dense``, ``bf16`` and ``fbgemm`` can fuse Q, K and V into one GEMM.

The pure-torch definitions in :mod:`sensimix.kernels.reference` are what the tests compare every kernel with.

How the CPU defaults were chosen (AMD EPYC, 2 cores, AVX512-VNNI/BF16; M = 16384 = 128 x 128 tokens, K/N in
768/3072; ``scripts/benchmark.py``, on a machine shared with training jobs): ±1 as int8 through ``_int_mm`` runs
4.4-6.9x faster than an fp32 GEMM of the same shape, ±1 in fp32 1.0x; bf16 GEMMs are ~4x fp32 but round the
integer results (not exact), so they serve only as the approximate ``dtype=bfloat16`` model setting. For 8-bit
layers the dequantized fp32 GEMM is the exact fast path; the ``int8`` kernel reaches 1.0-2.1x fp32 only,
because the activation quantization runs as separate eager ops. ``bf16`` and ``fbgemm`` GEMMs run 3.4-5x fp32 at
these shapes (fbgemm ahead at K or N = 3072, behind at 768 x 768 once its c * rowsum(x) term is added); in the
whole SensiMix (2+1) model bf16 was the faster (0.25 vs 0.28-0.30 of the exact model's time, padding skipped)
and the more accurate (SST-2 dev, trained (2+1): 871/872 predictions as fp32, vs 843/872 for fbgemm's per-tensor
activation rounding). On CUDA the FP8 choice follows the H200 numbers of issue 3 (``_scaled_mm`` 1.3-1.8x fp16
cuBLAS); they were not re-measured here.
"""

from __future__ import annotations

import torch

from .cpu import (
    Bf16Index8Kernel,
    BinaryKernel,
    DenseIndex8Kernel,
    DequantIndex8Kernel,
    DynamicInt8Index8Kernel,
    FbgemmIndex8Kernel,
    FloatBinaryKernel,
    Index8Kernel,
    Int8BinaryKernel,
    ReferenceBinaryKernel,
    ReferenceIndex8Kernel,
    has_int_mm,
    index8_embedding,
    quantized_engine,
)
from .cuda import Fp8BinaryKernel, fp8_supported
from .triton_kernels import XnorBinaryKernel

__all__ = [
    "BINARY_KERNELS", "INDEX8_KERNELS", "BinaryKernel", "Index8Kernel", "binary_kernel", "index8_kernel",
    "default_binary_kernel", "default_index8_kernel", "index8_embedding", "quantized_engine",
]

BINARY_KERNELS: dict[str, BinaryKernel] = {
    k.name: k for k in (Int8BinaryKernel(), Fp8BinaryKernel(), XnorBinaryKernel(), FloatBinaryKernel(),
                        ReferenceBinaryKernel())
}
INDEX8_KERNELS: dict[str, Index8Kernel] = {
    k.name: k for k in (DenseIndex8Kernel(), DequantIndex8Kernel(), DynamicInt8Index8Kernel(), FbgemmIndex8Kernel(),
                        Bf16Index8Kernel(), ReferenceIndex8Kernel())
}


def default_binary_kernel(device: torch.device | str) -> str:
    """The fastest exact 1-bit kernel for ``device`` (see the module table)."""
    device = torch.device(device)
    if device.type == "cuda":
        if fp8_supported(device):
            return "fp8"
        if has_int_mm() and torch.cuda.get_device_capability(device) >= (8, 0):
            return "int8"
        return "float"
    return "int8" if has_int_mm() else "float"


def default_index8_kernel(device: torch.device | str) -> str:
    """``dense`` on CPU (fastest exact), ``dequant`` on CUDA (exact with int8 weight memory)."""
    return "dequant" if torch.device(device).type == "cuda" else "dense"


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


def index8_kernel(name: str | None, device: torch.device | str) -> Index8Kernel:
    """The 8-bit kernel called ``name`` (None/"auto": the device default), checked to run on ``device``."""
    return _resolve("index8", INDEX8_KERNELS, name, device, default_index8_kernel)
