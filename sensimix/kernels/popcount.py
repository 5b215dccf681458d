"""The 1-bit linear as XNOR-popcount on x86 CPUs with AVX2 (``csrc/popcount.c``): EXACT; the 1-bit default on CPUs
without VNNI/AMX.

``sign(x) @ sign(W)^T = K - 2 * popcount(bits_x ^ bits_w)``: 256 products per vector XOR and a nibble-lookup
popcount, against 32 per ``vpmaddubsw`` in an int8 GEMM. Operands are sign bits, 8 per byte in the checkpoint's
bit order, each row zero-padded to a whole number of 32-byte vectors (a uint8 tensor [M, ld]). The FFN
intermediate (``linear_sign``) writes the sign bits of its output directly in that layout, so the second 1-bit
linear reads 1/32 of the bytes an fp32 activation would take and nothing is converted in between.

Measured on a 2-core AMD EPYC (AVX2): the two 1-bit GEMMs of a bert-base FFN at 3,392 tokens take ~57 ms, against
~150-270 ms on fbgemm's int8 GEMM (the ``fbgemm`` kernel); the benchmark's ``1-bit fbgemm`` row times the whole model.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from ..quant import pack_signs, unpack_bits
from . import native, native_builds
from .base import BinaryKernel

VECTOR_BYTES = 32  # one AVX2 register
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
BUILD = native_builds.by_name("popcount-avx2")  # source, compiler flags, CPU flags: one row of the table
_OUT_I32, _OUT_F32, _OUT_BITS = 0, 1, 2
_ERRORS = {-1: "a row stride that is not a whole number of vectors", -3: "out of memory"}


def row_bytes(k: int) -> int:
    """Bytes per packed row of ``k`` signs: ceil(k / 8) rounded up to whole vectors."""
    return -(-k // (8 * VECTOR_BYTES)) * VECTOR_BYTES


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load_build(BUILD)
    lib.sensimix_xnor_gemm.restype = ctypes.c_int
    lib.sensimix_xnor_gemm.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _I64, ctypes.c_int, _PTR, _I64, _PTR, _PTR,
                                       ctypes.c_int]
    lib.sensimix_pack_signs.restype = None
    lib.sensimix_pack_signs.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64]
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None where the kernel runs on this CPU, else why not (checked once per process; may compile it)."""
    # an AVX2 CPU that cannot build it runs the 1-bit FFN on the next exact kernel, slower: said once
    return native.unavailable("popcount kernel", set(BUILD.cpu_flags), _library, "the next exact kernel runs instead")


def pack_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Float rows [M, k] -> sign bits [M, row_bytes(k)] (bit = x > 0; NaN and 0 give -1, as ``sign``)."""
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"popcount kernel: expected activations [M, {k}], got [{', '.join(map(str, x.shape))}]")
    x = x.float().contiguous()
    out = torch.empty((x.shape[0], row_bytes(k)), dtype=torch.uint8)
    _library().sensimix_pack_signs(x.data_ptr(), x.shape[0], k, k, out.data_ptr(), out.shape[1])
    return out


def xnor_gemm(xs: torch.Tensor, w: torch.Tensor, k: int, mode: int, *, bias: torch.Tensor | None = None,
              threshold: torch.Tensor | None = None) -> torch.Tensor:
    """One call of the C GEMM over packed rows xs [M, ld] and w [N, ld]; ``mode`` picks the output (see the C)."""
    if xs.dtype != torch.uint8 or xs.shape[-1] != w.shape[1]:
        raise ValueError(f"popcount kernel: activations must be packed sign bits with {w.shape[1]} bytes per row "
                         f"(got {xs.dtype} [{', '.join(map(str, xs.shape))}])")
    xs = xs.contiguous()
    m, n = xs.shape[0], w.shape[0]
    if mode == _OUT_BITS:
        out = torch.empty((m, row_bytes(n)), dtype=torch.uint8)
    else:
        out = torch.empty((m, n), dtype=torch.int32 if mode == _OUT_I32 else torch.float32)
    status = _library().sensimix_xnor_gemm(
        xs.data_ptr(), m, w.data_ptr(), n, w.shape[1], k, mode, out.data_ptr(), out.shape[1],
        None if bias is None else bias.data_ptr(), None if threshold is None else threshold.data_ptr(),
        torch.get_num_threads())
    if status:
        raise RuntimeError(f"popcount kernel failed: {_ERRORS.get(status, f'status {status}')}")
    return out


class PopcountBinaryKernel(BinaryKernel):
    """Packed sign bits and the AVX2 XNOR-popcount GEMM (exact, int32; see the module docstring)."""

    name = "popcount"
    operand_dtype = torch.uint8  # packed sign bits, rows of row_bytes(K)

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return "the popcount kernel runs on CPU only"
        return unavailable_reason()

    def prepare_weight(self, bits, k):
        # re-packed so every padding bit is 0 whatever the file holds (the activations' padding bits are 0 too)
        return self.from_mask(unpack_bits(bits.cpu(), k).bool()).contiguous()

    def binarize(self, x, k):
        if x.dtype == self.operand_dtype:
            return x
        return pack_rows(x.reshape(-1, x.shape[-1]), k)

    def from_mask(self, mask):
        words = pack_signs(mask)
        return F.pad(words, (0, row_bytes(mask.shape[-1]) - words.shape[-1]))

    def dot(self, xs, w, k):
        return xnor_gemm(xs, w, k, _OUT_I32)

    def linear(self, x, w, bias, k, out_dtype):
        lead = x.shape[:-1]
        xs = self.binarize(x.reshape(-1, x.shape[-1]), k)
        y = xnor_gemm(xs, w, k, _OUT_F32, bias=None if bias is None else bias.float().contiguous())
        return y.to(out_dtype).view(*lead, y.shape[-1])

    def linear_sign(self, x, w, sign_bias, k):
        lead = x.shape[:-1]
        xs = self.binarize(x.reshape(-1, x.shape[-1]), k)
        bits = xnor_gemm(xs, w, k, _OUT_BITS, threshold=sign_bias.to(torch.int32).contiguous())
        return bits.view(*lead, bits.shape[-1])
