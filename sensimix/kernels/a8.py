"""8-bit linears of A8 checkpoints in torch ops: EXACT (they compute :mod:`sensimix.a8`'s arithmetic bit for bit).

An A8 checkpoint's 8-bit linears quantize their input rows to 8-bit integers (:func:`sensimix.a8.quantize_rows`)
and multiply integers exactly; these kernels differ only in how they get the exact integer product:

* ``a8-reference``: an int64 matmul on CPU, an fp64 one elsewhere (tests);
* ``a8-torch``: fp32 GEMMs over 512-column chunks on CPU (every partial sum an integer below 2^24: exact at the
  fp32 GEMM's speed), ``torch._int_mm`` on CUDA (int8 tensor cores: the rows shifted to [-128, 127], the shift
  folded back with the weight's column sums).

Both are fusable (Q, K and V as one product, each part keeping its own (s, c)) and apply the A8 GELU and the
A8 LayerNorm after their output (``linear_act``, ``linear_add_norm``). The native CPU kernels (``a8-vnni``,
``a8-avx2``; :mod:`.a8native`) fuse those into the GEMM's epilogue; these are their portable twins.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import a8
from ..quant import index8_affine
from .base import Index8Kernel, Prepared, add_residual, per_row_params
from .torch_ops import has_int_mm, int_mm


class A8Index8Kernel(Index8Kernel):
    """Base of the A8 kernels: prepared operands are the int8 indices Q [N, K], per-output-row ``[s, c]`` [N, 2] and
    the fp32 value of the fp16 bias; subclasses give the exact integer product (:meth:`product`)."""

    activations = "a8"
    fusable = True

    def prepare(self, parts: Any, dtype: torch.dtype) -> Prepared:
        if dtype != torch.float32:
            raise ValueError(f"an A8 kernel computes in fp32 (integer products, fp32 epilogue), not {dtype}")
        affine = [torch.stack(index8_affine(*weight_range.float())) for _, weight_range, _ in parts]
        params, rows = per_row_params(parts, affine)  # [N, 2]: s, c of each output row's part
        q = parts[0][0] if len(parts) == 1 else torch.cat([q for q, _, _ in parts])
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).float()
        return Prepared(q.contiguous(), params.float().contiguous(), bias, q.shape[1], rows)

    def product(self, rows: a8.Rows, q: torch.Tensor) -> torch.Tensor:
        """The exact integers ``(q_rows - zero) @ Q^T`` [M, N], in a dtype that holds them exactly."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, p: Prepared) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"an A8 kernel takes fp32 activations, not {x.dtype}")
        rows = a8.quantize_rows(x)
        y = a8.linear_epilogue(self.product(rows, p.weight), rows, p.params[:, 0], p.params[:, 1], p.bias)
        return y.view(*x.shape[:-1], p.out_features)

    def linear_act(self, x: torch.Tensor, p: Prepared, act: str) -> torch.Tensor:
        y = self.linear(x, p)
        if act == "gelu":
            return a8.gelu(y)
        if act == "relu":
            return torch.relu_(y)
        raise ValueError(f"an A8 model has no rule for the activation {act!r} (sensimix.a8: gelu, relu)")

    def linear_add_norm(self, x: torch.Tensor, p: Prepared, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, eps: float) -> torch.Tensor:
        return a8.layer_norm(add_residual(self.linear(x, p), residual), weight, bias, eps)


class A8ReferenceKernel(A8Index8Kernel):
    """The A8 linear with the most obvious exact product: int64 on CPU, fp64 elsewhere (tests and debugging)."""

    name = "a8-reference"

    def fast_on(self, device):
        return False

    def product(self, rows, q):
        c = rows.centred(torch.int64 if rows.q.device.type == "cpu" else torch.float64)
        return c @ q.to(c.dtype).t()


class A8TorchKernel(A8Index8Kernel):
    """The A8 linear in torch ops on any device (module docstring): exact, and as fast as the device's fp32 GEMM
    (CPU) or its int8 tensor cores (CUDA, through ``torch._int_mm`` with its shapes padded)."""

    name = "a8-torch"

    def product(self, rows, q):
        if rows.q.is_cuda and has_int_mm():
            # (q - zero) @ Q^T = (q - 128) @ Q^T + (128 - zero) colsum(Q): int8 operands, exact int32 sums
            shifted = (rows.q.to(torch.int16) - 128).to(torch.int8)
            acc = int_mm(shifted, q.t())
            colsum = q.sum(dim=1, dtype=torch.int32)
            return acc + (128 - rows.zero)[:, None] * colsum[None, :]
        return a8.int_matmul(rows.centred(), q)
