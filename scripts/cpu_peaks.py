#!/usr/bin/env python
"""How close the CPU GEMMs run to this x86 CPU's instruction peaks (not a test; AVX2 + FMA, gcc or clang).

Issue 10 asks ``fast`` for <= 0.75x the time of the best CPU peer (ONNX Runtime int8). This measures why that is hard
on a CPU without VNNI, in one process:

* per core, the multiply-add throughput of each instruction sequence a GEMM kernel's inner loop is made of
  (independent accumulators, operands in registers, one thread):

  - ``fp32_fma``: VFMADD231PS, 8 fp32 multiply-adds (torch's fp32 GEMM: the exact path);
  - ``int16_vpmaddwd``: VPMADDWD + VPADDD, 16 int16 x int16 multiply-adds (SensiMix's ``int16`` kernel);
  - ``u8s8_vpmaddubsw``: VPMADDUBSW + VPMADDWD + VPADDD, 32 uint8 x int8 multiply-adds (ONNX Runtime's AVX2
    int8 GEMM; 7-bit activations or saturating int16 pair sums);

* the GEMMs at the FFN up-projection's shape (``--m`` tokens x 768 -> 3072, every thread): torch fp32 and the
  ``int16`` kernel, each as a model calls it (a fresh output) and alone (the output reused), as a fraction of
  their instruction's peak times the threads.

Usage::

    python scripts/cpu_peaks.py --json benchmarks/cpu-peaks-<machine>.json   # ~30 s
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# each loop: `n` iterations of `per_iter` instructions of the measured kind, on independent accumulators
C_SOURCE = r"""
#include <stdint.h>
#define LOOP(body) __asm__ volatile("1:\n\t" body "dec %[n]\n\t jnz 1b\n\t" : [n] "+r"(n) :: "cc", "xmm0", "xmm1", \
    "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", \
    "xmm15")
void fp32_fma(int64_t n) {  /* 12 x 8 multiply-adds per iteration */
#define F(a) "vfmadd231ps %%ymm12, %%ymm14, %%ymm" a "\n\t"
    LOOP(F("0") F("1") F("2") F("3") F("4") F("5") F("6") F("7") F("8") F("9") F("10") F("11"));
}
void int16_vpmaddwd(int64_t n) {  /* 8 x 16 */
#define W(t, a) "vpmaddwd %%ymm12, %%ymm14, %%ymm" t "\n\t vpaddd %%ymm" t ", %%ymm" a ", %%ymm" a "\n\t"
    LOOP(W("8", "0") W("9", "1") W("10", "2") W("11", "3") W("8", "4") W("9", "5") W("10", "6") W("11", "7"));
}
void u8s8_vpmaddubsw(int64_t n) {  /* 8 x 32 */
#define U(a) "vpmaddubsw %%ymm12, %%ymm14, %%ymm8\n\t vpmaddwd %%ymm8, %%ymm15, %%ymm9\n\t" \
             "vpaddd %%ymm9, %%ymm" a ", %%ymm" a "\n\t"
    LOOP(U("0") U("1") U("2") U("3") U("4") U("5") U("6") U("7"));
}
"""
LOOPS = {"fp32_fma": 96, "int16_vpmaddwd": 128, "u8s8_vpmaddubsw": 256}  # multiply-adds per iteration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=3392, help="GEMM rows (default: 3,392, the attended tokens of the "
                   "benchmark's 64 QNLI dev pairs)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20_000_000, help="loop iterations per peak measurement "
                   "(default: %(default)s, ~0.1 s each)")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def build_loops(folder: Path) -> ctypes.CDLL:
    from sensimix.kernels.native import compiler

    cc = compiler()  # the package's own choice: $CC, else cc, else gcc
    if cc is None:
        raise SystemExit("cpu_peaks: no C compiler found (looked for $CC, cc, gcc): install gcc or clang")
    src, lib = folder / "loops.c", folder / "loops.so"
    src.write_text(C_SOURCE)
    subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-mavx2", "-mfma", str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    for name in LOOPS:
        getattr(dll, name).argtypes = [ctypes.c_int64]
        getattr(dll, name).restype = None
    return dll


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sensimix.kernels import int16
    from sensimix.kernels.base import Prepared
    from sensimix.vv.procedure import environment

    if int16.unavailable_reason():
        raise SystemExit(f"cpu_peaks: {int16.unavailable_reason()}")
    threads = torch.get_num_threads()
    out: dict = {"schema": "sensimix-cpu-peaks/1", "environment": environment("cpu"), "threads": threads,
                 "peaks_gmac_per_core": {}, "gemms": []}
    with tempfile.TemporaryDirectory(prefix="sensimix-peaks-") as tmp:
        dll = build_loops(Path(tmp))
        n = args.iters
        for name, macs in LOOPS.items():
            s = median_seconds(lambda: getattr(dll, name)(n), args.reps)
            out["peaks_gmac_per_core"][name] = macs * n / s / 1e9

    m, k, n_out = args.m, 768, 3072
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n_out, k)
    q = torch.randint(-128, 128, (n_out, k), dtype=torch.int8)
    prepared = Prepared(int16.pack_weight(q), torch.rand(2, n_out), torch.rand(n_out), k, n_out)
    kernel = int16.Int16Index8Kernel()
    macs = m * k * n_out
    out_fp32 = torch.empty(m, n_out)
    rows, sa, rs = int16.quantize_rows(x)
    rows = rows.clone()  # quantize_rows hands out a per-thread buffer that the "linear" row's calls reuse
    lib = int16._library()

    def int16_gemm() -> None:  # the C GEMM alone: rows rounded once, output reused
        int16._check(lib.sensimix_i16_gemm(
            rows.data_ptr(), rows.stride(0), m, prepared.weight.data_ptr(), n_out, k, sa.data_ptr(), rs.data_ptr(),
            prepared.params[0].data_ptr(), prepared.params[1].data_ptr(), prepared.bias.data_ptr(),
            out_fp32.data_ptr(), n_out, threads))

    # "fresh output": the call as a model makes it, a new [m, n] fp32 output each time (41 MB here: past glibc's
    # largest mmap threshold, so its pages are faulted in anew); "output reused": the arithmetic alone
    with torch.inference_mode():
        for name, fn, peak in (("torch fp32 (x @ W^T), fresh output", lambda: torch.nn.functional.linear(x, w),
                                "fp32_fma"),
                               ("torch fp32 (x @ W^T), output reused", lambda: torch.mm(x, w.t(), out=out_fp32),
                                "fp32_fma"),
                               ("sensimix int16 linear, fresh output", lambda: kernel.linear(x, prepared),
                                "int16_vpmaddwd"),
                               ("sensimix int16 GEMM, output reused", int16_gemm, "int16_vpmaddwd")):
            s = median_seconds(fn, args.reps)
            gmac = macs / s / 1e9
            out["gemms"].append({"gemm": name, "shape": [m, k, n_out], "gmac_per_s": gmac,
                                 "fraction_of_peak": gmac / (threads * out["peaks_gmac_per_core"][peak])})
    for name, g in out["peaks_gmac_per_core"].items():
        print(f"peak {name:<18} {g:7.1f} G multiply-adds/s per core")
    for g in out["gemms"]:
        print(f"{g['gemm']:<38} {g['gmac_per_s']:7.1f} G multiply-adds/s on {threads} threads = "
              f"{100 * g['fraction_of_peak']:.0f}% of its instruction's peak")
    if args.json:
        from sensimix.io import write_json

        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
