"""The kernel interfaces: every method the inference runtime calls is declared here.

A kernel turns the stored form of a weight (packed sign bits, or int8 indices + fp16 range) into its compute
operand once, at load (``prepare*``), and computes a linear layer from it. Tensors passed between layers keep
their logical shape ``[..., K]``; any padding a GEMM needs stays inside the kernel.

1-bit kernels (``y = sign(x) @ sign(W)^T + b``, sign(0) = -1) are exact: the ±1 products are summed in int32 or
in fp32 (exact below 2^24), and the bias is added once in fp32. The FFN intermediate of a mixed layer uses
``linear_sign``, which returns the ±1 operand of ``sign(y)`` directly: since y = acc + b with an integer acc,
``acc + b > 0  <=>  acc > floor(-b)``, so the sign comes from one integer comparison (the GELU is skipped exactly).

8-bit kernels compute ``act(x @ W_hat^T + b)`` with ``W_hat = (Q + 128) * s + lo`` from a :class:`Prepared`
operand (one linear, or several that read the same input, e.g. Q, K and V, as one GEMM when ``fusable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.activations import ACT2FN

# ACT2FN names whose in-place op computes exactly what ACT2FN's module does (transformers' "gelu" is the erf GELU)
_INPLACE_ACTS = {"gelu": torch.ops.aten.gelu_, "relu": torch.ops.aten.relu_}


def add_residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x`` in x's dtype, into ``out`` (a linear's fresh output: no new [tokens, H] tensor) unless autograd
    needs it; a bf16 kernel output is cast first, in one pass (torch's mixed-dtype add promotes elementwise and
    measured ~1.8x slower)."""
    if out.dtype != x.dtype:
        return out.to(x.dtype).add_(x)
    if torch.is_grad_enabled() and (out.requires_grad or x.requires_grad):
        return out + x
    return out.add_(x)


# (int8 indices Q [N, K], fp16 range [lo, hi], bias [N] or None): one stored 8-bit linear
Index8Part = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class BinaryKernel:
    """A 1-bit linear kernel. Subclasses set ``name``/``operand_dtype`` and implement ``prepare_weight``,
    ``from_mask`` and ``dot``; ``linear``/``linear_sign`` have exact defaults built on them."""

    name: ClassVar[str]
    operand_dtype: ClassVar[torch.dtype]  # dtype of already-binarized activations (±1, or packed words)
    acc_dtype: ClassVar[torch.dtype] = torch.int32  # dtype ``dot`` returns
    exact: ClassVar[bool] = True

    def unavailable(self, device: torch.device) -> str | None:
        """None if the kernel runs on ``device``, else the reason it does not."""
        return None

    def fast_on(self, device: torch.device) -> bool:
        """Whether this kernel is a fast choice on ``device`` (not merely available): used to pick defaults."""
        return self.unavailable(device) is None

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
        return y.to(out_dtype).view(*lead, y.shape[-1])

    def linear_sign(self, x: torch.Tensor, w: torch.Tensor, sign_bias: torch.Tensor, k: int) -> torch.Tensor:
        """The operand of ``sign(sign(x) @ sign(W)^T + b)`` (``sign_bias`` from ``prepare_sign_bias``)."""
        lead = x.shape[:-1]
        acc = self.dot(self.binarize(x.reshape(-1, x.shape[-1]), k), w, k)
        out = self.from_mask(acc > sign_bias)
        return out.view(*lead, out.shape[-1])


@dataclass(frozen=True, eq=False)  # holds tensors (and maybe an opaque prepacked object): identity equality
class Prepared:
    """An 8-bit linear (or several fused along N) in the form its kernel computes with."""

    weight: Any                  # a tensor, or an opaque prepacked operand (fbgemm)
    params: torch.Tensor         # per-part fp32 parameters the kernel needs (e.g. [s, c])
    bias: torch.Tensor | None    # what ``linear`` still adds (None when folded into ``weight``)
    in_features: int
    out_features: int


def per_row_params(parts: Sequence[Index8Part], params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each part's parameters (e.g. ``[s, c]``) repeated for each of its output rows, and the rows in all: a fused
    Q/K/V keeps each part's own range, row by row."""
    rows = torch.tensor([q.shape[0] for q, _, _ in parts], device=parts[0][0].device)
    return torch.repeat_interleave(torch.stack(list(params)), rows, dim=0), int(rows.sum())


class Index8Kernel:
    """An 8-bit index linear kernel. Subclasses implement ``prepare_one`` (and ``linear``).

    ``activations`` names the arithmetic it computes: ``"fp32"`` (the linear of fp32 activations, for checkpoints
    without ``activation_quant``) or ``"a8"`` (:mod:`sensimix.a8`, for A8 checkpoints). A plan pairs a checkpoint
    with kernels of its own arithmetic only; ``exact`` is about that arithmetic.
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    activations: ClassVar[str] = "fp32"
    out_dtype: ClassVar[torch.dtype | None] = None  # None: the activation dtype
    fusable: ClassVar[bool] = False  # can run several linears that read the same input as one GEMM

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def fast_on(self, device: torch.device) -> bool:
        return self.unavailable(device) is None

    # -- load time -------------------------------------------------------------------------------
    def prepare_one(self, q: torch.Tensor, weight_range: torch.Tensor,
                    dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
        """One stored weight -> (weight operand, fp32 params)."""
        raise NotImplementedError

    def prepare(self, parts: Sequence[Index8Part], dtype: torch.dtype) -> Prepared:
        """One linear, or (``fusable`` kernels) several reading the same input, outputs concatenated in order.

        The default concatenates the parts' own operands along N (each keeps its own range) and keeps the bias
        apart, in the dtype the kernel adds it in.
        """
        if len(parts) > 1 and not self.fusable:
            raise ValueError(f"index8 kernel {self.name!r} cannot fuse linears (fusable = False)")
        prepared = [self.prepare_one(q, r, dtype) for q, r, _ in parts]
        weights = [w for w, _ in prepared]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        params = prepared[0][1] if len(parts) == 1 else torch.stack([p for _, p in prepared])
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).to(self.out_dtype or dtype)
        return Prepared(weight, params, bias, parts[0][0].shape[1], sum(q.shape[0] for q, _, _ in parts))

    # -- run time --------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        """``x @ W_hat^T + b`` in ``out_dtype`` (or x's dtype)."""
        raise NotImplementedError

    def fuses_activation(self, act: str, device: torch.device) -> bool:
        """Whether ``linear_act`` computes ``act`` (an ACT2FN name) inside the GEMM (saves passes over [M, N])."""
        return False

    def linear_act(self, x: torch.Tensor, p: Prepared, act: str) -> torch.Tensor:
        """``act(x @ W_hat^T + b)``; the default applies ``act`` after :meth:`linear`, in place where it can (the
        FFN intermediate is the forward's largest tensor: a second one costs its page faults too)."""
        y = self.linear(x, p)
        inplace = _INPLACE_ACTS.get(act)
        if inplace is not None and not (torch.is_grad_enabled() and y.requires_grad):
            return inplace(y)
        return ACT2FN[act](y)

    def linear_act_operand(self, x: torch.Tensor, p: Prepared, act: str) -> torch.Tensor:
        """``act(x @ W_hat^T + b)`` in the form this kernel's :meth:`linear` reads fastest, for a caller that feeds
        it only to another linear of this kernel (the FFN's intermediate). Default: :meth:`linear_act`."""
        return self.linear_act(x, p, act)

    def linear_add_norm(self, x: torch.Tensor, p: Prepared, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, eps: float) -> torch.Tensor:
        """``LayerNorm(x @ W_hat^T + b + residual)`` (BERT's output projections) in ``residual``'s dtype; x may be
        this kernel's own operand. The default runs :meth:`linear`, the add in place, then torch's LayerNorm."""
        y = add_residual(self.linear(x, p), residual)
        return torch.nn.functional.layer_norm(y, weight.shape, weight, bias, eps)

    def weight_bytes(self, p: Prepared) -> int:
        """Memory of an opaque weight operand (tensor operands are counted as module buffers)."""
        return 0 if isinstance(p.weight, torch.Tensor) else int(getattr(p.weight, "nbytes", 0))
