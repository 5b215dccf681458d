"""The A8 linear on int8 tensor cores in Triton (``a8-triton``): EXACT for A8 checkpoints, their CUDA default.

It computes :mod:`sensimix.a8`'s arithmetic bit for bit (:mod:`.a8triton_kernels` says how each rule is kept), and
fuses what the rules allow around the integer product:

* the GEMM's epilogue: the A8 float epilogue, the bias, the GELU (an FFN's first linear) or the residual add (an
  output projection), and for the GELU each row's range over the tile (so the rounding for the next GEMM reads the
  [tokens, intermediate] tensor once, not twice);
* a row kernel: the residual's LayerNorm (fp64 moments) with the A8 rounding of its result for the linear that
  reads it next (Q/K/V, or an FFN's first), and the rounding on its own for any other input.

A row's rounding needs its whole row, so it cannot live in a GEMM tile: the LayerNorm and the GELU's rounding are
one small kernel over the rows each. The down-projection's LayerNorm is not fused into its GEMM either (a tile
would have to span the hidden size: 768 columns of int32 per row), hence three kernels per linear at most.

An operand (what :func:`quantize` and ``linear_act_operand`` return, what ``linear`` reads as well as fp32 rows) is an
int8 tensor [..., :func:`operand_width`\\ (k)]: the row's values ``q - 128`` (k of them, padded to a multiple of 16),
then its zero (int32), scale (fp32) and total (int32). A LayerNorm's output hands its operand to the next linear
that reads that very tensor (:class:`_Handoff`), so Q/K/V and an FFN's first linear skip their own rounding pass.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch

from . import a8triton_kernels as jit
from .a8 import A8Index8Kernel
from .base import Prepared
from .triton_kernels import triton, triton_available

MAX_ROW = 16384  # the LayerNorm kernel holds a row in one block
MAX_K = 1 << 16  # int32 sums: |(q - 128) . Q| + |(128 - zero) colsum| < 2^31 below this K


def operand_width(k: int) -> int:
    """Bytes per row of an operand for ``k`` inputs: the values padded to 16, then zero, scale, total (16 bytes)."""
    return -(-k // 16) * 16 + 16


def _stats(op: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of an operand's zero (int32), scale (fp32) and total (int32), [M] each (stride: width / 4)."""
    at = -(-k // 16) * 4
    words = op.view(torch.int32)
    return words[:, at], op.view(torch.float32)[:, at + 1], words[:, at + 2]


# every launch: no FMA contraction (the A8 epilogue rounds each product and sum on its own), and libdevice without
# its flush of subnormals (Triton's floor would otherwise be ``cvt.rmi.ftz``)
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    kernel[grid](*args, **LAUNCH_OPTIONS, **meta)


def _block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _rows_per_program(block: int) -> int:
    """Rows a row kernel's program takes: a few short rows together (~4,096 values), a long row alone."""
    return max(1, min(16, 4096 // block))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize(x: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
    """The A8 rule on every row of fp32 ``x`` [M, K] (:func:`sensimix.a8.quantize_rows`), as an operand [M, width];
    ``parts``: the rows' ranges a GEMM's epilogue wrote ([M, tiles, 3]), else they are found here first."""
    x = _rows(x)
    m, k = x.shape
    op = torch.empty((m, operand_width(k)), dtype=torch.int8, device=x.device)
    if m:
        zero, scale, total = _stats(op, k)
        block = _block(k, 2048)
        rows = _rows_per_program(block)
        n_parts = 0 if parts is None else parts.shape[1]
        _launch(jit.quantize_kernel, (triton.cdiv(m, rows),), x, x.stride(0), op, op.stride(0), zero, scale, total,
                zero.stride(0), op if parts is None else parts, n_parts, m, k, ROWS=rows, BLOCK=block,
                BLOCK_P=_block(max(n_parts, 1), 1 << 12), HAS_PARTS=parts is not None, num_warps=_warps(block))
    return op


def dequantized(op: torch.Tensor, k: int) -> torch.Tensor:
    """``scale * (q - zero)`` of an operand [M, width] (fp32 [M, k]; tests and debugging)."""
    zero, scale, _ = _stats(op, k)
    return ((op[:, :k].to(torch.int32) + 128 - zero[:, None]).float()) * scale[:, None]


def _config(m: int, n: int) -> dict[str, int]:
    """Tile sizes: 128 x 128 x 64 int8 tiles for the big GEMMs (8 warps), 64-row tiles for fewer rows. Fixed per
    shape class, no autotuning: a CUDA graph captures one launch, and timing runs must not tune in their rounds."""
    if m <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    if m <= 1024 or n <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def gemm(op: torch.Tensor, p: Prepared, *, act: int = jit.ACT_NONE, residual: torch.Tensor | None = None,
         ranges: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 [M, N] of the A8 linear of operand rows ``op`` [M, width] (bias, then ``act``, then ``+ residual``), and
    with ``ranges`` each row's [lo, hi, non-finite count] per output tile ([M, tiles, 3], for :func:`quantize`)."""
    m, k, n = op.shape[0], p.in_features, p.out_features
    out = torch.empty((m, n), dtype=torch.float32, device=op.device)
    cfg = _config(m, n)
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    parts = torch.empty((m, tiles, jit.PARTS), dtype=torch.float32, device=op.device) if ranges else None
    if m == 0:
        return out, parts
    zero, scale, total = _stats(op, k)
    res = None if residual is None else _rows(residual)
    if res is not None and tuple(res.shape) != (m, n):
        raise ValueError(f"a8-triton: residual of shape {list(res.shape)} for an output of [{m}, {n}]")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * tiles,)
    _launch(jit.gemm_kernel, grid, op, op.stride(0), zero, scale, total, zero.stride(0), p.weight, p.weight.stride(0),
            p.params, p.bias if p.bias is not None else p.params, res if res is not None else out,
            res.stride(0) if res is not None else 0, out, out.stride(0), parts if parts is not None else out, m, n, k,
            HAS_BIAS=p.bias is not None, HAS_RES=res is not None, ACT=act, RANGE=ranges, **cfg)
    return out, parts


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               hand_off: bool = True) -> torch.Tensor:
    """:func:`sensimix.a8.layer_norm` (bit for bit) of fp32 rows on CUDA (or in Triton's interpreter); with
    ``hand_off`` the A8 rounding of the result is made in the same pass and handed to the next ``a8-triton``
    linear that reads the returned tensor."""
    if (x.dtype != torch.float32 or x.shape[-1] > MAX_ROW or (torch.is_grad_enabled() and x.requires_grad)
            or not triton_available(x.device)):
        from .. import a8

        return a8.layer_norm(x, weight, bias, eps)
    x2 = _rows(x)
    m, n = x2.shape
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    op = torch.empty((m, operand_width(n)), dtype=torch.int8, device=x.device) if hand_off else y
    if m:
        zero, scale, total = _stats(op, n) if hand_off else (y, y, y)
        block = _block(n, MAX_ROW)
        rows = _rows_per_program(block)
        _launch(jit.layer_norm_kernel, (triton.cdiv(m, rows),), x2, x2.stride(0), weight.float().contiguous(),
                bias.float().contiguous(), float(eps), y, y.stride(0), op, op.stride(0), zero, scale, total,
                zero.stride(0) if hand_off else 0, m, n, ROWS=rows, BLOCK=block, QUANT=hand_off,
                num_warps=_warps(block))
    out = y.view(x.shape)
    if hand_off:
        _HANDOFF.put(out, op)
    return out


def gelu(x: torch.Tensor) -> torch.Tensor:
    """:func:`sensimix.a8.gelu` elementwise (fp32; tests)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _launch(jit.gelu_kernel, (triton.cdiv(x.numel(), 1024),), x, out, x.numel(), BLOCK=1024)
    return out


class _Handoff(threading.local):
    """The operand of the last LayerNorm output made in this thread, for the linear that reads that very tensor
    next: matched by identity (a weak reference: a freed tensor never matches), version (an in-place change since
    voids it; inference-mode tensors keep no version, and the runtime writes no LayerNorm output in place) and
    shape."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version: int | None = None
        self.op: torch.Tensor | None = None

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        return None if t.is_inference() else t._version

    def put(self, y: torch.Tensor, op: torch.Tensor) -> None:
        self.ref, self.version, self.op = weakref.ref(y), self._version(y), op

    def take(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        if self.ref is None or self.ref() is not x or self._version(x) != self.version or self.op is None:
            return None
        return self.op if self.op.shape == (math.prod(x.shape[:-1]), operand_width(k)) else None


_HANDOFF = _Handoff()


class A8TritonKernel(A8Index8Kernel):
    """``a8-triton`` (module docstring). Operands: Q [N, K] int8, ``params`` [3, N] fp32 (s; c; the column sums of Q,
    exact in fp32 below 2^24), the fp32 value of the fp16 bias."""

    name = "a8-triton"

    def unavailable(self, device):
        device = torch.device(device)
        if triton is None:
            return "the a8-triton kernel needs triton (pip install triton)"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if torch.cuda.get_device_capability(device) < (8, 0):
                return "int8 tensor cores through Triton need compute capability 8.0 or newer"
            return None
        if triton_available(device):
            return None  # Triton's CPU interpreter (TRITON_INTERPRET=1): tests
        return "the a8-triton kernel runs on CUDA (on CPU only in Triton's interpreter, TRITON_INTERPRET=1)"

    def fast_on(self, device):
        return torch.device(device).type == "cuda" and self.unavailable(device) is None

    # -- load time ---------------------------------------------------------------------------------
    def prepare(self, parts, dtype):
        base = super().prepare(parts, dtype)  # Q [N, K], params [N, 2] (s, c), fp32 bias
        q = base.weight.contiguous()
        if base.in_features >= MAX_K:
            raise ValueError(f"a8-triton: {base.in_features} inputs; int32 sums are exact below {MAX_K}")
        colsum = q.sum(dim=1, dtype=torch.int32).float()  # |colsum| <= 128 K < 2^24: exact
        params = torch.cat([base.params.t(), colsum[None]]).contiguous()  # [3, N]: s; c; colsum
        return Prepared(q, params, base.bias, base.in_features, base.out_features)

    # -- run time ----------------------------------------------------------------------------------
    def operand(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Operand rows [M, width] of fp32 activations [..., k] (handed off by a LayerNorm, or rounded here) or of an
        operand [..., width]."""
        if x.dtype == torch.int8:
            if x.shape[-1] != operand_width(k):
                raise ValueError(f"a8-triton: an operand for {k} inputs has {operand_width(k)} bytes per row, got "
                                 f"{x.shape[-1]}")
            return _rows(x)
        if x.dtype != torch.float32:
            raise ValueError(f"a8-triton: takes fp32 activations or its own operand, not {x.dtype}")
        if x.shape[-1] != k:
            raise ValueError(f"a8-triton: {x.shape[-1]} inputs for a linear of {k}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the a8-triton kernel computes no gradient (inference only); train the QAT model")
        handed = _HANDOFF.take(x, k)
        return handed if handed is not None else quantize(x)

    def linear(self, x, p):
        y, _ = gemm(self.operand(x, p.in_features), p)
        return y.view(*x.shape[:-1], p.out_features)

    def linear_act(self, x, p, act):
        y, _ = gemm(self.operand(x, p.in_features), p, act=_act(act))
        return y.view(*x.shape[:-1], p.out_features)

    def linear_act_operand(self, x, p, act):
        """The GEMM with the activation and each row's range in its epilogue, then the rounding for the next linear
        (one read of the activation): the next linear's operand, [..., operand_width(N)]."""
        y, parts = gemm(self.operand(x, p.in_features), p, act=_act(act), ranges=True)
        op = quantize(y, parts)
        return op.view(*x.shape[:-1], op.shape[-1])

    def linear_add_norm(self, x, p, residual, weight, bias, eps):
        n = p.out_features
        if residual.dtype != torch.float32 or residual.shape[-1] != n or (torch.is_grad_enabled()
                                                                          and residual.requires_grad):
            return super().linear_add_norm(x, p, residual, weight, bias, eps)
        y, _ = gemm(self.operand(x, p.in_features), p, residual=residual)
        return layer_norm(y.view(residual.shape), weight, bias, eps)  # its operand handed to the next linear


def _act(name: str) -> int:
    acts = {"gelu": jit.ACT_GELU, "relu": jit.ACT_RELU}
    if name not in acts:
        raise ValueError(f"an A8 model has no rule for the activation {name!r} (sensimix.a8: gelu, relu)")
    return acts[name]


__all__ = ["A8TritonKernel", "dequantized", "gelu", "gemm", "layer_norm", "operand_width", "quantize"]
