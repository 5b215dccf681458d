"""scripts/benchmark.py end to end in its quick mode (every row on a 6-layer BERT of bert-tiny's width), and its
options. The rows, the arithmetic and the peers are tested on their own: test_bench_*.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ORT_ROWS, ROOT, cpu_bench_rows, load_script

SCRIPT = ROOT / "scripts" / "benchmark.py"
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
ROUNDS = 2  # --quick: 2 rounds of one batch of 8 examples
# random:bert-tiny6 (vocabulary 30,522, width 128, 6 layers, FFN 512, 512 positions): its fp32 parameters, by hand
TINY6_EMBEDDINGS = 30522 * 128 + 512 * 128 + 2 * 128 + 2 * 128  # words, positions, segments, LayerNorm
TINY6_LAYER = 4 * (128 * 128 + 128) + 2 * 128 + (128 * 512 + 512) + (512 * 128 + 128) + 2 * 128  # 198,272
TINY6_PARAMETERS = TINY6_EMBEDDINGS + 6 * TINY6_LAYER + (128 * 128 + 128) + (128 * 2 + 2)  # + pooler, classifier


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One quick run (CPU; QNLI dev when $GLUE_DIR has it, else synthetic), its folders and ONNX files kept."""
    out = tmp_path_factory.mktemp("benchmark")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--no-progress",
                           "--keep-models", str(out / "models"), "--json", str(out / "benchmark.json")],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "best peer:" in proc.stdout
    return json.loads((out / "benchmark.json").read_text())


def rows_of(results: dict) -> dict[str, dict]:
    return {r["key"]: r for r in results["rows"]}


# ---------------------------------------------------------------------------------------------------
# the quick run
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_row_is_there_and_only_onnxruntime_may_be_missing(quick):
    assert [r["key"] for r in quick["rows"]] == cpu_bench_rows()
    for key, row in rows_of(quick).items():
        if key in ORT_ROWS and not HAS_ORT:
            assert "pip install 'sensimix[bench]'" in row["skipped"]
        else:
            assert "skipped" not in row, f"{key}: {row.get('skipped')}"
            assert row["ms_per_batch"] > 0 and len(row["ms_per_round"]) == ROUNDS


@pytest.mark.slow
def test_the_json_names_the_machine_and_the_settings(quick):
    env = quick["environment"]
    assert env["device"] == "cpu" and env["device_name"] and isinstance(env["cpu_flags"], list)
    assert env["torch"] and env["transformers"] and env["cpu_cores"] >= 1
    assert ("onnxruntime" in env) == HAS_ORT
    assert quick["settings"]["quick"] is True and quick["settings"]["batch_size"] == 8
    assert quick["schema"] == "sensimix-benchmark/2" and quick["data"] and 0 < quick["attended_fraction"] <= 1


@pytest.mark.slow
def test_the_rows_hold_this_runs_rounds_and_goals(quick):
    # the arithmetic on hand-computed rounds: test_bench_results.py; here, that the run feeds it its own rounds
    rows, trials = rows_of(quick), quick["timing_trials_ms"]
    assert len(trials) == ROUNDS
    for key, r in rows.items():
        if "ms_per_batch" in r:  # one batch per round: a round's ms is its batch's
            assert r["ms_per_round"] == [t[key] for t in trials], key
            assert all(math.isfinite(x) and x > 0 for x in (*r["ratio_per_round"], *r["ratio_vs_best_peer_per_round"]))
    assert rows[quick["best_peer"]]["group"] in ("baseline", "peer")
    goals = {g["id"]: g for g in quick["goals"]}
    assert list(goals) == ["fast_time_vs_best_peer", "calibrated_fast_time_vs_best_peer", "exact_time_vs_bert_fp32",
                           "fast_weight_memory_vs_bert_fp32", "exact_weight_memory_vs_bert_fp32",
                           "a8_exact_time_vs_best_peer"]
    assert goals["fast_time_vs_best_peer"]["against"] == quick["best_peer"]
    int16 = "ms_per_batch" in rows.get("sensimix-2+1-fp32-8bit-int16", {})  # an AVX2 CPU with a C compiler
    assert [g["id"] for g in goals.values() if g["met"] is None] == ([] if int16 else
                                                                     ["calibrated_fast_time_vs_best_peer"])


@pytest.mark.slow
def test_weight_memory_is_measured_per_model(quick):
    rows = rows_of(quick)
    timed = {k: r for k, r in rows.items() if "ms_per_batch" in r}
    for key, r in timed.items():
        assert r.get("weight_memory_bytes", 0) > 0, f"{key}: {r.get('error')}"
    # the baseline holds its 5,179,266 fp32 parameters (20.7 MB, counted by hand above), plus the allocator's slack
    assert TINY6_PARAMETERS == 5_179_266
    assert 1.0 <= timed["bert-fp32"]["weight_memory_bytes"] / (4 * TINY6_PARAMETERS) < 1.5
    # SensiMix (2+1) holds at least its int8 word embeddings (30,522 x 128 bytes) and far less than BERT's fp32
    assert 30522 * 128 <= timed["sensimix-2+1-fp32"]["weight_memory_bytes"] < 0.4 * 4 * TINY6_PARAMETERS
    if HAS_ORT:
        for geometry in ("bert", "bert3"):
            fp32, int8 = timed[f"{geometry}-ort-fp32"], timed[f"{geometry}-ort-int8"]
            assert int8["weight_memory_bytes"] < 0.6 * fp32["weight_memory_bytes"]
            assert timed[f"{geometry}-ort-int8-bucketed"]["same_model_as"] == f"{geometry}-ort-int8"


@pytest.mark.slow
def test_logit_gaps_against_the_reference_rows(quick):
    rows = rows_of(quick)
    for key, r in rows.items():
        if "skipped" in r or r["reference"] is None:
            continue
        assert r["reference"] in rows and 0 <= r["prediction_agreement"] <= 1
        assert math.isfinite(r["max_abs_logit_gap"])
    references = {"sensimix-2+1-fast": "sensimix-2+1-fp32", "sensimix-2+1-fast-padded": "sensimix-2+1-fp32",
                  "sensimix-2+1-bf16": "sensimix-2+1-fp32", "sensimix-3+3-fast": "sensimix-3+3-fp32",
                  "bert-torch-int8": "bert-fp32", "bert3-torch-int8": "bert3-fp32", "bert3-ort-int8": "bert3-fp32"}
    assert {k: rows[k]["reference"] for k in references} == references
    if HAS_ORT:  # the exported graph computes the transformers model, padded or bucketed
        for key in ("bert-ort-fp32", "bert-ort-fp32-bucketed", "bert3-ort-fp32", "bert3-ort-fp32-bucketed"):
            assert rows[key]["relative_logit_gap"] < 1e-4, key


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx not installed (pip install 'sensimix[bench]')")
def test_the_onnx_runtime_int8_peer_runs_an_integer_graph(quick):
    import onnx

    rows = rows_of(quick)
    for geometry in ("bert", "bert3"):
        int8, fp32 = rows[f"{geometry}-ort-int8"], rows[f"{geometry}-ort-fp32"]
        graph = onnx.load(int8["model_file"]).graph
        ops = {n.op_type for n in graph.node}
        assert ops & {"MatMulInteger", "QAttention", "DynamicQuantizeMatMul"}, ops
        integer = [i for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
        int_bytes = sum(math.prod(i.dims) for i in integer)
        assert int_bytes > 0.5 * sum(math.prod(i.dims) for i in graph.initializer)  # most weights are int8
        assert int8["int8_ops"] and sum(int8["int8_ops"].values()) > 0
        fp32_ops = {n.op_type for n in onnx.load(fp32["model_file"]).graph.node}
        assert not fp32_ops & {"MatMulInteger", "QAttention", "DynamicQuantizeLinear"}
        assert Path(int8["model_file"]).stat().st_size < 0.6 * Path(fp32["model_file"]).stat().st_size


def test_rows_option_takes_patterns_and_refuses_unknown_ones(capsys):
    bench = load_script("benchmark")
    args = bench.parse_args(["--rows", "bert3-ort-int8-bucketed, sensimix-2+1-fp32*"])
    assert args.rows == ["bert3-ort-int8-bucketed", "sensimix-2+1-fp32*"]
    assert bench.settings_of(args).rows == ("bert3-ort-int8-bucketed", "sensimix-2+1-fp32*")
    for bad, message in (("bert3-ort-int8-bucketed,nope", "no row key matches 'nope'; the keys are: bert-fp32"),
                         (" , ", "give at least one pattern")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--rows", bad])
        assert message in capsys.readouterr().err


def test_quick_settings():
    bench = load_script("benchmark")
    s = bench.settings_of(bench.parse_args(["--quick", "--device", "cpu", "--no-memory", "--no-progress"]))
    assert (s.bert, s.batch_size, s.seq_len, s.rounds, s.examples) == ("random:bert-tiny6", 8, 32, 2, 8)
    assert (s.memory, s.progress, s.ort_fusion, s.rows) == (False, False, True, None)
    s = bench.settings_of(bench.parse_args(["--device", "cpu"]))
    assert (s.bert, s.batch_size, s.seq_len, s.rounds, s.examples) == ("random:bert-base", 64, 128, 3, 64)


def test_bad_settings_are_one_line_before_any_work(tmp_path, capsys):
    bench = load_script("benchmark")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for argv, message in ((["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
                          (["--seq-len", "100000"], "argument --seq-len: must be in [5, 512]"),
                          (["--threads", "-1"], "argument --threads: must be >= 1"),
                          (["--quick", "--bert", "random:bert-tiny"], "--quick times its own"),
                          (["--json", str(tmp_path / "missing" / "b.json")], "does not exist; create it first"),
                          (["--json", str(notes)], "exists and is not a JSON file")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    assert notes.read_text() == "mine"
    # a folder the run cannot use: one line and exit 2, found before any model is built
    assert bench.main(["--quick", "--glue-dir", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmark.py: error: --glue-dir points to") and "Traceback" not in err
