"""The 8-bit index linear on 16-bit integer activations, for x86 CPUs with AVX2 (``csrc/int16gemm.c``): APPROXIMATE.

Each row of x is rounded to 15-bit integers with its own scale (``x ~ sa * A``, ``|A| <= 16383``), and
``x @ W_hat^T + b = sa * (s * (A @ Q^T) + c * sum(A)) + b`` with the checkpoint's int8 indices Q exact
(``W_hat = (Q + 128) * s + lo = s * Q + c``). ``A @ Q^T`` is exact in int32, so the only error is the rounding of
the activations: at most ``max|x_row| / 32766`` per element, 2^8 times finer than per-row int8.

Why: an AVX2 core without VNNI multiplies twice as many int16 pairs per instruction (VPMADDWD) as an fp32 FMA, and
int16 x int8 products cannot saturate. Measured on a 2-core AMD EPYC (AVX2), 3,392 tokens: 1.4-1.7x the
throughput of torch's fp32 GEMM at bert-base's shapes (131-150 against 79-93 G multiply-adds per second; the
768 x 768 output projection 1.1x).

In an FFN (``linear_act_operand`` with GELU) the up-projection's epilogue applies the erf GELU and rounds the rows
for the down-projection, block by block in a per-thread buffer: its result is this kernel's int16 operand (rows,
scale and sum; :data:`TAIL`), and the fp32 [tokens, intermediate] tensor is never materialized. After an output
projection (``linear_add_norm``) the epilogue adds the residual and applies the LayerNorm, block by block in cache.

Why ``precision="fast"`` takes it only for a calibrated checkpoint: a 1-bit FFN binarizes its input, so a
perturbation upstream flips signs near 0. On well-trained (2+1) models the 15-bit rounding kept every SST-2 and
MRPC dev prediction but one, yet it changed 12 of 872 of the weakly trained (2+1) ``pytest acceptance`` makes, and
11 of a (3+3)'s (:func:`sensimix.inference.plan.fast_index8_kernel`). So ``fast`` uses it where the checkpoint's
``fast_calibration.json`` shows it kept that model's predictions (:mod:`sensimix.calibration_record`); elsewhere ask for
it by name: ``index8_kernel="int16"``.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ..quant import index8_affine
from . import native, native_builds
from .base import Index8Kernel, Prepared, per_row_params
from .torch_ops import scratch

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
BUILD = native_builds.by_name("int16gemm-avx2")  # source, compiler flags, CPU flags: one row of the table
_ERRORS = {-3: "out of memory"}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = native.load_build(BUILD)
    lib.sensimix_i16_mr.restype = _I64
    lib.sensimix_i16_mr.argtypes = []
    lib.sensimix_i16_packed_bytes.restype = _I64
    lib.sensimix_i16_packed_bytes.argtypes = [_I64, _I64]
    lib.sensimix_i16_pack_weight.restype = None
    lib.sensimix_i16_pack_weight.argtypes = [_PTR, _I64, _I64, _PTR]
    lib.sensimix_i16_quantize.restype = None
    lib.sensimix_i16_quantize.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR]
    lib.sensimix_i16_gemm.restype = ctypes.c_int
    lib.sensimix_i16_gemm.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                                      ctypes.c_int]
    lib.sensimix_i16_gemm_gelu_rows.restype = ctypes.c_int
    lib.sensimix_i16_gemm_gelu_rows.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                                                _PTR, _I64, _PTR, _PTR, _PTR, ctypes.c_int]
    lib.sensimix_i16_gemm_add_norm.restype = ctypes.c_int
    lib.sensimix_i16_gemm_add_norm.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                                               _PTR, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _I64, ctypes.c_int]
    lib.sensimix_i16_work_floats.restype = _I64
    lib.sensimix_i16_work_floats.argtypes = [_I64, _I64, ctypes.c_int]
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None where the kernel runs on this CPU, else why not (checked once per process; may compile it)."""
    return native.unavailable("int16 kernel", set(BUILD.cpu_flags), _library,
                              "fast and the default run the exact kernels")


# An activation operand (what ``linear_act_operand`` returns and ``linear`` reads): int16 rows [..., k + k % 2 + 4],
# each row's 15-bit values, then 4 int16 holding the bits of its scale (fp32) and of its sum (int32). Its storage
# holds whole blocks of the kernel's rows (the micro-kernel reads up to 5 rows past the last).
TAIL = 4


def operand_width(k: int) -> int:
    return k + k % 2 + TAIL


def _rows(m: int) -> int:
    mr = _library().sensimix_i16_mr()
    return -(-m // mr) * mr


def pack_weight(q: torch.Tensor) -> torch.Tensor:
    """int8 indices [N, K] -> the kernel's panel layout (int8, the same bytes rounded up to 16 rows and even K)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"int16 kernel: expected int8 indices [N, K], got {q.dtype} {list(q.shape)}")
    q = q.contiguous()
    lib = _library()
    out = torch.empty(lib.sensimix_i16_packed_bytes(*q.shape), dtype=torch.int8)
    lib.sensimix_i16_pack_weight(q.data_ptr(), q.shape[0], q.shape[1], out.data_ptr())
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 rows [M, K] -> (A int16 [M rounded up to the kernel's rows, K rounded up to even], sa [M], sum(A) [M]).
    A lives in a reused per-thread buffer: valid until the next call."""
    lib = _library()
    m, k = x.shape
    lda, rows = k + k % 2, _rows(m)
    a = scratch(rows * lda, x, torch.int16).view(rows, lda)
    sa, rs = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int32)
    lib.sensimix_i16_quantize(x.data_ptr(), m, k, x.stride(0), a.data_ptr(), lda, sa.data_ptr(), rs.data_ptr())
    return a, sa, rs


def operand_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation operand [..., operand_width(k)] -> (rows [M, width] in whole kernel blocks, sa [M], sum [M])."""
    width = operand_width(k)
    if x.shape[-1] != width:
        raise ValueError(f"int16 kernel: an int16 operand for {k} inputs has {width} columns per row, got "
                         f"{x.shape[-1]}")
    x2 = x.reshape(-1, width)
    m, lda = x2.shape[0], width - TAIL
    need = (x2.storage_offset() + _rows(m) * width) * x2.element_size()
    if not x2.is_contiguous() or x2.untyped_storage().nbytes() < need:  # e.g. a copy of it: pad the block again
        padded = torch.zeros((_rows(m), width), dtype=torch.int16)
        padded[:m] = x2
        x2 = padded[:m]
    sa = x2[:, lda:lda + 2].contiguous().view(torch.float32).view(m)
    rs = x2[:, lda + 2:].contiguous().view(torch.int32).view(m)
    return x2, sa, rs


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"int16 kernel failed: {_ERRORS.get(status, f'status {status}')}")


class Int16Index8Kernel(Index8Kernel):
    """APPROXIMATE: per-row 15-bit integer activations, exact int8 weights, exact int32 products (module docstring).

    Weight memory: the packed copy of Q (int8, the checkpoint's size) beside the checkpoint's own tensor, and no
    dequantized fp32 weight (``dequant`` keeps a scratch one). Fusable: each output row keeps its part's s and c.
    """

    name = "int16"
    exact = False
    fusable = True

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return "the int16 kernel runs on CPU only"
        return unavailable_reason()

    def prepare(self, parts, dtype):
        if dtype != torch.float32:
            raise ValueError(f"the int16 kernel takes fp32 activations, not {dtype}")
        affine = [torch.stack(index8_affine(*weight_range.float())) for _, weight_range, _ in parts]
        q = parts[0][0] if len(parts) == 1 else torch.cat([q for q, _, _ in parts])
        params = per_row_params(parts, affine)[0].t().float().contiguous()  # [2, N]: s, c (the C kernel's layout)
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).float().contiguous()
        return Prepared(pack_weight(q.cpu()), params, bias, q.shape[1], q.shape[0])

    def _rows_in(self, x: torch.Tensor, p: Prepared) -> tuple[torch.Size, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lead shape, int16 rows, sa, row sums) of fp32 activations or of this kernel's own operand."""
        if x.dtype == torch.int16:  # linear_act_operand's output: rounded already
            return (x.shape[:-1], *operand_rows(x, p.in_features))
        if x.dtype != torch.float32:
            raise ValueError(f"the int16 kernel takes fp32 activations, not {x.dtype}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the int16 kernel computes no gradient (inference only); use the exact kernels "
                               "(precision='fp32') to differentiate through a packed model")
        x2 = x.reshape(-1, p.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return (x.shape[:-1], *quantize_rows(x2))

    def linear(self, x, p):
        lead, a, sa, rs = self._rows_in(x, p)
        m, n = sa.shape[0], p.out_features
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            bias = None if p.bias is None else p.bias.data_ptr()
            _check(_library().sensimix_i16_gemm(
                a.data_ptr(), a.stride(0), m, p.weight.data_ptr(), n, p.in_features, sa.data_ptr(), rs.data_ptr(),
                p.params[0].data_ptr(), p.params[1].data_ptr(), bias, out.data_ptr(), n, torch.get_num_threads()))
        return out.view(*lead, n)

    def linear_add_norm(self, x, p, residual, weight, bias, eps):
        """The GEMM, the residual add and the LayerNorm in one C call: each block of rows is normalized as soon as
        its GEMM is done, while in cache (no separate add and LayerNorm passes over [M, N]). LayerNorm in fp32
        with a two-pass variance (~1e-7 of torch's), far below the activations' 15-bit rounding."""
        n = p.out_features
        if (residual.dtype != torch.float32 or weight.dtype != torch.float32 or bias.dtype != torch.float32
                or residual.shape[-1] != n or weight.shape != (n,) or bias.shape != (n,)
                or (torch.is_grad_enabled() and residual.requires_grad)):
            return super().linear_add_norm(x, p, residual, weight, bias, eps)
        lead, a, sa, rs = self._rows_in(x, p)
        m = sa.shape[0]
        res = residual.reshape(-1, n)
        if res.shape[0] != m:
            raise ValueError(f"int16 kernel: {m} rows of activations but {res.shape[0]} residual rows")
        res, weight, bias = res if res.stride(-1) == 1 else res.contiguous(), weight.contiguous(), bias.contiguous()
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            _check(_library().sensimix_i16_gemm_add_norm(
                a.data_ptr(), a.stride(0), m, p.weight.data_ptr(), n, p.in_features, sa.data_ptr(), rs.data_ptr(),
                p.params[0].data_ptr(), p.params[1].data_ptr(), None if p.bias is None else p.bias.data_ptr(),
                res.data_ptr(), res.stride(0), weight.data_ptr(), bias.data_ptr(), eps,
                out.data_ptr(), n, torch.get_num_threads()))
        return out.view(*lead, n)

    def linear_act_operand(self, x, p, act):
        """GELU: the GEMM, the erf GELU in its epilogue and the rounding for the next linear in one C call, block
        by block (the fp32 [M, N] intermediate is never materialized); returns this kernel's operand (see
        :data:`TAIL`), which only this kernel's ``linear`` reads. The GELU is the erf GELU to ~2e-7 absolute
        (Abramowitz-Stegun erfc), far below the 15-bit rounding that follows it."""
        if act != "gelu":
            return self.linear_act(x, p, act)
        lead, a, sa, rs = self._rows_in(x, p)
        m, n = sa.shape[0], p.out_features
        width = operand_width(n)
        out = torch.empty((_rows(m), width), dtype=torch.int16)  # whole row blocks: the next GEMM reads them
        if m:
            lib, threads = _library(), torch.get_num_threads()
            qsa, qrs = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int32)
            work = scratch(lib.sensimix_i16_work_floats(m, n, threads), sa, torch.float32, slot="int16 blocks")
            bias = None if p.bias is None else p.bias.data_ptr()
            _check(lib.sensimix_i16_gemm_gelu_rows(
                a.data_ptr(), a.stride(0), m, p.weight.data_ptr(), n, p.in_features, sa.data_ptr(), rs.data_ptr(),
                p.params[0].data_ptr(), p.params[1].data_ptr(), bias, out.data_ptr(), width, qsa.data_ptr(),
                qrs.data_ptr(), work.data_ptr(), threads))
            out[:m, width - TAIL:width - TAIL + 2] = qsa.view(torch.int16).view(m, 2)
            out[:m, width - 2:] = qrs.view(torch.int16).view(m, 2)
        return out[:m].view(*lead, width)

    def weight_bytes(self, p):
        return 0  # the packed tensor is a module buffer, counted as such
