"""Pure-torch reference kernels: the definitions every fast kernel is tested against.

Slow on purpose: integer (int64) arithmetic for the 1-bit products, fp32 dequantization written exactly as
:mod:`sensimix.quant` defines it. Works on any device torch supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import index8_dequantize, sign, unpack_signs

# popcount of every byte value, for the XNOR-popcount identity
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def binary_matmul(x: torch.Tensor, bits: torch.Tensor, k: int) -> torch.Tensor:
    """``sign(x) @ sign(W)^T`` as exact int64, ``x`` [..., K] float, ``bits`` the packed W [N, ceil(K/8)]."""
    xs = sign(x.float()).to(torch.int64)
    w = unpack_signs(bits, k, torch.int64)
    return xs @ w.t()


def binary_linear(x: torch.Tensor, bits: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``sign(x) @ sign(W)^T + b`` in fp32: the exact integer plus the bias, rounded once."""
    y = binary_matmul(x, bits, k).to(torch.float32)
    return y if bias is None else y + bias.float()


def binary_linear_sign(x: torch.Tensor, bits: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``sign(binary_linear(x))`` as fp32 ±1: the 1-bit FFN intermediate with its GELU skipped."""
    return sign(binary_linear(x, bits, k, bias))


def xnor_popcount_matmul(x_bits: torch.Tensor, w_bits: torch.Tensor, k: int) -> torch.Tensor:
    """The XNOR-popcount identity on packed operands: ``K - 2 * popcount(x_bits ^ w_bits)`` (int64).

    Both operands are packed little-endian uint8 along the last dim with zero padding, so padding bits agree
    and never count. Equals :func:`binary_matmul` on the unpacked signs.
    """
    xor = x_bits.unsqueeze(-2) ^ w_bits  # [M, N, bytes]
    return k - 2 * _POPCOUNT8.to(xor.device)[xor.long()].sum(-1)


def index8_linear(
    x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W_hat^T + b`` in fp32 with ``W_hat`` dequantized from int8 indices and the fp16 ``[lo, hi]``."""
    lo, hi = weight_range.float()
    w = index8_dequantize(q, lo, hi, torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())


def index8_embedding(ids: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the dequantized table, fp32."""
    lo, hi = weight_range.float()
    return F.embedding(ids, index8_dequantize(q, lo, hi, torch.float32))
