"""The kernel interface and the plain-torch kernels (the CPU fast paths; they also run on CUDA).

A kernel turns the stored form of a weight (packed sign bits, or int8 indices + fp16 range) into its compute
operand once, at load (``prepare_*``), and computes a linear layer from it. Tensors passed between layers keep
their logical shape ``[..., K]``; any padding a GEMM needs stays inside the kernel.

1-bit kernels (``y = sign(x) @ sign(W)^T + b``, sign(0) = -1) are exact: the ±1 products are summed in int32 or
in fp32 (exact below 2^24), and the bias is added once in fp32. The FFN intermediate of a mixed layer uses
``linear_sign``, which returns the ±1 operand of ``sign(y)`` directly: since y = acc + b with an integer acc,
``acc + b > 0  <=>  acc > floor(-b)``, so the sign comes from one integer comparison (the GELU is skipped exactly).

8-bit kernels compute ``x @ W_hat^T + b`` with ``W_hat = (Q + 128) * s + lo``:

* ``dense``   dequantize once at load to the model dtype, then a dense GEMM (exact; memory of a dense weight).
* ``dequant`` keep int8 Q, dequantize per call (exact; int8 weight memory; the CUDA default).
* ``int8``    dynamic per-row int8 activations with ``torch._int_mm`` and ``W_hat = s*Q + c``:
              ``x W_hat^T = s * (x Q^T) + c * rowsum(x)`` (APPROXIMATE: activations rounded to 8 bits).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..quant import QMIN, index8_dequantize, index8_step, unpack_signs
from . import reference


def has_int_mm() -> bool:
    return hasattr(torch, "_int_mm")


# ---------------------------------------------------------------------------------------------------
# 1-bit kernels
# ---------------------------------------------------------------------------------------------------
class BinaryKernel:
    """Interface of a 1-bit linear kernel. Subclasses set ``name``/``operand_dtype`` and implement ``dot``."""

    name: ClassVar[str]
    operand_dtype: ClassVar[torch.dtype]  # dtype of already-binarized activations (±1, or packed words)
    acc_dtype: ClassVar[torch.dtype] = torch.int32  # dtype ``dot`` returns
    exact: ClassVar[bool] = True

    def unavailable(self, device: torch.device) -> str | None:
        """None if the kernel runs on ``device``, else the reason it does not."""
        return None

    # -- load time -------------------------------------------------------------------------------
    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        """Stored packed bits [N, ceil(K/8)] (on the target device) -> the compute operand."""
        raise NotImplementedError

    def prepare_sign_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """What ``linear_sign`` compares the accumulator with: floor(-b) in ``acc_dtype``."""
        return torch.floor(-bias.float()).to(self.acc_dtype)

    # -- run time --------------------------------------------------------------------------------
    def binarize(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Float activations [M, K] -> ±1 operand; an operand (``operand_dtype``) passes through."""
        if x.dtype == self.operand_dtype:
            return x
        return self.from_mask(x > 0)

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool ``v > 0`` -> the ±1 operand of sign(v)."""
        raise NotImplementedError

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        """Exact ``sign(x) @ sign(W)^T`` [M, N] in ``acc_dtype`` from the binarized x and the weight operand."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, k: int,
               out_dtype: torch.dtype) -> torch.Tensor:
        """``sign(x) @ sign(W)^T + b``: the integer accumulator plus the fp32 bias, rounded once to out_dtype."""
        lead = x.shape[:-1]
        acc = self.dot(self.binarize(x.reshape(-1, x.shape[-1]), k), w, k)
        y = acc.to(torch.float32)
        if bias is not None:
            y = y.add_(bias)
        return y.to(out_dtype).view(*lead, -1)

    def linear_sign(self, x: torch.Tensor, w: torch.Tensor, sign_bias: torch.Tensor, k: int) -> torch.Tensor:
        """The ±1 operand of ``sign(sign(x) @ sign(W)^T + b)`` (``sign_bias`` from ``prepare_sign_bias``)."""
        lead = x.shape[:-1]
        acc = self.dot(self.binarize(x.reshape(-1, x.shape[-1]), k), w, k)
        return self.from_mask(acc > sign_bias).view(*lead, -1)


class ReferenceBinaryKernel(BinaryKernel):
    """The packed bits themselves, int64 products (tests and debugging; any device)."""

    name = "reference"
    operand_dtype = torch.int64
    acc_dtype = torch.int64

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        return unpack_signs(bits, k, torch.int64)

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(torch.int64) * 2 - 1

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return xs @ w.t()


class Int8BinaryKernel(BinaryKernel):
    """±1 as int8, ``torch._int_mm`` with int32 accumulation (exact). The CPU default (VNNI int8 GEMM).

    Measured on a 2-core AVX512-VNNI CPU, M=16384, K=768, N=3072 (idle machine): 92 ms, vs 121 ms for a bf16 GEMM
    (whose bf16 output would round the integers) and 434 ms fp32. ``x > 0`` viewed as int8 {0, 1}, then ``* 2 - 1``,
    is ~3x cheaper than ``torch.where`` for making the ±1 operand.
    """

    name = "int8"
    operand_dtype = torch.int8

    def unavailable(self, device: torch.device) -> str | None:
        return None if has_int_mm() else f"torch {torch.__version__} has no torch._int_mm"

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        return unpack_signs(bits, k, torch.int8).contiguous()  # [N, K]; used as the column-major B = w.t()

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.view(torch.int8).mul(2).sub_(1)

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return int_mm(xs, w.t())


class FloatBinaryKernel(BinaryKernel):
    """±1 as fp32 and a dense fp32 GEMM: exact (integers below 2^24), the portable fallback."""

    name = "float"
    operand_dtype = torch.float32
    acc_dtype = torch.float32

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        return unpack_signs(bits, k, torch.float32).contiguous()

    def binarize(self, x: torch.Tensor, k: int) -> torch.Tensor:
        # the operand dtype is also an activation dtype: always binarize (sign of ±1 is ±1)
        return self.from_mask(x > 0)

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(torch.float32).mul_(2).sub_(1)

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return xs @ w.t()


# ---------------------------------------------------------------------------------------------------
# int8 GEMM with the CUDA shape rules
# ---------------------------------------------------------------------------------------------------
def pad_for_int_mm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``a`` [M, K] and ``b`` [K, N] for cuBLASLt int8: K and N multiples of 8, M > 16.

    Zero rows/columns add nothing to the products, so the [M, N] corner of the result is unchanged.
    ``b`` keeps its column-major layout (the fast one for cuBLASLt int8).
    """
    m, k = a.shape
    n = b.shape[1]
    kp, np_, mp = -(-k // 8) * 8, -(-n // 8) * 8, max(m, 17)
    if (kp, mp) != (k, m):
        a = F.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        b = F.pad(b.t(), (0, kp - k, 0, np_ - n)).t()
    return a, b


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 operands with int32 accumulation on any device; CUDA shape rules handled."""
    if a.is_cuda:
        m, n = a.shape[0], b.shape[1]
        a, b = pad_for_int_mm(a, b)
        return torch._int_mm(a.contiguous(), b)[:m, :n]
    return torch._int_mm(a, b)


# ---------------------------------------------------------------------------------------------------
# 8-bit kernels
# ---------------------------------------------------------------------------------------------------
class Index8Kernel:
    """Interface of an 8-bit index linear. ``prepare`` -> (weight operand, fp32 params); ``linear`` runs it."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def prepare(self, q: torch.Tensor, weight_range: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: torch.Tensor, params: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class DenseIndex8Kernel(Index8Kernel):
    """Dequantize once at load to the model dtype; ``F.linear`` (bitwise the QAT model's fp32 math). CPU default."""

    name = "dense"

    def prepare(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return index8_dequantize(q, lo, hi, dtype), weight_range.float()

    def linear(self, x, w, params, bias):
        return F.linear(x, w, bias)


class DequantIndex8Kernel(Index8Kernel):
    """Keep int8 Q, dequantize per call in fp32 then cast (exact; int8 weight memory). CUDA default."""

    name = "dequant"

    def prepare(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return q.contiguous(), torch.stack([index8_step(lo, hi), lo])  # params = [s, lo], computed once

    def linear(self, x, w, params, bias):
        # (Q + 128) * s + lo in fp32, the same operations as quant.index8_dequantize, in place to save launches
        w_hat = w.to(torch.float32).add_(-QMIN).mul_(params[0]).add_(params[1])
        return F.linear(x, w_hat.to(x.dtype), bias)


class DynamicInt8Index8Kernel(Index8Kernel):
    """APPROXIMATE: per-row symmetric int8 activations x ~ sx * xq, then ``s*sx*(xq Q^T) + c*rowsum(x) + b``.

    Q is used as is (exact weights); only the activations lose precision (8 bits per row). Opt-in only.
    """

    name = "int8"
    exact = False

    def unavailable(self, device):
        return None if has_int_mm() else f"torch {torch.__version__} has no torch._int_mm"

    def prepare(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        s = index8_step(lo, hi)
        return q.contiguous(), torch.stack([s, -QMIN * s + lo])  # params = [s, c]

    def linear(self, x, w, params, bias):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        sx = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
        xq = torch.round(x2 / sx).to(torch.int8)
        acc = int_mm(xq, w.t())
        y = acc.to(torch.float32).mul_(sx * params[0]).add_(x2.sum(dim=1, keepdim=True) * params[1])
        if bias is not None:
            y = y.add_(bias)
        return y.to(x.dtype).view(*lead, -1)


class ReferenceIndex8Kernel(Index8Kernel):
    """:func:`reference.index8_linear` (fp32 math, cast back to the activation dtype)."""

    name = "reference"

    def prepare(self, q, weight_range, dtype):
        return q, weight_range

    def linear(self, x, w, params, bias):
        return reference.index8_linear(x, w, params, bias).to(x.dtype)


def index8_embedding(ids: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Gather int8 rows, then dequantize only those (same elementwise math as the QAT model)."""
    lo, hi = weight_range.float()
    rows = q.index_select(0, ids.reshape(-1))
    return index8_dequantize(rows, lo, hi, dtype).view(*ids.shape, q.shape[1])
