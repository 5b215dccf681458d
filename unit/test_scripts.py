"""The measuring scripts beside the benchmark, each run once on a small workload: scripts/profile_forward.py (where a
forward's time goes) and scripts/cpu_peaks.py (the GEMMs against this CPU's instruction peaks)."""

from __future__ import annotations

import json

import pytest
from helpers import load_script

from sensimix.kernels import int16 as int16_kernel


def test_profile_forward_script_runs_and_writes_its_json(tmp_path):
    # scripts/profile_forward.py (run on the H200): wall vs host time and, on CUDA, kernels and graph replay
    script = load_script("profile_forward")
    out = tmp_path / "profile.json"
    assert script.main(["--device", "cpu", "--bert", "random:bert-tiny6", "--batches", "1", "--batch-size", "4",
                        "--seq-len", "16", "--passes", "1", "--top", "3", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["schema"] == "sensimix-profile/1" and saved["device"] == "cpu"
    rows = saved["rows"]
    assert set(rows) == {"sensimix-2+1-fast (exact)", "sensimix-2+1-fast, padding kept",
                         "sensimix-2+1-a8-fast (exact)", "bert3-fp32 (transformers, sdpa)"}
    assert all(r["ms"] > 0 and 0 < r["host_ms"] <= r["ms"] * 1.5 for r in rows.values())


@pytest.mark.skipif(int16_kernel.unavailable_reason() is not None,
                    reason="the int16 kernel cannot run on this CPU (AVX2 and a C compiler)")
def test_cpu_peaks_script_runs_and_writes_its_json(tmp_path):
    # scripts/cpu_peaks.py: the instruction peaks and the GEMMs' fraction of them (issue 10's closing evidence)
    script = load_script("cpu_peaks")
    out = tmp_path / "peaks.json"
    assert script.main(["--m", "60", "--reps", "1", "--iters", "100000", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["schema"] == "sensimix-cpu-peaks/1" and saved["environment"]["cpu"] and saved["threads"] >= 1
    assert set(saved["peaks_gmac_per_core"]) == {"fp32_fma", "int16_vpmaddwd", "u8s8_vpmaddubsw"}
    assert all(g > 0 for g in saved["peaks_gmac_per_core"].values())
    assert len(saved["gemms"]) == 4 and {g["gemm"].split(",")[0] for g in saved["gemms"]} == {
        "torch fp32 (x @ W^T)", "sensimix int16 linear", "sensimix int16 GEMM"}
    assert all(g["gmac_per_s"] > 0 and g["fraction_of_peak"] > 0 for g in saved["gemms"])
