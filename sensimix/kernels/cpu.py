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
* ``fbgemm``  the same identity on torch's quantized engine (x86/fbgemm ``quantized::linear_dynamic``): Q
              prepacked once as a per-tensor qint8 weight (scale s, zero point 0), activations quantized per
              tensor inside the GEMM's packing (APPROXIMATE; fp32 output). CPU only.
* ``bf16``    dequantize once at load to bf16, bf16 GEMM with fp32 accumulation (AVX512-BF16); returns bf16
              whatever the activation dtype (APPROXIMATE: weights and activations rounded to 8 mantissa bits).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
        """Float activations [M, K] -> the operand of sign(x) (±1, or the int8 kernel's {0, 1} bits); an operand
        (``operand_dtype``) passes through."""
        if x.dtype == self.operand_dtype:
            return x
        return self.from_mask(x > 0)

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool ``v > 0`` -> the operand of sign(v) (see :meth:`binarize`)."""
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
        """The operand of ``sign(sign(x) @ sign(W)^T + b)`` (``sign_bias`` from ``prepare_sign_bias``)."""
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
    """±1 weights as int8, activations as {0, 1} int8 bits, ``torch._int_mm`` with int32 accumulation (exact).

    The CPU default (VNNI int8 GEMM). With b = (x > 0) in {0, 1}, sign(x) = 2b - 1, so
    ``sign(x) @ W^T = 2 (b @ W^T) - rowsum(W)``: the activation operand is the comparison's bool mask viewed as
    int8 (no ``* 2 - 1`` pass over [M, K]), and the correction costs one int32 pass over the [M, N] result, or
    nothing at all in ``linear_sign``, which folds it into the threshold. rowsum(W) (an [N] vector, ~1 ms) is
    recomputed per call rather than stored, so the weight operand stays one tensor.

    Measured on a 2-core AVX512-VNNI CPU, M=16384, K=768, N=3072 (idle machine): 92 ms, vs 121 ms for a bf16 GEMM
    (whose bf16 output would round the integers) and 434 ms fp32.
    """

    name = "int8"
    operand_dtype = torch.int8  # {0, 1}: bit = 1 for +1

    def unavailable(self, device: torch.device) -> str | None:
        return None if has_int_mm() else f"torch {torch.__version__} has no torch._int_mm"

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        return unpack_signs(bits, k, torch.int8).contiguous()  # [N, K]; used as the column-major B = w.t()

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.view(torch.int8)  # a bool is one byte, 0 or 1: a free reinterpretation

    @staticmethod
    def _wsum(w: torch.Tensor) -> torch.Tensor:
        return w.sum(dim=1, dtype=torch.int32)

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return int_mm(xs, w.t()).mul_(2).sub_(self._wsum(w))  # 2 (b @ W^T) - rowsum(W): exact in int32

    def linear_sign(self, x: torch.Tensor, w: torch.Tensor, sign_bias: torch.Tensor, k: int) -> torch.Tensor:
        # sign(x) @ W^T > t  <=>  2 (b @ W^T) - rowsum(W) > t  <=>  b @ W^T > floor((t + rowsum(W)) / 2)
        lead = x.shape[:-1]
        acc01 = int_mm(self.binarize(x.reshape(-1, x.shape[-1]), k), w.t())
        threshold = torch.div(sign_bias + self._wsum(w), 2, rounding_mode="floor")
        return self.from_mask(acc01 > threshold).view(*lead, -1)


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
    """Interface of an 8-bit index linear. ``prepare`` -> (weight operand, fp32 params); ``linear`` runs it.

    The weight operand is a tensor, or an opaque prepacked object (``fbgemm``); ``linear`` returns the activation
    dtype unless ``out_dtype`` is set (``bf16``: its output stays bf16 for the next bf16 op; the runtime's
    residual adds promote it back to the model dtype).
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    out_dtype: ClassVar[torch.dtype | None] = None  # None: the activation dtype
    fusable: ClassVar[bool] = False  # implements prepare_fused

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def prepare(self, q: torch.Tensor, weight_range: torch.Tensor,
                dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def prepare_linear(self, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor | None,
                       dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Load time, for a whole layer: (weight operand, params, the bias ``linear`` still has to add).

        The default keeps the bias apart, in the dtype the kernel adds it in; a kernel may fold it into the
        weight operand (``fbgemm`` adds it in the GEMM epilogue) and return None for it.
        """
        weight, params = self.prepare(q, weight_range, dtype)
        return weight, params, None if bias is None else bias.to(self.out_dtype or dtype)

    def prepare_fused(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                      dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Several linears reading the same input (Q, K, V) as one GEMM, outputs concatenated in ``parts`` order.

        ``parts`` are (q, weight_range, bias). Only kernels with ``fusable = True`` implement it: each part keeps
        its own range, so the fused weight is the concatenation of the parts' own operands.
        """
        raise NotImplementedError(f"index8 kernel {self.name!r} cannot fuse linears (fusable = False)")

    def linear(self, x: torch.Tensor, w: Any, params: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self, w: Any) -> int:
        """Memory of the weight operand (tensors are counted as module buffers; this covers opaque ones)."""
        return 0 if isinstance(w, torch.Tensor) else int(getattr(w, "nbytes", 0))


def _concat_parts(kernel: Index8Kernel, parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``prepare_fused`` for kernels whose weight operand is a dense matrix: concatenate the rows."""
    prepared = [kernel.prepare_linear(q, r, b, dtype) for q, r, b in parts]
    biases = [b for _, _, b in prepared]
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    return torch.cat([w for w, _, _ in prepared]), torch.stack([p for _, p, _ in prepared]), bias


class DenseIndex8Kernel(Index8Kernel):
    """Dequantize once at load to the model dtype; ``F.linear`` (bitwise the QAT model's fp32 math). CPU default."""

    name = "dense"
    fusable = True

    def prepare(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return index8_dequantize(q, lo, hi, dtype), weight_range.float()

    def prepare_fused(self, parts, dtype):
        return _concat_parts(self, parts, dtype)

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


@functools.lru_cache(maxsize=1)
def onednn_linear_ok() -> bool:
    """``torch.ops.mkldnn._linear_pointwise`` (oneDNN linear with bias and GELU in the epilogue) works here.

    It is the op torch.compile's CPU backend emits; private, so it is checked once on a tiny problem against
    ``F.linear`` + ``F.gelu`` and the ``bf16`` kernel falls back to those when it is missing or disagrees.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((5, 24), (7, 24), (7,)))
        want = F.linear(x.float(), w.float(), b.float())
        plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        tol = 0.02 * float(want.abs().max()) + 0.02  # bf16 output rounding (2^-8 relative) with margin
        return bool((plain.float() - want).abs().max() <= tol and (gelu.float() - F.gelu(want)).abs().max() <= tol)
    except Exception:  # noqa: BLE001 - a private op: any failure means "use the public ops"
        return False


class Bf16Index8Kernel(Index8Kernel):
    """APPROXIMATE: ``W_hat`` dequantized once in fp32 and rounded to bf16; bf16 GEMM (fp32 accumulation).

    Returns bf16 whatever the input dtype: in the ``fast`` model the next op (SDPA, GELU, the next bf16 linear)
    runs in bf16 too, and the residual add promotes back to fp32 before the LayerNorm. Rounding both operands to
    bf16 (8 significant bits) gives a relative error of about 2^-9 per product, i.e. ~2^-9 * |x| |w| * sqrt(K)
    on an output (random-sign rounding errors add up as a random walk).

    On CPUs with oneDNN the GEMM is ``mkldnn._linear_pointwise`` with the bias (and, through ``linear_act``, an
    erf GELU) applied in the GEMM epilogue: ``F.linear`` first broadcasts the bias into the [M, N] output (an
    extra pass) and a separate GELU is another two; measured 20-25% of the FFN intermediate's time.
    """

    name = "bf16"
    exact = False
    out_dtype = torch.bfloat16
    fusable = True
    ACTIVATIONS: ClassVar[dict[str, tuple[str, str]]] = {"gelu": ("gelu", "none"), "relu": ("relu", "")}

    def prepare(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return index8_dequantize(q, lo, hi, torch.bfloat16), weight_range.float()

    def prepare_fused(self, parts, dtype):
        return _concat_parts(self, parts, dtype)

    def fuses_activation(self, act: str, device: torch.device) -> bool:
        """Whether ``linear_act`` computes ``act`` (a transformers ACT2FN name) in the GEMM epilogue."""
        return act in self.ACTIVATIONS and torch.device(device).type == "cpu" and onednn_linear_ok()

    def linear(self, x, w, params, bias):
        return self.linear_act(x, w, params, bias, None)

    def linear_act(self, x: torch.Tensor, w: torch.Tensor, params: torch.Tensor, bias: torch.Tensor | None,
                   act: str | None) -> torch.Tensor:
        """``act(x @ W_hat^T + b)`` in bf16; ``act`` None or one that :meth:`fuses_activation` accepts."""
        x = x.to(torch.bfloat16)
        b = None if bias is None else bias.to(torch.bfloat16)
        if x.device.type == "cpu" and onednn_linear_ok():
            attr, algorithm = self.ACTIVATIONS[act] if act else ("none", "")
            lead = x.shape[:-1]
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, attr, [], algorithm)
            return y.view(*lead, -1)
        y = F.linear(x, w, b)
        if act is None:
            return y
        return F.gelu(y) if act == "gelu" else F.relu(y)


# ---------------------------------------------------------------------------------------------------
# torch's quantized engine (fbgemm) for the 8-bit linears
# ---------------------------------------------------------------------------------------------------
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
    probe fails gives ``engine=None`` and the reason (the ``fast`` precision then falls back to ``bf16``).
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


@dataclass(frozen=True, eq=False)  # holds a script object and maybe a tensor
class PackedIndex8:
    """8-bit weights prepacked for fbgemm: ``W_hat = s*Q + c`` with Q, s (and the bias) inside ``packed``."""

    packed: Any  # torch's LinearPackedParamsBase (a script object, not a tensor)
    c: float | torch.Tensor  # c = 128*s + lo, added as c * rowsum(x); a [N] vector for fused (per-row) weights
    reduce_range: bool
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        # int8 Q plus fbgemm's int32 column offsets and the fp32 bias (an estimate: the packed layout is opaque)
        return self.out_features * (self.in_features + 8)


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

    def _pack(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
              ) -> tuple[PackedIndex8, torch.Tensor]:
        qe = quantized_engine()
        if qe.engine is None:
            raise RuntimeError(f"index8 kernel 'fbgemm' is unavailable: {qe.reason}")
        scales, offsets, rows = [], [], []
        for q, weight_range, _ in parts:
            lo, hi = weight_range.float().cpu()
            s = index8_step(lo, hi)
            scales.append(s)
            offsets.append(-QMIN * s + lo)
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
        return PackedIndex8(packed, c, qe.reduce_range, *q.shape), params.squeeze(0)

    def prepare(self, q, weight_range, dtype):
        return self._pack([(q, weight_range, None)])

    def prepare_linear(self, q, weight_range, bias, dtype):
        w, params = self._pack([(q, weight_range, bias)])
        return w, params, None

    def prepare_fused(self, parts, dtype):
        w, params = self._pack(parts)
        return w, params, None

    def linear(self, x, w: PackedIndex8, params, bias):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, w.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()  # linear_dynamic takes fp32 activations only
        y = torch.ops.quantized.linear_dynamic(x2, w.packed, w.reduce_range)
        if isinstance(w.c, torch.Tensor):
            y = y.addr_(x2.sum(dim=1), w.c)  # per-row c: a rank-1 update, no [M, N] temporary
        elif w.c != 0.0:
            y = y.add_(x2.sum(dim=1, keepdim=True), alpha=w.c)  # scalar c: no [M, N] temporary either
        if bias is not None:
            y = y.add_(bias)
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, w.out_features)


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
