"""The A8 linear in C on x86 CPUs (``csrc/a8gemm.c``): EXACT for A8 checkpoints, the CPU default for them.

Two builds of one source: ``a8-vnni`` (AVX512-VNNI: VPDPBUSD multiplies 64 uint8 x int8 pairs per instruction) and
``a8-avx2`` (CPUs without VNNI: the int16 micro-kernel of ``csrc/i16_micro.h`` on the rows widened to int16). Both
compute :mod:`sensimix.a8`'s arithmetic bit for bit (exact int32 sums; the float epilogue, GELU and LayerNorm as
the same fp32 operations in the same order, compiled with ``-ffp-contract=off``), so they are interchangeable
with :class:`~sensimix.kernels.a8.A8TorchKernel`, which unit/test_a8_native.py checks on every shape it sweeps.

What the C does beyond the product: the rounding of fp32 rows to 8-bit operands (the A8 rule), and in the GEMM's
epilogue the GELU with the rounding for the next GEMM (an FFN's middle: its fp32 [tokens, intermediate] tensor is
never written) or the residual add with the LayerNorm, block by block while the rows are in cache.

An operand (what :meth:`A8NativeKernel.quantize` and ``linear_act_operand`` return, and what ``linear`` reads as
well as fp32 rows) is a uint8 tensor [..., ``operand_bytes(k)``]: each row's q values (k of them, zero-padded to a
multiple of 4), then its zero (int32), scale (fp32) and total (int32); its storage holds whole blocks of the
kernel's rows (the micro-kernels read past the last row).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native, native_builds
from .a8 import A8Index8Kernel
from .base import Prepared
from .torch_ops import scratch

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_ERRORS = {-3: "out of memory"}
# kernel name -> its row of native_builds.BUILDS (the library, its flags and the CPU flags it needs)
BUILDS = {"a8-vnni": "a8gemm-vnni", "a8-avx2": "a8gemm-avx2"}
ATTENTION_BUILD = "a8attn-avx2"


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL:
    """The C library of the kernel ``name`` (installed, or built on first use; see :mod:`.native`)."""
    lib = native.load_build(BUILDS[name])
    for fn, res, args in (
            ("sensimix_a8_vnni", _INT, []),
            ("sensimix_a8_mr", _I64, []),
            ("sensimix_a8_operand_bytes", _I64, [_I64]),
            ("sensimix_a8_packed_bytes", _I64, [_I64, _I64]),
            ("sensimix_a8_pack_weight", None, [_PTR, _I64, _I64, _PTR, _PTR]),
            ("sensimix_a8_quantize", None, [_PTR, _I64, _I64, _I64, _PTR, _I64]),
            ("sensimix_a8_gelu", None, [_PTR, _I64, _PTR]),
            ("sensimix_a8_layer_norm", None, [_PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _I64]),
            ("sensimix_a8_work_floats", _I64, [_I64, _I64, _INT]),
            ("sensimix_a8_gemm", _INT, [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64,
                                        _INT]),
            ("sensimix_a8_gemm_add_norm", _INT, [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                                 _I64, _PTR, _PTR, ctypes.c_float, _PTR, _I64, _INT]),
            ("sensimix_a8_gemm_gelu_quantize", _INT, [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR,
                                                      _PTR, _I64, _PTR, _INT])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    if lib.sensimix_a8_vnni() != (name == "a8-vnni"):
        raise native.NativeBuildError(f"the {BUILDS[name]} library did not get its instruction set")
    return lib


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> str | None:
    """None where the build ``name`` runs on this CPU, else why not (checked once per process; may compile it)."""
    return native.unavailable(f"{name} kernel", set(native_builds.by_name(BUILDS[name]).cpu_flags),
                              lambda: library(name), "A8 checkpoints run the a8-torch kernel")


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"a8 kernel failed: {_ERRORS.get(status, f'status {status}')}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class A8NativeKernel(A8Index8Kernel):
    """One build of ``csrc/a8gemm.c`` (module docstring). Operands: the panel-packed indices with the weight's
    column sums behind them (int8 bytes), ``params`` [2, N] (s; c), the fp32 bias."""

    def __init__(self, name: str) -> None:
        self.name = name

    def unavailable(self, device):
        if torch.device(device).type != "cpu":
            return f"the {self.name} kernel runs on CPU only"
        return unavailable_reason(self.name)

    def fast_on(self, device):
        return self.unavailable(device) is None

    def lib(self) -> ctypes.CDLL:
        return library(self.name)

    # -- operands ----------------------------------------------------------------------------------
    def _rows(self, m: int) -> int:
        mr = self.lib().sensimix_a8_mr()
        return -(-m // mr) * mr

    def operand_bytes(self, k: int) -> int:
        return self.lib().sensimix_a8_operand_bytes(k)

    def quantize(self, x: torch.Tensor, k: int, slot: str | None = "a8 rows") -> torch.Tensor:
        """fp32 rows [M, k] -> operand rows [M, operand_bytes(k)] (the A8 rule); in a reused per-thread buffer
        (valid until the next call for ``slot``), or a fresh tensor with ``slot=None``."""
        x = x.contiguous() if x.stride(-1) != 1 else x
        m, width = x.shape[0], self.operand_bytes(k)
        rows = self._rows(m)
        buf = (torch.empty(rows * width, dtype=torch.uint8) if slot is None
               else scratch(rows * width, x, torch.uint8, slot=slot))
        out = buf.view(rows, width)
        self.lib().sensimix_a8_quantize(x.data_ptr(), m, k, x.stride(0), out.data_ptr(), width)
        return out[:m]

    def _operand(self, x: torch.Tensor, p: Prepared) -> tuple[torch.Size, torch.Tensor]:
        """(lead shape, operand rows [M, width] in whole blocks) of fp32 activations or of an operand."""
        k, width = p.in_features, self.operand_bytes(p.in_features)
        if x.dtype == torch.uint8:
            if x.shape[-1] != width:
                raise ValueError(f"{self.name}: an operand for {k} inputs has {width} bytes per row, got {x.shape[-1]}")
            x2 = x.reshape(-1, width)
            need = (x2.storage_offset() + self._rows(x2.shape[0]) * width)
            if not x2.is_contiguous() or x2.untyped_storage().nbytes() < need:  # e.g. a copy: pad the block again
                padded = torch.zeros((self._rows(x2.shape[0]), width), dtype=torch.uint8)
                padded[:x2.shape[0]] = x2
                x2 = padded[:x2.shape[0]]
            return x.shape[:-1], x2
        if x.dtype != torch.float32:
            raise ValueError(f"{self.name}: takes fp32 activations or its own operand, not {x.dtype}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"the {self.name} kernel computes no gradient (inference only); train the QAT model")
        return x.shape[:-1], self.quantize(x.reshape(-1, k), k)

    # -- load time ---------------------------------------------------------------------------------
    def prepare(self, parts, dtype):
        base = super().prepare(parts, dtype)  # Q [N, K], params [N, 2], fp32 bias
        q, n, k = base.weight.cpu().contiguous(), base.out_features, base.in_features
        lib = self.lib()
        size = lib.sensimix_a8_packed_bytes(n, k)
        packed = torch.empty(size + 4 * n, dtype=torch.int8)  # the panels, then colsum (int32)
        lib.sensimix_a8_pack_weight(q.data_ptr(), n, k, packed.data_ptr(), packed.data_ptr() + size)
        params = base.params.t().contiguous()  # [2, N]: s, c (the C's layout)
        return Prepared(packed, params, base.bias, k, n)

    def _args(self, p: Prepared) -> tuple:
        size = self.lib().sensimix_a8_packed_bytes(p.out_features, p.in_features)
        return (p.weight.data_ptr(), p.weight.data_ptr() + size, p.out_features, p.in_features,
                p.params[0].data_ptr(), p.params[1].data_ptr(), _ptr(p.bias))

    # -- run time ----------------------------------------------------------------------------------
    def linear(self, x, p):
        lead, a = self._operand(x, p)
        m, n = a.shape[0], p.out_features
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            _check(self.lib().sensimix_a8_gemm(a.data_ptr(), a.stride(0), m, *self._args(p), out.data_ptr(), n,
                                               torch.get_num_threads()))
        return out.view(*lead, n)

    def linear_add_norm(self, x, p, residual, weight, bias, eps):
        n = p.out_features
        if (residual.dtype != torch.float32 or weight.dtype != torch.float32 or bias.dtype != torch.float32
                or residual.shape[-1] != n or (torch.is_grad_enabled() and residual.requires_grad)):
            return super().linear_add_norm(x, p, residual, weight, bias, eps)
        lead, a = self._operand(x, p)
        m = a.shape[0]
        res = residual.reshape(-1, n)
        if res.shape[0] != m:
            raise ValueError(f"{self.name}: {m} rows of activations but {res.shape[0]} residual rows")
        res = res if res.stride(-1) == 1 else res.contiguous()
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            _check(self.lib().sensimix_a8_gemm_add_norm(
                a.data_ptr(), a.stride(0), m, *self._args(p), res.data_ptr(), res.stride(0),
                weight.contiguous().data_ptr(), bias.contiguous().data_ptr(), eps, out.data_ptr(), n,
                torch.get_num_threads()))
        return out.view(*lead, n)

    def linear_act_operand(self, x, p, act):
        """GELU: the GEMM, the A8 GELU and the rounding for the next linear in one C call; returns the operand of
        the next linear of this kernel (module docstring)."""
        if act != "gelu":
            return self.linear_act(x, p, act)
        lead, a = self._operand(x, p)
        m, n = a.shape[0], p.out_features
        lib, threads = self.lib(), torch.get_num_threads()
        width = self.operand_bytes(n)
        out = torch.empty((self._rows(m), width), dtype=torch.uint8)  # whole blocks: the next GEMM reads them
        if m:
            work = scratch(lib.sensimix_a8_work_floats(m, n, threads), a, torch.float32, slot="a8 blocks")
            _check(lib.sensimix_a8_gemm_gelu_quantize(a.data_ptr(), a.stride(0), m, *self._args(p), out.data_ptr(),
                                                      width, work.data_ptr(), threads))
        return out[:m].view(*lead, width)


@functools.lru_cache(maxsize=1)
def attention_library() -> ctypes.CDLL:
    """``csrc/a8attn.c`` (AVX2; installed, or built on first use)."""
    lib = native.load_build(ATTENTION_BUILD)
    lib.sensimix_a8_attention.restype = _INT
    lib.sensimix_a8_attention.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64,
                                          ctypes.c_float, _INT, _PTR, _I64, _INT]
    return lib


@functools.lru_cache(maxsize=1)
def attention_unavailable() -> str | None:
    """None where the C attention runs here, else why not (A8 plans then run :func:`sensimix.a8.attention`)."""
    return native.unavailable("A8 attention kernel", set(native_builds.by_name(ATTENTION_BUILD).cpu_flags),
                              attention_library,
                              "A8 checkpoints run torch's definition of it")


def packed_attention(q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, scale: float, *,
                     first_only: bool = False) -> torch.Tensor:
    """:func:`sensimix.a8.attention` (bit for bit) of packed sequences in C: keys and values ``kv`` [T, 2, heads, d]
    (sequence b: rows ``starts[b]`` .. ``starts[b] + lens[b] - 1``); queries ``q`` [T, heads, d] in the same rows
    (returns [T, heads * d]), or with ``first_only`` one per sequence, [B, heads, d] (returns [B, heads * d])."""
    heads, d = kv.shape[2], kv.shape[3]
    if kv.stride(-1) != 1 or kv.stride(2) != d or kv.stride(1) != heads * d:
        kv = kv.contiguous()
    q = q if q.stride(-1) == 1 and q.stride(-2) == d else q.contiguous()
    ldq = q.stride(0)
    starts = starts.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    rows = q.shape[0]
    out = torch.empty((rows, heads * d), dtype=torch.float32)
    if len(starts):
        _check(attention_library().sensimix_a8_attention(
            q.data_ptr(), ldq, kv.data_ptr(), kv[:, 1].data_ptr(), kv.stride(0), starts.data_ptr(), lens.data_ptr(),
            len(starts), heads, d, scale, int(first_only), out.data_ptr(), out.stride(0), torch.get_num_threads()))
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               name: str = "a8-avx2") -> torch.Tensor:
    """:func:`sensimix.a8.layer_norm` in C (bit for bit), for fp32 rows on CPU."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        from .. import a8

        return a8.layer_norm(x, weight, bias, eps)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty_like(x2)
    library(name).sensimix_a8_layer_norm(x2.data_ptr(), x2.shape[0], x2.shape[1], x2.stride(0),
                                         weight.float().contiguous().data_ptr(), bias.float().contiguous().data_ptr(),
                                         eps, out.data_ptr(), out.stride(0))
    return out.view(x.shape)


def gelu(x: torch.Tensor, name: str = "a8-avx2") -> torch.Tensor:
    """:func:`sensimix.a8.gelu` in C (bit for bit), for fp32 on CPU (tests)."""
    x = x.float().contiguous()
    out = torch.empty_like(x)
    library(name).sensimix_a8_gelu(x.data_ptr(), x.numel(), out.data_ptr())
    return out


__all__ = ["A8NativeKernel", "BUILDS", "attention_unavailable", "gelu", "layer_norm", "library",
           "packed_attention", "unavailable_reason"]
