"""torch's quantized engine (x86/fbgemm) for the 8-bit linears: dynamic int8 GEMMs (APPROXIMATE), CPU only.

Quantized tensors are deprecated in torch, so everything here is probed once per process
(:func:`quantized_engine`) and the ``fbgemm`` kernel reports itself unavailable, with the reason, where the
probe fails.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import index8_affine
from .base import BinaryKernel, Index8Kernel, Index8Part, Prepared

FBGEMM_ENGINES = ("x86", "fbgemm")  # both run quantized::linear_dynamic on fbgemm


@dataclass(frozen=True)
class QuantizedEngine:
    """What :func:`quantized_engine` found: the engine to prepack with, or why there is none."""

    engine: str | None
    reduce_range: bool = False
    reason: str | None = None


@contextlib.contextmanager
def _use_engine(engine: str) -> Iterator[None]:
    """Prepack under ``engine`` and restore the process-wide setting after (a packed weight keeps its engine)."""
    old = torch.backends.quantized.engine
    if old != engine:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        if old != engine:
            torch.backends.quantized.engine = old


def _qint8(q: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``q`` as a qint8 tensor with zero point 0: per tensor (a float scale) or per output row (a [N] scale).

    Quantized tensors are deprecated in torch; this one is only the input format of ``linear_prepack`` and does
    not outlive the load, so its deprecation warning is silenced here (:func:`quantized_engine` checks that the
    whole path still works).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions.*deprecated",
                                category=UserWarning)
        if isinstance(scale, torch.Tensor):
            zeros = torch.zeros(q.shape[0], dtype=torch.long)
            return torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch._make_per_tensor_quantized_tensor(q, scale, 0)


def _prepack(q: torch.Tensor, scale: float | torch.Tensor, bias: torch.Tensor | None, engine: str) -> Any:
    with _use_engine(engine):
        return torch.ops.quantized.linear_prepack(_qint8(q, scale), bias)


def _probe_error(engine: str, reduce_range: bool) -> float:
    """Largest error of ``linear_dynamic`` on a problem that overflows int16 pair sums, relative to |x|·|W|.

    fbgemm's non-VNNI AVX2/AVX512 kernels add pairs of u8*s8 products in saturating int16 (``vpmaddubsw``):
    255 * 127 * 2 > 32767 clips. ``reduce_range=True`` (7-bit activations) avoids that at twice the rounding
    error; VNNI (``vpdpbusd``) accumulates in int32 and needs no reduction. The probe tells which case we are in
    instead of guessing it from CPU flags: all-positive activations near the top of their range against
    extreme weights saturate by ~50% of the output if pair sums clip, while the 8-bit rounding error is <1%.
    """
    g = torch.Generator().manual_seed(0)
    k = 64
    x = torch.rand(4, k, generator=g) + 1.0
    x[:, 0] = 0.0  # the range starts at 0, so x near 2 quantizes near 255
    q = torch.full((3, k), 127, dtype=torch.int8)
    q[1] = -128
    q[2] = torch.randint(-128, 128, (k,), generator=g, dtype=torch.int8)
    y = torch.ops.quantized.linear_dynamic(x, _prepack(q, 0.01, None, engine), reduce_range)
    want = x.double() @ (q.double() * 0.01).t()
    scale = x.double().abs() @ (q.double().abs() * 0.01).t()
    return float(((y.double() - want).abs() / scale).max())


@functools.lru_cache(maxsize=1)
def quantized_engine() -> QuantizedEngine:
    """The x86/fbgemm engine for the ``fbgemm`` kernel and its ``reduce_range``, checked once per process.

    Never raises: a torch without quantized ops (they are deprecated), without an fbgemm engine, or whose
    probe fails gives ``engine=None`` and the reason (the 1-bit default then falls back to ``float``).
    """
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not hasattr(torch, "_make_per_tensor_quantized_tensor"):
        return QuantizedEngine(None, reason=f"torch {torch.__version__} has no quantized linear_dynamic ops")
    engines = [e for e in FBGEMM_ENGINES if e in torch.backends.quantized.supported_engines]
    if not engines:
        return QuantizedEngine(None, reason=f"no fbgemm quantized engine in this torch build (supported: "
                                            f"{torch.backends.quantized.supported_engines})")
    engine = engines[0]
    try:
        # full 8-bit activations when the engine does not saturate them, else the 7-bit range
        for reduce_range in (False, True):
            err = _probe_error(engine, reduce_range)
            if err < 0.02:
                return QuantizedEngine(engine, reduce_range=reduce_range)
    except Exception as exc:  # noqa: BLE001 - deprecated subsystem: any failure means "not available here"
        return QuantizedEngine(None, reason=f"quantized engine {engine!r} failed its self-test: "
                                            f"{type(exc).__name__}: {exc}")
    return QuantizedEngine(None, reason=f"quantized engine {engine!r} failed its accuracy self-test "
                                        f"(relative error {err:.3f} even with reduce_range=True)")


@dataclass(frozen=True, eq=False)  # holds a script object
class Prepacked:
    """An int8 weight prepacked for fbgemm's dynamic linear, with what the kernel needs to call it."""

    packed: Any  # torch's LinearPackedParamsBase (a script object, not a tensor)
    reduce_range: bool
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        # int8 weight plus fbgemm's int32 column offsets and the fp32 bias (an estimate: the layout is opaque)
        return self.out_features * (self.in_features + 8)


@dataclass(frozen=True, eq=False)
class PackedIndex8(Prepacked):
    """8-bit weights prepacked for fbgemm: ``W_hat = s*Q + c`` with Q, s (and the bias) inside ``packed``."""

    c: float | torch.Tensor  # c = 128*s + lo, added as c * rowsum(x); a [N] vector for fused (per-row) weights


class FbgemmIndex8Kernel(Index8Kernel):
    """APPROXIMATE: ``x W_hat^T + b = s * (x Q^T) + c * rowsum(x) + b`` on fbgemm's dynamic int8 linear.

    Q is exact (an int8 weight with scale s, zero point 0); only the activations are rounded: fbgemm quantizes x
    per tensor, asymmetric, to 8 bits (7 with ``reduce_range``; see :func:`quantized_engine`), i.e. a step of
    (max(x, 0) - min(x, 0)) / 255. The ``c * rowsum(x)`` term is computed in fp32 from the unrounded x. The
    error of an output is then about step/sqrt(12) * s * |Q| * sqrt(K): ~1e-3 of |x|max·|W|max·sqrt(K).
    Fused linears (Q, K, V) use a per-row scale and a per-row c, one row block per part.
    """

    name = "fbgemm"
    exact = False
    fusable = True

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return "torch's quantized engines (fbgemm) run on CPU only"
        return quantized_engine().reason

    def prepare(self, parts: Sequence[Index8Part], dtype: torch.dtype) -> Prepared:
        qe = quantized_engine()
        if qe.engine is None:
            raise RuntimeError(f"index8 kernel 'fbgemm' is unavailable: {qe.reason}")
        scales, offsets, rows = [], [], []
        for q, weight_range, _ in parts:
            s, c = index8_affine(*weight_range.float().cpu())
            scales.append(s)
            offsets.append(c)
            rows.append(q.shape[0])
        q = torch.cat([q for q, _, _ in parts]).cpu().contiguous()
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).float().cpu().contiguous()
        params = torch.stack([torch.stack(scales), torch.stack(offsets)], dim=1)  # [parts, 2] = (s, c)
        if len(parts) == 1:
            scale, c = float(scales[0]), float(offsets[0])
        else:
            n = torch.tensor(rows)
            scale = torch.repeat_interleave(torch.stack(scales), n)
            c = torch.repeat_interleave(torch.stack(offsets), n)
        packed = _prepack(q, scale, bias, qe.engine)  # the bias is added in fbgemm's epilogue
        weight = PackedIndex8(packed, qe.reduce_range, *q.shape, c=c)
        return Prepared(weight, params.squeeze(0), None, q.shape[1], q.shape[0])

    def linear(self, x, p):
        w: PackedIndex8 = p.weight
        lead = x.shape[:-1]
        x2 = x.reshape(-1, w.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()  # linear_dynamic takes fp32 activations only
        y = torch.ops.quantized.linear_dynamic(x2, w.packed, w.reduce_range)
        if isinstance(w.c, torch.Tensor):
            y = y.addr_(x2.sum(dim=1), w.c)  # per-row c: a rank-1 update, no [M, N] temporary
        elif w.c != 0.0:
            y = y.add_(x2.sum(dim=1, keepdim=True), alpha=w.c)  # scalar c: no [M, N] temporary either
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, w.out_features)


# ---------------------------------------------------------------------------------------------------
# the 1-bit linear on fbgemm: exact
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PackedSigns(Prepacked):
    """±1 weights prepacked for fbgemm (a qint8 weight with scale 1), and their row sums."""

    rowsum: torch.Tensor  # [N] fp32: sum of each ±1 row (an integer)


class FbgemmBinaryKernel(BinaryKernel):
    """±1 products on fbgemm's int8 GEMM, EXACT: activations enter as b = (x > 0) in {0, 1}, which fbgemm's
    dynamic quantization represents exactly (the range [0, 1] puts 1 on its top level, 0 on zero), weights are
    ±1 int8 with scale 1, sums are int32. The fp32 result is that integer times fbgemm's scale product, within
    1e-6 relative of it, so rounding it gives the integer back; sign(x) @ W^T = 2 (b @ W^T) - rowsum(W).

    The 1-bit default on x86 CPUs without VNNI/AMX (where ``torch._int_mm`` is a slow loop) that cannot run
    ``popcount`` (no AVX2, or no C compiler): measured 1.5-1.8x an fp32 GEMM of the same shape on a 2-core AVX2
    EPYC, where ``popcount`` is another 3-4x (no saturation: pair sums of u8 x ±1 stay far below 2^15).
    """

    name = "fbgemm"
    operand_dtype = torch.float32  # {0, 1}
    acc_dtype = torch.float32       # integers, exactly

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return "torch's quantized engines (fbgemm) run on CPU only"
        return quantized_engine().reason

    def fast_on(self, device):
        from ..devices import cpu_has_vnni

        return torch.device(device).type == "cpu" and quantized_engine().engine is not None and not cpu_has_vnni()

    def prepare_weight(self, bits, k):
        from ..quant import unpack_signs

        qe = quantized_engine()
        if qe.engine is None:
            raise RuntimeError(f"binary kernel 'fbgemm' is unavailable: {qe.reason}")
        signs = unpack_signs(bits.cpu(), k, torch.int8).contiguous()
        return PackedSigns(_prepack(signs, 1.0, None, qe.engine), qe.reduce_range, signs.shape[0], k,
                           rowsum=signs.sum(dim=1, dtype=torch.int32).float())

    def binarize(self, x, k):
        return self.from_mask(x > 0)  # {0, 1} operands are their own mask: always binarize

    def from_mask(self, mask):
        return mask.to(torch.float32)

    def _acc01(self, xs: torch.Tensor, w: PackedSigns) -> torch.Tensor:
        """b @ W^T as exact integers (fp32)."""
        return torch.ops.quantized.linear_dynamic(xs, w.packed, w.reduce_range).round_()

    def dot(self, xs, w, k):
        return self._acc01(xs, w).mul_(2).sub_(w.rowsum)

    def linear_sign(self, x, w, sign_bias, k):
        # sign(x) @ W^T > t  <=>  b @ W^T > floor((t + rowsum(W)) / 2): one comparison, no correction pass
        lead = x.shape[:-1]
        acc01 = self._acc01(self.binarize(x.reshape(-1, x.shape[-1]), k), w)
        threshold = torch.div(sign_bias.float() + w.rowsum, 2, rounding_mode="floor")
        return self.from_mask(acc01 > threshold).view(*lead, acc01.shape[-1])
