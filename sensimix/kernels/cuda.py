"""CUDA kernels built on torch ops: ±1 on FP8 tensor cores through ``torch._scaled_mm``, and 8-bit linears with
fp32-grade results on bf16 tensor cores (:class:`SplitBf16Index8Kernel`).

±1 and 0 are exact in float8 e4m3 and ``_scaled_mm`` accumulates in fp32, so the 1-bit products come out exact
(|acc| <= K < 2^24). The GEMM wants A [M, K] row-major, B [K, N] column-major, K and N multiples of 16: the
weight is zero-padded once at load and the activations only when K is not a multiple of 16 (never for BERT).
The epilogue adds the bias inside the GEMM for fp16 outputs only: the stored bias is an fp16 value, so
acc + b is computed in fp32 and rounded once, as the reference does. A bf16 output would need the bias rounded
to bf16 first (two roundings: 1,259 of 16,384 outputs differed in an emulation), and ``_scaled_mm`` refuses a
bias with an fp32 output, so both add the fp32 bias after the GEMM (one rounding).

``_scaled_mm`` also runs on CPU (oneDNN, slow): the unit tests use that to check this code without a GPU.
The timings that chose FP8 (H200, M=16384, K/N in 768/3072): fp16 cuBLAS 555-657 TFLOP/s, ``_int_mm`` with a
column-major B 474-673 TOPS, FP8 ``_scaled_mm`` 745-1168 TFLOP/s (issue 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import index8_affine, unpack_signs
from .base import BinaryKernel, Index8Kernel, Prepared, per_row_params
from .triton_kernels import sign_operand

FP8 = getattr(torch, "float8_e4m3fn", None)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or newer."""
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


class Fp8BinaryKernel(BinaryKernel):
    """±1 in e4m3 on FP8 tensor cores, fp32 accumulation (exact). The default on sm_89+."""

    name = "fp8"
    operand_dtype = FP8 if FP8 is not None else torch.float32
    acc_dtype = torch.float32

    def __init__(self) -> None:
        self._ones: dict[torch.device, torch.Tensor] = {}

    def unavailable(self, device: torch.device) -> str | None:
        if fp8_supported(device):
            return None
        return "FP8 tensor cores need torch with float8 and a GPU of compute capability >= 8.9"

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and fp8_supported(device)  # on CPU, _scaled_mm is oneDNN emulation

    def _one(self, device: torch.device) -> torch.Tensor:
        # unit scales, cached per device so the hot path allocates nothing
        if device not in self._ones:
            self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return self._ones[device]

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        # K zero-padded once here; N (a multiple of 16 in BERT) is padded per call only when it is not
        w = unpack_signs(bits, k, torch.float32)
        return F.pad(w, (0, _pad16(k) - k)).to(FP8).contiguous()  # [N, Kp]; B = w.t() is column-major

    def prepare_sign_bias(self, bias: torch.Tensor) -> torch.Tensor:
        # fp16 bias fused into the GEMM: acc + b is computed in fp32 and rounded once to fp16, which keeps its
        # sign (b is an fp16 value, so a nonzero acc + b has magnitude >= 2^-24, the smallest fp16 subnormal)
        return bias.to(torch.float16)

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        # +1/-1 in fp16, then e4m3 (both exact)
        return mask.to(torch.float16).mul_(2).sub_(1).to(FP8)

    def _gemm(self, xs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
        """``xs @ w.t()`` (+ bias, fused) with zero padding to the GEMM's multiples of 16; returns [M, N]."""
        k, (n, kp) = xs.shape[1], w.shape
        if k != kp:  # e4m3 has no pad kernel: pad in fp16 (exact) and convert back
            xs = F.pad(xs.to(torch.float16), (0, kp - k)).to(FP8)
        np_ = _pad16(n)
        if np_ != n:
            w = F.pad(w.to(torch.float16), (0, 0, 0, np_ - n)).to(FP8)
            bias = None if bias is None else F.pad(bias, (0, np_ - n))
        one = self._one(xs.device)
        y = torch._scaled_mm(xs.contiguous(), w.t(), one, one, bias=bias, out_dtype=out_dtype)
        return y if np_ == n else y[:, :n]

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return self._gemm(xs, w, None, torch.float32)

    def linear(self, x, w, bias, k, out_dtype):
        lead = x.shape[:-1]
        xs = self.binarize(x.reshape(-1, x.shape[-1]), k)
        if bias is not None and out_dtype == torch.float16:  # fused and exact: the stored bias is an fp16 value
            y = self._gemm(xs, w, bias.to(out_dtype), out_dtype)
        else:  # bf16/fp32 outputs: fp32 GEMM, fp32 bias, one rounding
            y = self._gemm(xs, w, None, torch.float32)
            y = (y if bias is None else y + bias).to(out_dtype)
        return y.reshape(*lead, -1)

    def linear_sign(self, x, w, sign_bias, k):
        lead = x.shape[:-1]
        h = self._gemm(self.binarize(x.reshape(-1, x.shape[-1]), k), w, sign_bias, torch.float16)
        return sign_operand(h, FP8).reshape(*lead, -1)  # one fused pass on CUDA (Triton), else torch ops


def _has_mm_out_dtype() -> bool:
    """``torch.mm(a, b, out_dtype=torch.float32)`` for bf16 operands (cuBLAS, fp32 output): torch >= 2.8."""
    return hasattr(torch.ops.aten.mm, "dtype")


class SplitBf16Index8Kernel(Index8Kernel):
    """8-bit linears on bf16 tensor cores with fp32-grade results (CUDA; chosen by name: no GPU has timed it yet).

    An int8 index is a bf16 value exactly, and an fp32 activation is the sum of three bf16 numbers
    (``x1 = bf16(x)``, ``x2 = bf16(x - x1)``, ``x3 = bf16(x - x1 - x2)``: 8 + 8 + 8 significand bits, each
    difference exact in fp32). Each product of such a part and an index is exact in fp32 (16 significand bits), so
    one GEMM of ``[x1 | x2 | x3]`` and ``[Q | Q | Q]`` accumulating in fp32 computes ``x @ Q^T`` as an fp32 GEMM
    does, in another order; then ``y = s * acc + c * rowsum(x) + b`` (``W_hat = s Q + c``,
    :func:`sensimix.quant.index8_affine`). Not bitwise the QAT model's GEMM of ``W_hat`` (its products round
    differently), hence ``exact = False``: within ~1e-6 of the output scale (``unit/test_kernels.py``), as the
    exact GEMM is, yet on a trained (3+3) it changed 3 of 872 SST-2 predictions (the 1-bit FFNs binarize values
    that sit at 0 within such differences); both trained (2+1)s kept all 872 (CPU twin).

    Why: the exact path on an H200 spends 81% of its GPU time in fp32 SIMT GEMMs of the dense 8-bit weights
    (``scripts/profile_forward.py``); this runs 3x their multiply-adds at the bf16 tensor-core rate, ~15x the fp32
    one. On CPU it runs as its twin (the same operands, an fp32 GEMM of them), since torch's fp32-output bf16 GEMM is
    CUDA-only: the tests need no GPU, and CPU users have no reason to pick it.
    """

    name = "bf16x3"
    exact = False
    fusable = True

    def unavailable(self, device):
        device = torch.device(device)
        if device.type != "cuda":
            return None
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "bf16 tensor cores need compute capability 8.0 or newer"
        if not _has_mm_out_dtype():
            return f"torch {torch.__version__} has no mm(..., out_dtype=torch.float32) (torch >= 2.8)"
        return None

    def fast_on(self, device):
        return False  # by name until a GPU run measures it against dense

    def prepare_one(self, q, weight_range, dtype):
        return torch.cat([q, q, q], dim=1).to(torch.bfloat16), torch.stack(index8_affine(*weight_range.float()))

    def prepare(self, parts, dtype):
        prepared = [self.prepare_one(q, r, dtype) for q, r, _ in parts]
        params, rows = per_row_params(parts, [p for _, p in prepared])  # [N, 2]: s, c
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).float()
        weight = prepared[0][0] if len(parts) == 1 else torch.cat([w for w, _ in prepared])
        return Prepared(weight, params, bias, parts[0][0].shape[1], rows)

    def linear(self, x, p):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        hi = x2.to(torch.bfloat16)
        rest = x2 - hi.float()
        mid = rest.to(torch.bfloat16)
        parts = torch.cat([hi, mid, (rest - mid.float()).to(torch.bfloat16)], dim=1)
        if parts.is_cuda:
            acc = torch.mm(parts, p.weight.t(), out_dtype=torch.float32)
        else:
            acc = parts.float() @ p.weight.float().t()
        y = torch.addcmul(acc * p.params[:, 0], x2.sum(dim=1, keepdim=True), p.params[:, 1])
        if p.bias is not None:
            y += p.bias
        return y.to(x.dtype).view(*lead, y.shape[-1])
