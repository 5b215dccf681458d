"""Triton kernels: the XNOR-popcount 1-bit GEMM, and the fused sign step of the 1-bit FFN.

XNOR-popcount: ``sign(x) @ sign(W)^T = K - 2 * popcount(bits_x ^ bits_w)``.

Optional: the package imports without triton; :func:`triton_available` says whether the kernel can run. Both
operands are sign bits packed 32 per int32 word, little-endian (the checkpoint's uint8 bytes viewed as int32 on
a little-endian machine), zero-padded, so padding bits agree and never count. Popcount is the SWAR bit trick on
uint32 (no libdevice), which also runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``) for testing.

An alternative to the FP8/int8 tensor-core kernels, kept for comparison: popcount runs on CUDA cores, so it is
expected to be slower than FP8 ``_scaled_mm`` on H100/H200 (the benchmark measures it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..quant import pack_signs, unpack_signs
from .base import BinaryKernel

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def triton_available(device: torch.device | None = None) -> bool:
    """Triton importable, and ``device`` is CUDA (or Triton's CPU interpreter is on)."""
    if triton is None:
        return False
    if device is None or device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def bytes_to_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 packed bits [..., B] -> int32 words [..., ceil(B/4)] (zero-padded; little-endian byte order)."""
    pad = (-packed.shape[-1]) % 4
    if pad:
        packed = F.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32)


if triton is not None:

    @triton.jit
    def _popcount32(v):
        # v: uint32; classic SWAR popcount (shifts are logical on unsigned values)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return (v * 0x01010101) >> 24

    @triton.jit
    def _xnor_gemm_kernel(
        x_ptr, w_ptr, out_ptr, M, N, W, K, stride_xm, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + offs_w
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=(offs_m[:, None] < M) & (cols[None, :] < W), other=0)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :],
                        mask=(offs_n[:, None] < N) & (cols[None, :] < W), other=0)
            a = a.to(tl.uint32, bitcast=True)
            b = b.to(tl.uint32, bitcast=True)
            diff = a[:, None, :] ^ b[None, :, :]  # [BLOCK_M, BLOCK_N, BLOCK_W]
            acc += tl.sum(_popcount32(diff).to(tl.int32), axis=2)
        out = K - 2 * acc
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


if triton is not None:

    @triton.jit
    def _sign_operand_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        h = tl.load(h_ptr + offs, mask=inside, other=0.0)
        v = tl.where(h > 0, 1.0, -1.0)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=inside)


def sign_operand(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``+1 where h > 0 else -1`` in ``dtype`` (e.g. float8 e4m3, the next 1-bit GEMM's operand).

    One Triton pass (read h, write the operand) on CUDA or in Triton's interpreter; elsewhere torch ops (a compare
    and casts, ~4 passes). Replaces the mask/convert/scale/shift chain of the 1-bit FFN's intermediate.
    """
    if triton_available(h.device) and h.is_contiguous() and h.numel() > 0:
        out = torch.empty(h.shape, dtype=dtype, device=h.device)
        block = 1024
        _sign_operand_kernel[(triton.cdiv(h.numel(), block),)](h, out, h.numel(), BLOCK=block)
        return out
    mid = torch.float16 if dtype.itemsize == 1 and dtype.is_floating_point else dtype
    return (h > 0).to(mid).mul_(2).sub_(1).to(dtype)


def xnor_matmul(x_words: torch.Tensor, w_words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [M, N] = ``K - 2 * popcount(x ^ w)`` for packed words x [M, Wd], w [N, Wd]."""
    if triton is None:
        raise RuntimeError("the xnor kernel needs triton (pip install triton); choose binary_kernel='fp8' or 'int8'")
    if x_words.shape[1] != w_words.shape[1]:
        raise ValueError(f"xnor_matmul: {x_words.shape[1]} activation words vs {w_words.shape[1]} weight words")
    x_words, w_words = x_words.contiguous(), w_words.contiguous()
    m, words = x_words.shape
    n = w_words.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=x_words.device)
    block_m, block_n, block_w = 32, 32, 4
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _xnor_gemm_kernel[grid](x_words, w_words, out, m, n, words, k, x_words.stride(0), w_words.stride(0),
                            out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w)
    return out


class XnorBinaryKernel(BinaryKernel):
    """Packed sign bits (int32 words) and the Triton XNOR-popcount GEMM (exact, int32)."""

    name = "xnor"
    operand_dtype = torch.int32

    def unavailable(self, device: torch.device) -> str | None:
        if triton_available(device):
            return None
        return "the xnor kernel needs triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)"

    def prepare_weight(self, bits: torch.Tensor, k: int) -> torch.Tensor:
        # re-pack so the padding bits are 0 whatever the file holds (x's padding bits are 0 too)
        return bytes_to_words(pack_signs(unpack_signs(bits, k, torch.int8)))

    def from_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return bytes_to_words(pack_signs(mask))

    def dot(self, xs: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        return xnor_matmul(xs, w, k)
