"""The 8-bit index linear on 16-bit integer activations, for x86 CPUs with AVX2 (``csrc/int16gemm.c``): APPROXIMATE.

Each row of x is rounded to 15-bit integers with its own scale (``x ~ sa * A``, ``|A| <= 16383``), and
``x @ W_hat^T + b = sa * (s * (A @ Q^T) + c * sum(A)) + b`` with the checkpoint's int8 indices Q exact
(``W_hat = (Q + 128) * s + lo = s * Q + c``). ``A @ Q^T`` is exact in int32, so the only error is the rounding of
the activations: at most ``max|x_row| / 32766`` per element, 2^8 times finer than per-row int8.

Why: an AVX2 core without VNNI multiplies twice as many int16 pairs per instruction (VPMADDWD) as an fp32 FMA, and
int16 x int8 products cannot saturate. Measured on a 2-core AMD EPYC (AVX2), 3,392 tokens: 1.6-1.8x the
throughput of torch's fp32 GEMM at bert-base's FFN shapes (~146 against ~90 G multiply-adds per second).

Where it may serve ``precision="fast"``: only where the rounding keeps predictions (see
:func:`sensimix.inference.plan.fast_index8_kernel`): a 1-bit FFN binarizes its input, so a perturbation upstream
flips signs near 0, and every binarized layer that runs over all tokens spreads those flips to the next layer.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from ..devices import cpu_features
from ..quant import QMIN, index8_step
from .base import Index8Kernel, Prepared
from .native import NativeBuildError, load
from .torch_ops import scratch

log = logging.getLogger(__name__)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = load("int16gemm.c", ("-mavx2", "-mfma"))
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
    return lib


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None where the kernel runs on this CPU, else why not (checked once per process; may compile it)."""
    if not {"avx2", "fma"} <= cpu_features():
        return "the int16 kernel needs an x86 CPU with AVX2 and FMA"
    try:
        _library()
    except NativeBuildError as exc:
        log.warning("the int16 8-bit kernel is unavailable: %s", exc)
        return str(exc)
    return None


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
    lda, rows = k + k % 2, -(-m // lib.sensimix_i16_mr()) * lib.sensimix_i16_mr()
    a = scratch(rows * lda, x, torch.int16).view(rows, lda)
    sa, rs = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int32)
    lib.sensimix_i16_quantize(x.data_ptr(), m, k, x.stride(0), a.data_ptr(), lda, sa.data_ptr(), rs.data_ptr())
    return a, sa, rs


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
        steps, offsets = [], []
        for q, weight_range, _ in parts:
            lo, hi = weight_range.float()
            s = index8_step(lo, hi)
            steps.append(s.expand(q.shape[0]))
            offsets.append((s * float(-QMIN) + lo).expand(q.shape[0]))  # c = 128 s + lo: W_hat = s Q + c
        q = parts[0][0] if len(parts) == 1 else torch.cat([q for q, _, _ in parts])
        params = torch.stack([torch.cat(steps), torch.cat(offsets)]).float().contiguous()  # [2, N]: s, c
        biases = [b for _, _, b in parts]
        bias = None if any(b is None for b in biases) else torch.cat(biases).float().contiguous()
        return Prepared(pack_weight(q.cpu()), params, bias, q.shape[1], q.shape[0])

    def linear(self, x, p):
        if x.dtype != torch.float32:
            raise ValueError(f"the int16 kernel takes fp32 activations, not {x.dtype}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the int16 kernel computes no gradient (inference only); use the exact kernels "
                               "(precision='fp32') to differentiate through a packed model")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m, n = x2.shape[0], p.out_features
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            a, sa, rs = quantize_rows(x2)
            bias = None if p.bias is None else p.bias.data_ptr()
            status = _library().sensimix_i16_gemm(
                a.data_ptr(), a.shape[1], m, p.weight.data_ptr(), n, p.in_features, sa.data_ptr(), rs.data_ptr(),
                p.params[0].data_ptr(), p.params[1].data_ptr(), bias, out.data_ptr(), n, torch.get_num_threads())
            if status:
                raise RuntimeError("int16 kernel failed: a worker thread could not start")
        return out.view(*lead, n)

    def weight_bytes(self, p):
        return 0  # the packed tensor is a module buffer, counted as such
