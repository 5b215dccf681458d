"""Kernels made of plain torch ops: they run on CPU and CUDA alike.

1-bit: ``int8`` (±1 weights, {0, 1} activations, :func:`.int8_gemm.int_mm`: ``torch._int_mm`` with its wrong shapes
guarded), ``float`` (±1 fp32 GEMM), ``reference``.
8-bit: ``dense`` (dequantized once at load, exact), ``dequant`` (int8 in memory, dequantized per call, exact),
``int8`` (dynamic per-row int8 activations through ``torch._int_mm``; APPROXIMATE), ``reference``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..devices import cpu_has_vnni
from ..quant import QMIN, index8_affine, index8_dequantize, index8_step, unpack_signs
from . import reference
from .base import BinaryKernel, Index8Kernel, Prepared, per_row_params
from .int8_gemm import has_int_mm, int_mm, pad_for_int_mm, trusted  # noqa: F401 - int_mm, pad_for_int_mm: re-exported


def int_mm_fast_on(device: torch.device) -> bool:
    """``torch._int_mm`` is a real int8 GEMM: CUDA sm_80+, or a CPU with VNNI/AMX (else a slow reference loop) on
    which :func:`int_mm` found it right (:func:`.int8_gemm.trusted`). CUDA is judged by its capability alone (a plan
    is made without touching the device); its :func:`int_mm` checks itself at its first call."""
    if not has_int_mm():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_has_vnni() and trusted(device) is None


# ---------------------------------------------------------------------------------------------------
# 1-bit kernels
# ---------------------------------------------------------------------------------------------------
class ReferenceBinaryKernel(BinaryKernel):
    """The packed bits themselves, int64 products (tests and debugging; any device)."""

    name = "reference"
    operand_dtype = torch.int64
    acc_dtype = torch.int64

    def fast_on(self, device):
        return False

    def prepare_weight(self, bits, k):
        return unpack_signs(bits, k, torch.int64)

    def from_mask(self, mask):
        return mask.to(torch.int64) * 2 - 1

    def dot(self, xs, w, k):
        return xs @ w.t()


class Int8BinaryKernel(BinaryKernel):
    """±1 weights as int8, activations as {0, 1} int8 bits, ``torch._int_mm`` with int32 accumulation (exact).

    With b = (x > 0) in {0, 1}, sign(x) = 2b - 1, so ``sign(x) @ W^T = 2 (b @ W^T) - rowsum(W)``: the activation
    operand is the comparison's bool mask viewed as int8 (no ``* 2 - 1`` pass over [M, K]), and the correction
    costs one int32 pass over the [M, N] result, or nothing at all in ``linear_sign``, which folds it into the
    threshold. rowsum(W) (an [N] vector) is recomputed per call rather than stored, so the weight operand stays
    one tensor. Fast only where ``_int_mm`` is a real int8 GEMM (:func:`int_mm_fast_on`).
    """

    name = "int8"
    operand_dtype = torch.int8  # {0, 1}: bit = 1 for +1

    def unavailable(self, device):
        return None if has_int_mm() else f"torch {torch.__version__} has no torch._int_mm"

    def fast_on(self, device):
        return int_mm_fast_on(device)

    def prepare_weight(self, bits, k):
        return unpack_signs(bits, k, torch.int8).contiguous()  # [N, K]; used as the column-major B = w.t()

    def from_mask(self, mask):
        return mask.view(torch.int8)  # a bool is one byte, 0 or 1: a free reinterpretation

    @staticmethod
    def _wsum(w: torch.Tensor) -> torch.Tensor:
        return w.sum(dim=1, dtype=torch.int32)

    def dot(self, xs, w, k):
        return int_mm(xs, w.t()).mul_(2).sub_(self._wsum(w))  # 2 (b @ W^T) - rowsum(W): exact in int32

    def linear_sign(self, x, w, sign_bias, k):
        # sign(x) @ W^T > t  <=>  2 (b @ W^T) - rowsum(W) > t  <=>  b @ W^T > floor((t + rowsum(W)) / 2)
        lead = x.shape[:-1]
        acc01 = int_mm(self.binarize(x.reshape(-1, x.shape[-1]), k), w.t())
        threshold = torch.div(sign_bias + self._wsum(w), 2, rounding_mode="floor")
        return self.from_mask(acc01 > threshold).view(*lead, acc01.shape[-1])


class FloatBinaryKernel(BinaryKernel):
    """±1 in a floating-point GEMM: exact (integers below 2^24 in fp32; CUDA: fp16 operands, fp32 accumulation
    is exact too, but the output dtype rounds). The portable fallback."""

    name = "float"
    operand_dtype = torch.float32
    acc_dtype = torch.float32

    def prepare_weight(self, bits, k):
        return unpack_signs(bits, k, torch.float32).contiguous()

    def binarize(self, x, k):
        # the operand dtype is also an activation dtype: always binarize (sign of ±1 is ±1)
        return self.from_mask(x > 0)

    def from_mask(self, mask):
        return mask.to(torch.float32).mul_(2).sub_(1)

    def dot(self, xs, w, k):
        return xs @ w.t()


# ---------------------------------------------------------------------------------------------------
# 8-bit kernels
# ---------------------------------------------------------------------------------------------------
class DenseIndex8Kernel(Index8Kernel):
    """Dequantize once at load to the model dtype; ``F.linear`` (bitwise the QAT model's fp32 math). The exact
    default on CPU, and on CUDA in fp16 (the paper's inference: dequantized weights, fp16 GEMMs)."""

    name = "dense"
    fusable = True

    def prepare_one(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return index8_dequantize(q, lo, hi, dtype), weight_range.float()

    def linear(self, x, p):
        return F.linear(x, p.weight, p.bias)


_SCRATCH = threading.local()  # per thread: two threads serving one model must never share a buffer


def scratch(numel: int, x: torch.Tensor, dtype: torch.dtype = torch.float32, slot: str = "operand") -> torch.Tensor:
    """A reused buffer of at least ``numel`` elements of ``dtype`` for a per-call operand on CPU (a dequantized
    weight, quantized activations, a kernel's work space, attention's gathered layout): a fresh multi-MB tensor per
    call costs its page faults every time. One buffer per thread, ``slot``, dtype and inference-mode state (a
    tensor made under ``torch.inference_mode`` cannot be written outside it). A fresh tensor where reuse would be
    unsafe: off CPU (the caching allocator is cheap there, and a kernel may still be reading the last one on another
    stream), and when autograd will save the operand for a backward pass. The caller must be done with the buffer
    before the next call for the same slot and dtype."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return torch.empty(numel, dtype=dtype, device=x.device)
    key = (torch.is_inference_mode_enabled(), dtype, slot)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class DequantIndex8Kernel(Index8Kernel):
    """Keep the int8 indices (the checkpoint's own tensor: no copy); per call, dequantize them exactly as
    :func:`sensimix.quant.index8_dequantize` does, ``(Q + 128) * s + lo`` in fp32, into a reused scratch buffer,
    then one GEMM. Exact, with 8-bit weight memory (a quarter of a dense fp32 weight). The CPU default: with
    hundreds of token rows per call the dequantization pass is ~1-2% of the GEMM's time. On CUDA a GEMM is so fast
    that the pass is not (``dense`` is the default there). Fusable: Q, K and V keep their own ranges, one (s, lo)
    pair per output row."""

    name = "dequant"
    fusable = True

    def fast_on(self, device):
        return torch.device(device).type == "cpu"

    def prepare_one(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return q.contiguous(), torch.stack([index8_step(lo, hi), lo])  # params = [s, lo], computed once

    def prepare(self, parts, dtype):
        prepared = [self.prepare_one(q, r, dtype) for q, r, _ in parts]
        params, rows = per_row_params(parts, [p for _, p in prepared])  # [N, 2]: s, lo
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).to(dtype)
        # fused parts stay the checkpoint's own tensors (a tuple; dequantized into consecutive rows): no copy
        weight = prepared[0][0] if len(parts) == 1 else tuple(w for w, _ in prepared)
        return Prepared(weight, params, bias, parts[0][0].shape[1], rows)

    def linear(self, x, p):
        w_hat = scratch(p.out_features * p.in_features, x).view(p.out_features, p.in_features)
        # (Q + 128) * s + lo in fp32: the same operations, in the same order, as quant.index8_dequantize (Q + 128.0
        # converts int8 to fp32 in the add: exact). ~0.7 ms per 768 x 3072 weight, against a ~130 ms GEMM of 3,392
        # tokens on 2 AVX2 cores: the int8 weight memory costs nothing measurable.
        row = 0
        for q in (p.weight,) if isinstance(p.weight, torch.Tensor) else p.weight:
            torch.add(q, float(-QMIN), out=w_hat[row:row + q.shape[0]])
            row += q.shape[0]
        w_hat.mul_(p.params[:, :1]).add_(p.params[:, 1:])
        return F.linear(x, w_hat if x.dtype == torch.float32 else w_hat.to(x.dtype), p.bias)

    def weight_bytes(self, p):
        return 0  # the checkpoint's own int8 tensors, counted as buffers


class DynamicInt8Index8Kernel(Index8Kernel):
    """APPROXIMATE: per-row symmetric int8 activations x ~ sx * xq, then ``s*sx*(xq Q^T) + c*rowsum(x) + b``.

    Q is used as is (exact weights); only the activations lose precision (8 bits per row). Opt-in only.
    """

    name = "int8"
    exact = False

    def unavailable(self, device):
        return None if has_int_mm() else f"torch {torch.__version__} has no torch._int_mm"

    def fast_on(self, device):
        return False  # the activation quantization runs as separate eager passes

    def prepare_one(self, q, weight_range, dtype):
        return q.contiguous(), torch.stack(index8_affine(*weight_range.float()))  # params = [s, c]

    def linear(self, x, p):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        sx = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
        xq = torch.round(x2 / sx).to(torch.int8)
        acc = int_mm(xq, p.weight.t())
        y = acc.to(torch.float32).mul_(sx * p.params[0]).add_(x2.sum(dim=1, keepdim=True) * p.params[1])
        if p.bias is not None:
            y = y.add_(p.bias)
        return y.to(x.dtype).view(*lead, y.shape[-1])


class ReferenceIndex8Kernel(Index8Kernel):
    """:func:`reference.index8_linear` (fp32 math, cast back to the activation dtype)."""

    name = "reference"

    def fast_on(self, device):
        return False

    def prepare_one(self, q, weight_range, dtype):
        return q, weight_range

    def prepare(self, parts, dtype):
        if len(parts) > 1:
            raise ValueError("index8 kernel 'reference' cannot fuse linears (fusable = False)")
        q, weight_range, bias = parts[0]
        return Prepared(q, weight_range, None if bias is None else bias.float(), q.shape[1], q.shape[0])

    def linear(self, x, p):
        return reference.index8_linear(x, p.weight, p.params, p.bias).to(x.dtype)


def index8_embedding(ids: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Gather int8 rows, then dequantize only those (same elementwise math as the QAT model)."""
    lo, hi = weight_range.float()
    rows = q.index_select(0, ids.reshape(-1))
    return index8_dequantize(rows, lo, hi, dtype).view(*ids.shape, q.shape[1])
