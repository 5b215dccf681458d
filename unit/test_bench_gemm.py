"""The per-kernel GEMM timing (sensimix.bench.gemm, ``scripts/benchmark.py --gemm``)."""

from __future__ import annotations

from sensimix.bench import gemm
from sensimix.bench.gemm import run_gemms, time_call


def test_time_call_warms_up_once_then_times_reps_calls(monkeypatch):
    """A fake clock that a call advances by 2 s, the warm-up by 10 s: 3 timed calls are 2 s per call."""
    clock = [0.0]
    calls = []

    def call():
        clock[0] += 10.0 if not calls else 2.0
        calls.append(1)

    monkeypatch.setattr(gemm.time, "perf_counter", lambda: clock[0])
    assert time_call(call, 3, "cpu") == 2.0
    assert len(calls) == 4


def test_every_kernel_at_each_bert_shape_against_the_fp32_gemm():
    rows = run_gemms("cpu", m=2, reps=1)
    shapes = [(768, 3072), (3072, 768), (768, 768)]
    assert list(dict.fromkeys((r["k"], r["n"]) for r in rows)) == shapes and all(r["m"] == 2 for r in rows)
    for k, n in shapes:
        kernels = [r["kernel"] for r in rows if (r["k"], r["n"]) == (k, n)]
        assert kernels[0] == "fp32 GEMM"  # the baseline of each shape's speedups
        # the exact 8-bit kernels are named plainly, the approximate ones say so; no reference, no fp8 emulation
        assert {"8-bit dense", "8-bit dequant", "8-bit int8 (approx.)", "1-bit float"} <= set(kernels)
        assert not {"1-bit reference", "8-bit reference", "1-bit fp8"} & set(kernels)
    assert all(r["ms"] > 0 and "layer_ms" in r for r in rows if r["kernel"].startswith("1-bit"))
