"""The A8 arithmetic: what a checkpoint with ``activation_quant = "a8"`` computes, specified once, in torch.

An A8 model quantizes the input of every 8-bit linear to 8-bit integers, row by row (token by token), and runs
the linear as an exact integer product with a fixed float epilogue. Integer sums are exact on every device, so
the trained model and every kernel that deploys it compute the same numbers -- provided the float operations
around the integer products are specified too. They are, here: each function below is a sequence of IEEE fp32
operations (each correctly rounded, none fused into an FMA) or a sum taken in fp64 and rounded once to fp32. The
quantization-aware model computes these functions in eval mode, the packed runtime's torch path calls them, and
the C and Triton kernels implement them and are tested bit for bit against them.

Why the neighbours of the integer products are specified as well: a row is rounded to 255 steps, so any other
rounding of its input (a LayerNorm summed in another order, an erf of another library) moves some value across a
rounding boundary with a probability of ~1e-6 per element, that is in a few rows of every batch; the integer
changes by one and the 1-bit FFNs downstream amplify it. Sums in fp64 rounded once to fp32 agree between
implementations unless the exact sum lies within ~2^-50 of an fp32 rounding boundary (about once in 10^7 rows).

The rules (fp32 unless said; ``rint`` rounds half to even):

* **quantize a row** x[0..K): ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``d = hi - lo``. A row holding NaN or
  inf, or whose ``d`` is not finite, gives NaN outputs (``scale = NaN``, ``q = zero = 0``). ``d < 2^-100``: the
  zero row (``scale = 0``, ``q = zero = 0``). Else ``inv = 255 / d``, ``zero = clamp(rint(-lo * inv), 0, 255)``,
  ``q_j = clamp(rint(x_j * inv) + zero, 0, 255)`` (uint8), ``scale = d / 255``; the centred integers are
  ``c_j = q_j - zero`` (in [-255, 255]) and ``total = sum_j c_j``. So ``x_j ~ scale * c_j``, and 0 is exact.
* **the linear** with int8 indices Q [N, K] and the weight's (s, c) (``W_hat = s * Q + c``: ``s = (hi - lo) / 255``
  of the fp16 range, ``c = 128 * s + lo``; :func:`sensimix.quant.index8_affine`) and fp16 bias b:
  ``A_n = sum_j c_j Q_nj`` (exact int32: |A| <= 255 * 128 * K < 2^31 for K <= 65,536), then
  ``y_n = ((f32(A_n) * s_n + f32(total) * c_n) * scale) + b_n``, in that order, five roundings.
* **LayerNorm**: ``mean = f32(sum x / n)`` and ``var = f32(sum (x - mean)^2 / n)`` in fp64 (mean taken back to
  fp64 first), ``rstd = 1 / sqrt(var + f32(eps))`` (IEEE's correctly rounded square root),
  ``y = ((x - mean) * rstd) * w + b``.
* **GELU** (the erf GELU to 1.5e-7 absolute in erf): Abramowitz-Stegun 7.1.26 for erfc with a Cephes-style exp;
  the exact sequence is :func:`gelu` (``|x| >= 12.73`` gives ``x`` or 0: no subnormal ever occurs).
* **attention** (per head, queries q, keys k, values v): ``s = f32(q . k in fp64) * scale``; masked keys -inf;
  ``e = exp(s - max s)`` by the GELU's exp (:func:`exp_neg`; 0 below -80); ``p = e / f32(sum e in fp64)``;
  ``out = f32(sum p v in fp64)``.

* **the head**: the pooler and classifier linears ``f32(x . w + b)`` with the sum and the bias in fp64, the pooler's
  ``tanh = f32(tanh(f64(x)))``: logits too are the same bits in every implementation.

Everything else of an A8 model is as in every SensiMix model: 8-bit embeddings gathered and dequantized, 1-bit FFNs
(exact integers), residual adds (fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .quant import index8_affine, index8_dequantize, index8_quantize, ste_fp16

LEVELS = 255
TINY_RANGE = 2.0 ** -100    # a row spanning less is the zero row (255 / d would overflow near 2^-120)
EXACT_CHUNK = 512           # K per fp32 GEMM in int_matmul: 512 * 255 * 128 < 2^24, so every partial sum is exact


class Rows(NamedTuple):
    """A quantized [M, K] activation: q uint8 [M, K], zero int32 [M], scale fp32 [M], total int32 [M]."""

    q: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor
    total: torch.Tensor

    def centred(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q - zero`` as ``dtype`` (exact: integers in [-255, 255])."""
        return (self.q.to(torch.int32) - self.zero[:, None]).to(dtype)

    def dequantized(self) -> torch.Tensor:
        """``scale * (q - zero)``, fp32: what the rounded row stands for (the straight-through input's value)."""
        return self.centred() * self.scale[:, None]


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def quantize_rows(x: torch.Tensor) -> Rows:
    """The A8 rule (module docstring) applied to every row of ``x`` [..., K] (fp32), flattened to [M, K]."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    if x2.shape[1] == 0:
        raise ValueError("quantize_rows: rows of zero length")
    lo = x2.amin(-1).clamp(max=0.0)
    hi = x2.amax(-1).clamp(min=0.0)
    d = hi - lo
    finite = torch.isfinite(x2).all(-1) & torch.isfinite(d)
    live = finite & (d >= TINY_RANGE)
    inv = torch.where(live, _f32(LEVELS, d) / torch.where(live, d, torch.ones_like(d)), torch.zeros_like(d))
    zero = torch.round(-lo * inv).clamp(0, LEVELS)
    zero = torch.where(live, zero, torch.zeros_like(zero))
    q = (torch.round(x2 * inv[:, None]) + zero[:, None]).clamp(0, LEVELS)
    q = torch.where(live[:, None], q, torch.zeros_like(q)).to(torch.uint8)
    scale = torch.where(live, d / _f32(LEVELS, d), torch.where(finite, torch.zeros_like(d),
                                                                torch.full_like(d, math.nan)))
    zero_i = zero.to(torch.int32)
    total = (q.to(torch.int64).sum(-1) - zero_i.to(torch.int64) * x2.shape[1]).to(torch.int32)
    return Rows(q, zero_i, scale, total)


def int_matmul(centred: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``centred @ q^T`` exactly (fp32 for K <= 512, else fp64) [M, N], for integer-valued fp32 operands: centred in [-255, 255] [M, K],
    int8 indices q [N, K]. fp32 GEMMs over chunks of :data:`EXACT_CHUNK` columns (every partial sum is an integer
    below 2^24, so any summation order is exact; TF32 and bf16 tensor cores hold these integers exactly too), summed
    in fp64 (exact below 2^53)."""
    k = centred.shape[-1]
    w = q.to(torch.float32)
    if k <= EXACT_CHUNK:  # one GEMM: its fp32 result holds the integers exactly already
        return centred @ w.t()
    acc = None
    for k0 in range(0, k, EXACT_CHUNK):
        part = (centred[:, k0:k0 + EXACT_CHUNK] @ w[:, k0:k0 + EXACT_CHUNK].t()).double()
        acc = part if acc is None else acc + part
    return acc


def linear_epilogue(acc: torch.Tensor, rows: Rows, s: torch.Tensor, c: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``((f32(A) * s + f32(total) * c) * scale) + b``, fp32 [M, N], from the exact integers ``acc`` [M, N] (any
    dtype holding them exactly), the rows' ``total`` and ``scale``, the weight's per-output ``s``, ``c`` [N] (or
    scalars) and the fp32 value of the fp16 bias [N] (or None)."""
    t1 = acc.to(torch.float32) * s
    t2 = rows.total.to(torch.float32)[:, None] * c
    y = (t1 + t2) * rows.scale[:, None]
    return y if bias is None else y + bias


def linear(x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The A8 linear of ``x`` [..., K] with stored int8 indices ``q`` [N, K], fp16 ``[lo, hi]`` and fp16 ``bias``:
    the definition every A8 kernel is tested against (any device)."""
    rows = quantize_rows(x)
    s, c = index8_affine(*weight_range.float())
    y = linear_epilogue(int_matmul(rows.centred(), q), rows, s, c, None if bias is None else bias.float())
    return y.view(*x.shape[:-1], q.shape[0])


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension with fp64 moments rounded to fp32 (module docstring), fp32."""
    x = x.float()
    xd, n = x.double(), x.shape[-1]
    mean = (xd.sum(-1, keepdim=True) / n).float()  # a division, as the rule says (a mean may multiply by 1/n)
    diff = xd - mean.double()
    var = ((diff * diff).sum(-1, keepdim=True) / n).float()
    # the correctly rounded fp32 square root: torch's fp32 sqrt on CPU is not (17% of values differ from IEEE's
    # by an ulp, measured); an fp64 root rounded to fp32 is, for every fp32 input (53 >= 2 * 24 + 2 bits)
    rstd = 1.0 / torch.sqrt((var + _f32(eps, x)).double()).float()
    return ((x - mean) * rstd) * weight.float() + bias.float()


# Abramowitz-Stegun 7.1.26 (erfc(z) = t * poly(t) * exp(-z^2), t = 1 / (1 + P z), |error of erf| <= 1.5e-7)
_P, _SQRT_HALF = 0.3275911, 0.70710678118654752
_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # a5 .. a1 (Horner order)
# exp(y) = 2^n * e^r, n = floor(y log2 e + 1/2), r = y - n ln 2 (ln 2 = C1 + C2), e^r by Cephes' expf polynomial
_LOG2E, _C1, _C2 = 1.44269504088896341, 0.693359375, -2.12194440e-4
_E = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_Z_MAX = 9.0                # erfc(9) ~ 4e-37: beyond, erfc := 0 (GELU = x or 0); keeps exp's result normal
_FLUSH = -80.0              # the softmax's exp is 0 below


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n for integer-valued fp32 n in [-126, 127], exactly (the float's bits)."""
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def exp_neg(y: torch.Tensor) -> torch.Tensor:
    """exp(y) for fp32 y in [-81, 0] by a fixed sequence of fp32 operations (Cephes' expf: 2^n e^r); exact
    powers of two, no subnormal result."""
    one, half = _f32(1.0, y), _f32(0.5, y)
    n = torch.floor(y * _f32(_LOG2E, y) + half)   # in [-117, 0]
    r = (y - n * _f32(_C1, y)) - n * _f32(_C2, y)
    e = _f32(_E[0], y)
    for coefficient in _E[1:]:
        e = e * r + _f32(coefficient, y)
    return (e * (r * r) + (r + one)) * _pow2(torch.where(torch.isfinite(n), n, torch.zeros_like(n)))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The A8 GELU, fp32: ``x * (1 + erf(x / sqrt 2)) / 2`` by exactly this sequence of fp32 operations."""
    x = x.float()
    one, two, half = _f32(1.0, x), _f32(2.0, x), _f32(0.5, x)
    z = x.abs() * _f32(_SQRT_HALF, x)
    beyond = z > _f32(_Z_MAX, x)
    z = torch.where(beyond, _f32(_Z_MAX, x), z)  # NaN stays NaN (the comparison is false)
    t = one / (one + _f32(_P, x) * z)
    poly = _f32(_A[0], x)
    for a in _A[1:]:
        poly = poly * t + _f32(a, x)
    poly = poly * t
    erfc = torch.where(beyond, torch.zeros_like(x), poly * exp_neg(-(z * z)))  # -(z z) in [-81, 0]
    return (half * x) * torch.where(x < 0, erfc, two - erfc)


def softmax_exp(d: torch.Tensor) -> torch.Tensor:
    """The softmax's exp(d) for d = score - row maximum <= 0: :func:`exp_neg`, and 0 below -80 (-inf included;
    e^-80 ~ 2e-35 of the row's largest term)."""
    flush = ~(d >= _f32(_FLUSH, d))
    e = exp_neg(torch.where(flush, torch.zeros_like(d), d))
    return torch.where(flush, torch.zeros_like(d), e)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Softmax attention [..., Lq, d] of queries [..., Lq, d] over keys/values [..., Lk, d]; ``keep`` (bool,
    broadcastable to [..., Lq, Lk]) marks the keys each query attends; fp32 with fp64 sums (module docstring)."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)).float() * _f32(scale, q)
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    e = softmax_exp(s - s.amax(-1, keepdim=True))
    p = e / e.double().sum(-1, keepdim=True).float()
    return torch.matmul(p.double(), v.double()).float()


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A float linear of the head (pooler, classifier): ``f32(x . w + b)`` with the sum and the bias in fp64."""
    y = x.double() @ weight.double().t()
    return (y if bias is None else y + bias.double()).float()


def tanh(x: torch.Tensor) -> torch.Tensor:
    """The pooler's tanh: ``f32(tanh(f64(x)))``."""
    return torch.tanh(x.double()).float()


# ---------------------------------------------------------------------------------------------------
# training: the rules above in the forward, the float operations' gradients in the backward
# ---------------------------------------------------------------------------------------------------
class _Linear(torch.autograd.Function):
    """Forward: :func:`linear` of the weight's 8-bit indices and the fp16 bias (the deployed arithmetic, exactly),
    computed by ``compute`` (default :func:`linear`; a caller may pass a kernel's, which gives the same bits).
    Backward: straight through both roundings -- the gradients of ``x_hat @ W_hat^T + b`` with ``x_hat`` the
    dequantized rows and ``W_hat`` the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                compute: Callable | None) -> torch.Tensor:
        q, lo, hi = index8_quantize(weight)
        weight_range = torch.stack([lo, hi]).to(torch.float16)
        b16 = None if bias is None else bias.detach().to(torch.float16)
        y = (compute or linear)(x.detach().float(), q, weight_range, b16)
        rows = quantize_rows(x)  # what the backward's x_hat is: the rows the forward rounded
        ctx.save_for_backward(rows.q, rows.zero, rows.scale, q, lo, hi)
        ctx.has_bias, ctx.lead = bias is not None, x.shape[:-1]
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rq, zero, scale, q, lo, hi = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        w_hat = index8_dequantize(q, lo, hi)
        x_hat = (rq.to(torch.int32) - zero[:, None]).float() * scale[:, None]
        grad_x = (g @ w_hat).view(*ctx.lead, w_hat.shape[1]) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x_hat if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def ste_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               compute: Callable | None = None) -> torch.Tensor:
    """The A8 linear of a fake-quantized 8-bit layer (fp32 master ``weight``, ``bias``), straight-through.
    ``compute(x, q, weight_range, bias)``: what computes the forward (default :func:`linear`)."""
    return _Linear.apply(x, weight, bias, compute)


class _Specified(torch.autograd.Function):
    """Forward: a specified function (the deployed rounding). Backward: the gradient of its float twin,
    recomputed (the two differ by float rounding only)."""

    @staticmethod
    def forward(ctx, fn: Callable, float_twin: Callable, *args: object) -> torch.Tensor:  # type: ignore[override]
        ctx.float_twin = float_twin
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        return fn(*args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        tensors, args, live = iter(ctx.saved_tensors), [], []
        for i, (is_tensor, other) in enumerate(zip(ctx.is_tensor, ctx.others)):
            if not is_tensor:
                args.append(other)
                continue
            t = next(tensors).detach()
            if ctx.needs_input_grad[2 + i]:
                t.requires_grad_(True)
                live.append(t)
            args.append(t)
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(ctx.float_twin(*args), live, grad, allow_unused=True))
        return (None, None, *[next(grads) if is_tensor and ctx.needs_input_grad[2 + i] else None
                              for i, is_tensor in enumerate(ctx.is_tensor)])


def specified(fn: Callable, float_twin: Callable, *args: object) -> torch.Tensor:
    """``fn(*args)``; where autograd records, with the gradient of ``float_twin`` (same arguments)."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _Specified.apply(fn, float_twin, *args)
    return fn(*args)


def _float_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def _float_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def eval_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`layer_norm` of the fp16-stored ``weight``/``bias`` (gradients straight through)."""
    return specified(layer_norm, _float_layer_norm, x, ste_fp16(weight), ste_fp16(bias), eps)


def eval_gelu(x: torch.Tensor) -> torch.Tensor:
    """:func:`gelu` (gradients of the erf GELU)."""
    return specified(gelu, F.gelu, x)


def eval_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`dense` of the fp16-stored ``weight``/``bias`` (gradients of F.linear, straight through)."""
    return specified(dense, F.linear, x, ste_fp16(weight), ste_fp16(bias))


def eval_tanh(x: torch.Tensor) -> torch.Tensor:
    """:func:`tanh` (gradients of torch.tanh)."""
    return specified(tanh, torch.tanh, x)


def eval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """:func:`attention` (gradients of SDPA)."""
    return specified(attention, _float_attention, q, k, v, keep, scale)
