"""The FP8 1-bit kernel (``sensimix.kernels.cuda``) vs :mod:`sensimix.kernels.reference`, bit for bit.

fp32 outputs, fp16 outputs with the bias fused into the GEMM, bf16 outputs with the fp32 bias added after it (one
rounding; two would be caught), and the ±1 operand of its fused sign pass. On the CPU torch runs ``_scaled_mm``
through oneDNN; the ``gpu`` tests run the same tables at BERT's shapes on cuBLASLt (``pytest unit -m gpu``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import CUDA, needs_fp8_cpu, problem

from sensimix import kernels
from sensimix.kernels import reference
from sensimix.kernels.cuda import FP8

OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TABLE_SHAPES = [(1, 7, 3), (5, 100, 96), (17, 64, 17), (33, 200, 50), (16, 768, 40), (64, 3072, 24), (128, 768, 48)]
CUDA_TABLE_SHAPES = TABLE_SHAPES + [(256, 768, 3072), (256, 3072, 768)]  # BERT-base's FFN shapes


def table_problem(m: int, k: int, n: int, seed: int = 0):
    """x with exact zeros (sign(0) = -1), packed weights, and fp16-valued biases with full mantissas (acc + b needs
    up to 22 bits: exact in fp32, so only the final rounding can differ)."""
    x, bits, _ = problem(m, k, n, seed)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(seed + 7)) * 4).half().float()
    return x, bits, bias

def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements are bitwise equal (+0.0 and -0.0 differ)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    return int((a.contiguous().view(ints) == b.contiguous().view(ints)).sum())

@functools.lru_cache(maxsize=8)
def table_reference(m: int, k: int, n: int, bias: bool) -> torch.Tensor:
    """The reference's fp32 ``sign(x) sign(W)^T + b`` of :func:`table_problem` (int64 GEMM on the CPU: computed once)."""
    x, bits, b = table_problem(m, k, n)
    return reference.binary_linear(x, bits, k, b if bias else None)

def fp8_exactness(device: str, m: int, k: int, n: int, out: torch.dtype, bias: bool = True) -> tuple[int, int]:
    """(outputs of the FP8 kernel's ``linear`` equal bit for bit to the reference rounded once to ``out``, outputs)."""
    kern = kernels.binary_kernel("fp8", device)
    x, bits, b = table_problem(m, k, n)
    b = b if bias else None
    want = table_reference(m, k, n, bias).to(out)
    got = kern.linear(x.to(device), kern.prepare_weight(bits.to(device), k), None if b is None else b.to(device), k,
                      out).cpu()
    assert got.dtype == out and got.shape == (m, n)
    return same_bits(got, want), m * n

@needs_fp8_cpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out", list(OUT_DTYPES))
@pytest.mark.parametrize("m,k,n", TABLE_SHAPES)
def test_fp8_linear_is_the_reference_rounded_once(m: int, k: int, n: int, out: str, bias: bool) -> None:
    equal, total = fp8_exactness("cpu", m, k, n, OUT_DTYPES[out], bias)
    assert equal == total, f"{total - equal} of {total} outputs differ from the reference rounded once"

@needs_fp8_cpu
def test_fp8_fuses_the_fp16_bias_only(spies) -> None:
    # fp16 outputs: the stored fp16 bias rides in the GEMM's epilogue (fp32 acc + b, rounded once). bf16 and fp32
    # outputs: the GEMM returns fp32 and the fp32 bias is added after it (one rounding to bf16, none to fp32).
    kern = kernels.binary_kernel("fp8", "cpu")
    x, bits, bias = table_problem(9, 100, 40)
    w = kern.prepare_weight(bits, 100)
    seen = {}
    for name, out in OUT_DTYPES.items():
        spies.scaled_mm.calls.clear()
        kern.linear(x, w, bias, 100, out)
        (_, kwargs), = spies.scaled_mm.calls
        seen[name] = (kwargs["bias"] is not None, kwargs["out_dtype"])
    assert seen == {"fp16": (True, torch.float16), "bf16": (False, torch.float32), "fp32": (False, torch.float32)}

@needs_fp8_cpu
def test_a_second_rounding_would_be_caught() -> None:
    # what a bf16 epilogue would compute (the bias rounded to bf16, then acc + b rounded again) differs from the
    # reference on many outputs, so the bitwise tables above can tell one rounding from two
    x, bits, bias = table_problem(64, 768, 48)
    acc = reference.binary_matmul(x, bits, 768).float()
    once = (acc + bias).to(torch.bfloat16)
    twice = (acc + bias.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert same_bits(twice, once) < 0.99 * once.numel()

@needs_fp8_cpu
@pytest.mark.parametrize("m,k,n", [(64, 3072, 40), (33, 200, 50), (1, 7, 3)])
def test_fp8_sign_from_the_fused_fp16_gemm_is_exact(m: int, k: int, n: int) -> None:
    # linear_sign rounds acc + b to fp16 in the GEMM (above 2048 fp16 integers are spaced 2 apart), then takes the
    # sign: rounding never crosses zero, and acc + b == 0 (half-integer biases make ties) stays -1
    kern = kernels.binary_kernel("fp8", "cpu")
    x, bits, bias = problem(m, k, n)
    s = kern.linear_sign(x, kern.prepare_weight(bits, k), kern.prepare_sign_bias(bias), k)
    assert s.dtype == FP8 and s.shape == (m, n)
    assert torch.equal(s.float(), reference.binary_linear_sign(x, bits, k, bias))


# ---------------------------------------------------------------------------------------------------
# on a GPU (pytest unit -m gpu; skipped elsewhere)
# ---------------------------------------------------------------------------------------------------
def needs_cuda_kernel(name: str) -> None:
    reason = kernels.BINARY_KERNELS[name].unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out", list(OUT_DTYPES))
@pytest.mark.parametrize("m,k,n", CUDA_TABLE_SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp8_linear_on_gpu_is_the_reference_rounded_once(m: int, k: int, n: int, out: str, bias: bool) -> None:
    # on the GPU the fp16 bias rides in cuBLASLt's epilogue: it must round once, as oneDNN does on the CPU
    needs_cuda_kernel("fp8")
    equal, total = fp8_exactness("cuda", m, k, n, OUT_DTYPES[out], bias)
    assert equal == total, f"{total - equal} of {total} outputs differ from the reference rounded once"

@pytest.mark.parametrize("m,k,n", [(256, 3072, 768), (64, 3072, 40), (33, 200, 50)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp8_sign_on_gpu_is_exact(m: int, k: int, n: int) -> None:
    needs_cuda_kernel("fp8")
    kern = kernels.binary_kernel("fp8", "cuda")
    x, bits, bias = problem(m, k, n)
    s = kern.linear_sign(x.cuda(), kern.prepare_weight(bits.cuda(), k), kern.prepare_sign_bias(bias.cuda()), k)
    assert s.dtype == FP8 and torch.equal(s.float().cpu(), reference.binary_linear_sign(x, bits, k, bias))
