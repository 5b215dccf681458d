"""Quantization primitives: 8-bit index quantization, sign, bit packing and straight-through estimators.

Pure functions on tensors; no modules, no training logic. Conventions used everywhere in the package:

* 8-bit index quantization is per tensor and asymmetric (SENSIMIX.md section 2)::

      s = (hi - lo) / 255;  Q = round((W - lo) / s) - 128;  W_hat = (Q + 128) * s + lo

  ``lo``/``hi`` are rounded to fp16 *before* use, because the checkpoint stores them as fp16: the
  quantization-aware model then computes exactly what the exported checkpoint reproduces.
* ``sign(v) = +1 if v > 0 else -1`` (0 maps to -1). With this choice sign(GELU(z)) == sign(z) for every
  float z (GELU(z) > 0 iff z > 0), so the GELU between two 1-bit FFN linears can be skipped exactly.
* Packed sign bits: bit = 1 for +1, bit = 0 for -1, little-endian within a byte (bit j of byte i holds
  element 8*i + j) along the last dimension, zero-padded to a whole byte.
"""

from __future__ import annotations

import torch

LEVELS = 255  # 8-bit index quantization uses 256 levels, i.e. 255 steps
QMIN, QMAX = -128, 127


# ---------------------------------------------------------------------------------------------------
# 8-bit index quantization
# ---------------------------------------------------------------------------------------------------
def index8_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (lo, hi) as fp32 scalars holding fp16-representable values (the stored form)."""
    lo = w.detach().min().to(torch.float16).to(torch.float32)
    hi = w.detach().max().to(torch.float16).to(torch.float32)
    return lo, hi


def index8_step(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Step size s = (hi - lo) / 255; a constant tensor (hi == lo) gets s = 1 so Q is all -128."""
    s = (hi.float() - lo.float()) / LEVELS
    return torch.where(s > 0, s, torch.ones_like(s))


def index8_quantize(
    w: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to int8 indices. Returns ``(q, lo, hi)`` with ``q`` int8 in [-128, 127]."""
    if not w.is_floating_point():
        raise TypeError(f"index8_quantize expects a floating-point tensor, got {w.dtype}")
    if lo is None or hi is None:
        lo, hi = index8_range(w)
    s = index8_step(lo, hi)
    q = torch.round((w.detach().float() - lo) / s).clamp_(0, LEVELS) + QMIN
    return q.to(torch.int8), lo, hi


def index8_affine(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, c) with W_hat = s * Q + c for the int8 indices Q themselves: c = 128 * s + lo (kernels that multiply
    Q as stored add c * rowsum(x))."""
    s = index8_step(lo, hi)
    return s, -QMIN * s + lo


def index8_dequantize(
    q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W_hat = (Q + 128) * s + lo, computed in fp32 and cast to ``dtype``: in place on one fp32 copy of Q (the
    same ops in the same order, bit for bit; a batch's embedding rows made three fresh temporaries otherwise),
    unless autograd records the range."""
    s = index8_step(lo, hi)
    if torch.is_grad_enabled() and (s.requires_grad or lo.requires_grad):
        return ((q.float() - QMIN) * s + lo.float()).to(dtype)
    return q.to(torch.float32, copy=True).sub_(QMIN).mul_(s).add_(lo.float()).to(dtype)


def index8_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize in one step (no gradient handling)."""
    q, lo, hi = index8_quantize(w)
    return index8_dequantize(q, lo, hi, w.dtype)


# ---------------------------------------------------------------------------------------------------
# sign and bit packing
# ---------------------------------------------------------------------------------------------------
def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where x > 0, else -1 (0 and -0 map to -1), in x's dtype."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, -one)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack sign(x) along the last dim into uint8 (bit=1 for x > 0), zero-padding K up to a multiple of 8.

    The caller keeps K (the unpadded length): ``unpack_signs(pack_signs(x), x.shape[-1])``.
    """
    k = x.shape[-1]
    if k == 0:
        raise ValueError("pack_signs: the last dimension is empty; nothing to pack")
    bits = (x > 0).to(torch.uint8)
    pad = (-k) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], (k + pad) // 8, 8)  # explicit: -1 cannot be inferred for 0 rows
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=x.device))
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack uint8 bytes to a {0, 1} uint8 tensor with last dim ``k``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 packed bits, got {packed.dtype}")
    nbytes = packed.shape[-1]
    if not 0 < k <= nbytes * 8 or k <= (nbytes - 1) * 8:
        raise ValueError(f"unpack_bits: {nbytes} packed bytes cannot hold k={k} elements (needs ceil(k/8) bytes)")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], nbytes * 8)[..., :k]


def unpack_signs(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a ±1 tensor of ``dtype`` with last dim ``k``."""
    bits = unpack_bits(packed, k)
    return (bits.to(dtype) * 2 - 1).to(dtype)


# ---------------------------------------------------------------------------------------------------
# straight-through estimators (training)
# ---------------------------------------------------------------------------------------------------
class _Index8STE(torch.autograd.Function):
    """Forward: quantize-dequantize. Backward: identity (straight-through to the fp32 master weight)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return index8_fake_quant(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _Fp16STE(torch.autograd.Function):
    """Forward: the fp16 value (what the checkpoint stores), in the input's dtype. Backward: identity."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return t.to(torch.float16).to(t.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _SignInputSTE(torch.autograd.Function):
    """Forward: sign(x). Backward: identity (the input STE of SENSIMIX.md section 3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _SignWeightSTE(torch.autograd.Function):
    """Forward: sign(w). Backward: grad * 1[|w| <= 1] (hardtanh STE; reference bug 2 fixed)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        return sign(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def ste_index8(w: torch.Tensor) -> torch.Tensor:
    """8-bit index fake-quantization with identity straight-through gradient."""
    return _Index8STE.apply(w)


def ste_fp16(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` rounded to fp16 (the checkpoint stores biases, LayerNorms, token types, pooler and classifier in fp16)
    with an identity straight-through gradient to the fp32 master value; None passes through."""
    return None if t is None else _Fp16STE.apply(t)


def ste_sign_input(x: torch.Tensor) -> torch.Tensor:
    """Binarize activations with an identity straight-through gradient."""
    return _SignInputSTE.apply(x)


def ste_sign_weight(w: torch.Tensor) -> torch.Tensor:
    """Binarize weights with the hardtanh straight-through gradient (|w| <= 1)."""
    return _SignWeightSTE.apply(w)


def abwr(w: torch.Tensor) -> torch.Tensor:
    """Absolute Binary Weight Regularization: mean((|W| - 1)^2)."""
    return (w.abs() - 1).pow(2).mean()
