"""Per-kernel GEMM throughput at BERT's shapes (``scripts/benchmark.py --gemm``): each 1-bit and 8-bit kernel the
device runs, against the dense GEMM a float model would run there (fp32 on CPU, fp16 cuBLAS on CUDA).

An A8 kernel (8-bit activations) is timed four ways: from fp32 rows (the rounding pass and the GEMM), from its own
operand where it has one (the GEMM alone), and the two fused epilogues the runtime calls -- the GELU with the rounding
for the next GEMM (an FFN's first linear) and the residual add with the LayerNorm (an output projection)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant import index8_quantize, pack_signs

log = logging.getLogger(__name__)

BERT_SHAPES = ((768, 3072), (3072, 768), (768, 768))  # (K, N): FFN up, FFN down, attention projections


def time_call(fn: Callable[[], object], reps: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls, after one warm-up call; the device synchronized."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def run_gemms(device: str, m: int, reps: int | None = None) -> list[dict[str, Any]]:
    """One row per kernel and shape: ``ms`` per call, ``tops`` (2·M·K·N / time) and ``speedup`` over the dense
    GEMM; 1-bit rows also ``layer_ms`` (binarize + GEMM + bias). ``reps``: timed calls (default: 2 CPU, 50 CUDA)."""
    cuda = device.startswith("cuda")
    reps = reps or (50 if cuda else 2)
    dtype = torch.float16 if cuda else torch.float32
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for k, n in BERT_SHAPES:
        first = len(rows)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g) * 0.05
        bias = torch.zeros(n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        dense = w.to(device, dtype)
        base_s = time_call(lambda: F.linear(x, dense, bias), reps, device)
        rows.append({"kernel": "fp16 cuBLAS" if cuda else "fp32 GEMM", "m": m, "k": k, "n": n, "ms": base_s * 1e3,
                     "tops": flops / base_s / 1e12, "speedup": 1.0})
        bits = pack_signs(w).to(device)
        for name, kern in kernels.BINARY_KERNELS.items():
            # the reference is for tests; fp8 on CPU is oneDNN emulation (seconds per call)
            if name == "reference" or kern.unavailable(dev) or (name == "fp8" and not cuda):
                continue
            wk = kern.prepare_weight(bits, k)
            xs = kern.binarize(x, k)
            gemm_s = time_call(lambda: kern.dot(xs, wk, k), reps, device)
            layer_s = time_call(lambda: kern.linear(x, wk, bias.float(), k, dtype), reps, device)
            rows.append({"kernel": f"1-bit {name}", "m": m, "k": k, "n": n, "ms": gemm_s * 1e3,
                         "tops": flops / gemm_s / 1e12, "speedup": base_s / gemm_s, "layer_ms": layer_s * 1e3})
        q, lo, hi = index8_quantize(w)
        weight_range = torch.stack([lo, hi]).to(torch.float16).to(device)
        for name, kern in kernels.INDEX8_KERNELS.items():
            if name in ("reference", "a8-reference") or kern.unavailable(dev):
                continue
            if kern.activations == "a8":
                rows += a8_rows(kern, x.float(), q.to(device), weight_range, bias.float(), base_s, reps, device)
                continue
            prepared = kern.prepare([(q.to(device), weight_range, bias)], dtype)
            s = time_call(lambda: kern.linear(x, prepared), reps, device)
            rows.append({"kernel": f"8-bit {name}" + ("" if kern.exact else " (approx.)"), "m": m, "k": k, "n": n,
                         "ms": s * 1e3, "tops": flops / s / 1e12, "speedup": base_s / s})
        for r in rows[first:]:
            log.info("GEMM %-28s M=%d K=%-4d N=%-4d %9.2f ms %8.2f TOPS %5.2fx", r["kernel"], m, k, n, r["ms"],
                     r["tops"], r["speedup"])
    return rows


def a8_rows(kern: kernels.Index8Kernel, x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor,
            bias: torch.Tensor, base_s: float, reps: int, device: str) -> list[dict[str, Any]]:
    """An A8 kernel's rows at one shape (module docstring): ``ms``, ``tops`` and ``speedup`` over the dense GEMM."""
    (m, k), n = x.shape, q.shape[0]
    flops = 2 * m * k * n
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    g = torch.Generator().manual_seed(1)
    residual = torch.randn(m, n, generator=g).to(device)
    norm_w, norm_b = torch.ones(n, device=device), torch.zeros(n, device=device)
    calls = {"": lambda: kern.linear(x, p),
             " + GELU + rounding": lambda: kern.linear_act_operand(x, p, "gelu"),
             " + residual + LayerNorm": lambda: kern.linear_add_norm(x, p, residual, norm_w, norm_b, 1e-12)}
    operand = getattr(kern, "operand", None)
    if operand is not None:  # a8-triton: its rounded rows made once, the GEMM alone
        op = operand(x, k)
        calls[", from its operand"] = lambda: kern.linear(op, p)
    rows = []
    for what, fn in calls.items():
        s = time_call(fn, reps, device)
        rows.append({"kernel": f"8-bit {kern.name} (A8){what}", "m": m, "k": k, "n": n, "ms": s * 1e3,
                     "tops": flops / s / 1e12, "speedup": base_s / s})
    return rows
