"""Packed inference modules. Their persistent buffers are the checkpoint's tensors, named as in the file.

Each module is built from sizes alone (on the meta device when loading), filled by a strict
``load_state_dict(..., assign=True)``, then ``prepare``\\ d for a plan: the kernel's compute operands are made
once from the stored tensors and held as non-persistent buffers (or, for an opaque prepacked operand, a plain
attribute), so ``state_dict()`` always returns exactly the packed-v1 tensors. ``forward`` is a kernel call.

The packing of each kind (what a float weight becomes in the file) lives here too, as ``pack`` static methods
built on :mod:`sensimix.quant`; :func:`sensimix.export.convert` applies them to a QAT model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import a8, kernels
from ..kernels import Prepared, a8native, a8triton
from ..quant import index8_dequantize, index8_quantize, pack_signs
from .plan import InferencePlan


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float16).cpu().contiguous()


class PackedModule(nn.Module):
    """Base: ``prepare(plan)`` builds operands; ``_operand(name, t)`` holds one as a non-persistent buffer."""

    def prepare(self, plan: InferencePlan) -> None:
        raise NotImplementedError

    def _operand(self, name: str, t: torch.Tensor | None) -> None:
        self.register_buffer(name, t, persistent=False)

    def _hold_weight(self, weight: object) -> None:
        """A tensor weight operand is a non-persistent buffer (it moves with ``.to()``); an opaque one (e.g.
        fbgemm's prepacked weight: CPU only, never moved) a plain attribute."""
        tensor = isinstance(weight, torch.Tensor)
        self._operand("op_weight", weight if tensor else None)
        self._opaque = None if tensor else weight

    def _weight(self) -> object:
        return self._opaque if self._opaque is not None else self.op_weight


class Index8Embedding(PackedModule):
    """An int8-index embedding table: rows are gathered as int8, then only those rows dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_q", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_range", torch.empty(2, dtype=torch.float16))
        self.dtype = torch.float32

    @staticmethod
    def pack(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, lo, hi = index8_quantize(weight.detach())
        return {"weight_q": q.cpu().contiguous(), "weight_range": torch.stack([lo, hi]).to(torch.float16).cpu()}

    def prepare(self, plan: InferencePlan) -> None:
        self.dtype = plan.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.index8_embedding(ids, self.weight_q, self.weight_range, self.dtype)


class Index8Linear(PackedModule):
    """An 8-bit index linear: int8 indices + fp16 range + fp16 bias in the file; the kernel's operand at run time.

    When its parent fuses it with siblings (Q, K, V) it is not prepared on its own (``fused_into`` says where).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_range", torch.empty(2, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))
        self.kernel: kernels.Index8Kernel | None = None
        self.fused_into: str | None = None
        self._opaque = None

    @staticmethod
    def pack(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**Index8Embedding.pack(weight), "bias": _fp16(bias)}

    def part(self) -> kernels.base.Index8Part:
        return self.weight_q, self.weight_range, self.bias.float()

    def dense_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_hat [out, in], bias) in ``dtype``, dequantized now exactly as the QAT model does, for math that
        does not go through the kernel (the last layer's folded keys and values)."""
        lo, hi = self.weight_range.float()
        return index8_dequantize(self.weight_q, lo, hi, dtype), self.bias.to(dtype)

    def prepare(self, plan: InferencePlan) -> None:
        self.kernel = kernels.INDEX8_KERNELS[plan.index8_kernel]
        self._hold(self.kernel.prepare([self.part()], plan.dtype))

    def _hold(self, p: Prepared) -> None:
        self._hold_weight(p.weight)
        self._operand("op_params", p.params)
        self._operand("op_bias", p.bias)
        self.fused_into = None

    def operands(self) -> Prepared:
        return Prepared(self._weight(), self.op_params, self.op_bias, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.operands())

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
        """``norm(self(x) + residual)``: a kernel may fuse the add and the LayerNorm into its GEMM."""
        return self.kernel.linear_add_norm(x, self.operands(), residual, norm.op_weight, norm.op_bias, norm.eps)

    def forward_act(self, x: torch.Tensor, act: str, operand: bool = False) -> torch.Tensor:
        """``act`` of the linear; with ``operand``, in the form the kernel's next linear reads (see
        ``Index8Kernel.linear_act_operand``): only for a result fed to a linear of the same kernel."""
        if operand:
            return self.kernel.linear_act_operand(x, self.operands(), act)
        return self.kernel.linear_act(x, self.operands(), act)

    def opaque_bytes(self) -> int:
        return 0 if self._opaque is None else self.kernel.weight_bytes(self.operands())

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel else "unprepared"
        fused = f", fused into {self.fused_into}" if self.fused_into else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}{fused}"


class FusedIndex8Linear(Index8Linear):
    """Several 8-bit linears that read the same input (Q, K, V) run as one GEMM; holds operands only."""

    def __init__(self, parts: list[Index8Linear], plan: InferencePlan) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.kernel = kernels.INDEX8_KERNELS[plan.index8_kernel]
        self.fused_into, self._opaque = None, None
        self._hold(self.kernel.prepare([p.part() for p in parts], plan.dtype))


class BinaryLinear(PackedModule):
    """A 1-bit linear ``sign(x) @ sign(W)^T + b``: packed sign bits + fp16 bias in the file.

    With ``sign_output`` (the FFN intermediate) it returns the ±1 operand of ``sign(y)`` instead of y: the GELU
    between the two 1-bit linears is skipped exactly (sign(GELU(z)) = sign(z), sign(0) = -1).
    """

    def __init__(self, in_features: int, out_features: int, sign_output: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.sign_output = in_features, out_features, sign_output
        self.register_buffer("weight_bits", torch.empty(out_features, math.ceil(in_features / 8), dtype=torch.uint8))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))
        self.kernel: kernels.BinaryKernel | None = None
        self.dtype = torch.float32
        self._opaque = None

    @staticmethod
    def pack(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight_bits": pack_signs(weight.detach()).cpu().contiguous(), "bias": _fp16(bias)}

    def prepare(self, plan: InferencePlan) -> None:
        self.kernel, self.dtype = kernels.BINARY_KERNELS[plan.binary_kernel], plan.dtype
        self._hold_weight(self.kernel.prepare_weight(self.weight_bits, self.in_features))
        self._operand("op_bias", self.bias.float())  # fp32: the exact integer + bias rounds once
        self._operand("op_sign_bias", self.kernel.prepare_sign_bias(self.op_bias) if self.sign_output else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        if self.sign_output:
            return self.kernel.linear_sign(x, w, self.op_sign_bias, self.in_features)
        return self.kernel.linear(x, w, self.op_bias, self.in_features, self.dtype)

    def opaque_bytes(self) -> int:
        return 0 if self._opaque is None else int(getattr(self._opaque, "nbytes", 0))

    def extra_repr(self) -> str:
        kernel = self.kernel.name if self.kernel else "unprepared"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}" + \
            (", sign output" if self.sign_output else "")


class Linear(PackedModule):
    """A floating-point linear (pooler, classifier): fp16 in the file, the plan's dtype at run time."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16))

    @staticmethod
    def pack(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": _fp16(weight), "bias": _fp16(bias)}

    def prepare(self, plan: InferencePlan) -> None:
        self._operand("op_weight", self.weight.to(plan.dtype))
        self._operand("op_bias", self.bias.to(plan.dtype))
        self.fp64_sums = plan.a8  # the head of an A8 model: fp64 sums rounded once (sensimix.a8.dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "fp64_sums", False):
            return a8.dense(x, self.op_weight, self.op_bias)
        return F.linear(x, self.op_weight, self.op_bias)


class LayerNorm(Linear):
    """LayerNorm with fp16 weight and bias in the file; an A8 plan's is :func:`sensimix.a8.layer_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        PackedModule.__init__(self)
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(dim, dtype=torch.float16))
        self.eps = eps
        self.norm: Callable[..., torch.Tensor] | None = None  # an A8 plan's LayerNorm (sensimix.a8's, or its C twin)

    def prepare(self, plan: InferencePlan) -> None:
        super().prepare(plan)
        self.norm = a8.layer_norm if plan.a8 else None
        if plan.a8 and plan.index8_kernel == "a8-triton":
            self.norm = a8triton.layer_norm  # the same bits in Triton, its result's rounding handed to the next linear
        elif plan.a8 and plan.device.type == "cpu" and a8native.unavailable_reason("a8-avx2") is None:
            self.norm = a8native.layer_norm  # the same bits, in C (torch's fp64 moments take ~30x longer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            return self.norm(x, self.op_weight, self.op_bias, self.eps)
        return F.layer_norm(x, self.op_weight.shape, self.op_weight, self.op_bias, self.eps)


class Embedding(PackedModule):
    """A float embedding table (token types): fp16 in the file."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.float16))

    @staticmethod
    def pack(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": _fp16(weight)}

    def prepare(self, plan: InferencePlan) -> None:
        self._operand("op_weight", self.weight.to(plan.dtype))

    def forward(self, ids: torch.Tensor | None) -> torch.Tensor:
        return self.op_weight[0] if ids is None else F.embedding(ids, self.op_weight)
