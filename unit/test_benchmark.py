"""scripts/benchmark.py end to end in its quick mode (every row on a 6-layer BERT of bert-tiny's width), and the
peers' building blocks (sensimix.vv.peers): length bucketing, the row list, ONNX Runtime int8 really int8."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from sensimix.kernels import int16 as int16_kernel
from sensimix.vv.peers import LengthBuckets

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
ORT_ROWS = [f"{g}-ort-{p}{b}" for g in ("bert", "bert3") for p in ("fp32", "int8") for b in ("", "-bucketed")]

def cpu_rows() -> list[str]:
    """Every CPU row in order; the (2+1) kernel variants depend on what this CPU runs fast."""
    variants = [f"sensimix-2+1-{key}" for key, *_ in load_script().kernel_variants("cpu")]
    return ["bert-fp32", "bert-torch-int8", *ORT_ROWS[:4], "bert3-fp32", "bert3-torch-int8", *ORT_ROWS[4:],
            "bert-runtime-fp32-skip", "sensimix-2+1-fp32", "sensimix-2+1-fast", "sensimix-2+1-fast-padded", "sensimix-2+1-bf16", *variants,
            "sensimix-3+3-fp32", "sensimix-3+3-fast"]


ROUNDS = 2  # --quick


def load_script():
    spec = importlib.util.spec_from_file_location("sensimix_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert [r["key"] for r in quick["rows"]] == cpu_rows()
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
def test_ratios_are_consistent(quick):
    rows = rows_of(quick)
    timed = [r for r in rows.values() if "ms_per_batch" in r]
    base = rows["bert-fp32"]
    assert base["ratio_vs_bert_fp32"] == pytest.approx(1.0)
    assert base["ratio_per_round"] == pytest.approx([1.0] * ROUNDS)
    best = rows[quick["best_peer"]]
    assert best["group"] in ("baseline", "peer") and best["ratio_vs_best_peer"] == pytest.approx(1.0)
    for r in timed:
        assert all(math.isfinite(x) and x > 0 for x in (r["ratio_vs_bert_fp32"], r["ratio_vs_best_peer"],
                                                          *r["ratio_per_round"], *r["ratio_vs_best_peer_per_round"]))
        assert r["ratio_vs_bert_fp32"] == pytest.approx(r["ms_per_batch"] / base["ms_per_batch"], rel=1e-9)
        if r["group"] != "sensimix":
            assert r["ratio_vs_best_peer"] >= 1.0 - 1e-12
    goals = {g["id"]: g for g in quick["goals"]}
    assert set(goals) == {"fast_time_vs_best_peer", "calibrated_fast_time_vs_best_peer", "exact_time_vs_bert_fp32",
                          "fast_weight_memory_vs_bert_fp32", "exact_weight_memory_vs_bert_fp32"}
    assert goals["fast_time_vs_best_peer"]["ratio"] == pytest.approx(rows["sensimix-2+1-fast"]["ratio_vs_best_peer"])
    int16 = rows.get("sensimix-2+1-fp32-8bit-int16")  # an AVX2 CPU with a C compiler
    calibrated = goals.pop("calibrated_fast_time_vs_best_peer")
    if int16 is not None and "ms_per_batch" in int16:
        assert calibrated["ratio"] == pytest.approx(int16["ratio_vs_best_peer"])
    else:
        assert calibrated["ratio"] is None and calibrated["met"] is None
    assert all(isinstance(g["met"], bool) for g in goals.values())


@pytest.mark.slow
def test_weight_memory_is_measured_per_model(quick):
    rows = rows_of(quick)
    timed = {k: r for k, r in rows.items() if "ms_per_batch" in r}
    for key, r in timed.items():
        assert r.get("weight_memory_bytes", 0) > 0, f"{key}: {r.get('error')}"
    assert rows["bert-fp32"]["weight_memory_ratio_vs_bert_fp32"] == pytest.approx(1.0)
    # SensiMix (2+1) holds int8 embeddings and 3 layers: less than the fp32 BERT it came from
    assert timed["sensimix-2+1-fp32"]["weight_memory_bytes"] < timed["bert-fp32"]["weight_memory_bytes"]
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


# ---------------------------------------------------------------------------------------------------
# building blocks (fast)
# ---------------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.widths = inner, []

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.widths.append(input_ids.shape[1])
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@pytest.mark.parametrize("buckets", [1, 4, 13])
def test_length_buckets_keep_the_logits_and_cut_the_padding(tiny_bert_config, buckets):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config).eval()
    n, width = 11, 24
    lengths = torch.tensor([24, 3, 7, 24, 12, 5, 18, 9, 2, 15, 6])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(5, tiny_bert_config.vocab_size, (n, width)).masked_fill(mask == 0, 0)
    types = (torch.arange(width)[None] >= (lengths[:, None] // 2)).long() * mask
    recorder = Recorder(model)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = LengthBuckets(recorder, buckets)(ids, mask, types)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(recorder.widths) == min(buckets, n) and recorder.widths == sorted(recorder.widths)
    assert recorder.widths[-1] == width and (buckets == 1 or recorder.widths[0] < width)


def test_row_list_without_onnxruntime_and_on_cuda():
    bench = load_script()
    sensimix = {bench.LIKE_FOR_LIKE: Path("bert-packed"), (3, 2): Path("sm21"), (6, 3): Path("sm33")}
    specs = bench.model_specs(Path("bert"), "BERT-base", sensimix, {}, "onnxruntime/onnx not installed", "cpu", 4)
    assert [s.key for s in specs] == cpu_rows()
    assert "sensimix-2+1-fp32-8bit-dense" in cpu_rows()  # the exact path's other 8-bit kernel, on every CPU
    from sensimix import kernels

    int16_runs = kernels.INDEX8_KERNELS["int16"].unavailable(torch.device("cpu")) is None
    assert ("sensimix-2+1-fp32-8bit-int16" in cpu_rows()) == int16_runs  # the approximate kernel, by name
    assert all(bool(s.skipped) == (s.key in ORT_ROWS) for s in specs)
    cuda = {s.key: s for s in bench.model_specs(Path("bert"), "BERT-base", sensimix, {}, None, "cuda", 4)}
    assert {"bert-fp16", "bert3-fp16", "bert-runtime-fp16-skip", "sensimix-2+1-fp16",
            "sensimix-2+1-fp32-8bit-bf16x3"} <= set(cuda)
    assert cuda["sensimix-2+1-fp32-8bit-bf16x3"].precision == "fp32"
    assert all(cuda[k].skipped for k in [*ORT_ROWS, "bert-torch-int8", "bert3-torch-int8"])
    assert not any(s.skipped for k, s in cuda.items() if k not in [*ORT_ROWS, "bert-torch-int8", "bert3-torch-int8"])


def test_profile_forward_script_runs_and_writes_its_json(tmp_path):
    # scripts/profile_forward.py (run on the H200): wall vs host time and, on CUDA, kernels and graph replay
    spec = importlib.util.spec_from_file_location("sensimix_profile_script", SCRIPT.parent / "profile_forward.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "profile.json"
    assert script.main(["--device", "cpu", "--bert", "random:bert-tiny6", "--batches", "1", "--batch-size", "4",
                        "--seq-len", "16", "--passes", "1", "--top", "3", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["schema"] == "sensimix-profile/1" and saved["device"] == "cpu"
    rows = saved["rows"]
    assert set(rows) == {"sensimix-2+1-fast (exact)", "sensimix-2+1-fast, padding kept",
                         "bert3-fp32 (transformers, sdpa)"}
    assert all(r["ms"] > 0 and 0 < r["host_ms"] <= r["ms"] * 1.5 for r in rows.values())


@pytest.mark.skipif(int16_kernel.unavailable_reason() is not None,
                    reason="the int16 kernel cannot run on this CPU (AVX2 and a C compiler)")
def test_cpu_peaks_script_runs_and_writes_its_json(tmp_path):
    # scripts/cpu_peaks.py: the instruction peaks and the GEMMs' fraction of them (issue 10's closing evidence)
    spec = importlib.util.spec_from_file_location("sensimix_cpu_peaks_script", SCRIPT.parent / "cpu_peaks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "peaks.json"
    assert script.main(["--m", "60", "--reps", "1", "--iters", "100000", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["schema"] == "sensimix-cpu-peaks/1" and saved["environment"]["cpu"] and saved["threads"] >= 1
    assert set(saved["peaks_gmac_per_core"]) == {"fp32_fma", "int16_vpmaddwd", "u8s8_vpmaddubsw"}
    assert all(g > 0 for g in saved["peaks_gmac_per_core"].values())
    assert len(saved["gemms"]) == 4 and {g["gemm"].split(",")[0] for g in saved["gemms"]} == {
        "torch fp32 (x @ W^T)", "sensimix int16 linear", "sensimix int16 GEMM"}
    assert all(g["gmac_per_s"] > 0 and g["fraction_of_peak"] > 0 for g in saved["gemms"])


def test_rows_option_selects_rows_and_refuses_unknown_patterns(capsys):
    bench = load_script()
    args = bench.parse_args(["--rows", "bert3-ort-int8-bucketed, sensimix-2+1-fp32*"])
    assert args.rows == ["bert3-ort-int8-bucketed", "sensimix-2+1-fp32*"]
    sensimix = {bench.LIKE_FOR_LIKE: Path("bert-packed"), (3, 2): Path("sm21"), (6, 3): Path("sm33")}
    specs = bench.select_rows(bench.model_specs(Path("bert"), "BERT-base", sensimix, {}, None, "cpu", 4), args.rows)
    keys = [s.key for s in specs]
    assert keys[:2] == ["bert-fp32", "bert3-ort-int8-bucketed"], "the baseline always runs: every % is relative to it"
    assert set(keys[2:]) == {k for k in cpu_rows() if k.startswith("sensimix-2+1-fp32")}
    for bad, message in (("bert3-ort-int8-bucketed,nope", "no row key matches 'nope'; the keys are: bert-fp32"),
                         (" , ", "give at least one pattern")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--rows", bad])
        assert message in capsys.readouterr().err


def test_bad_settings_are_one_line_before_any_work(tmp_path, capsys):
    bench = load_script()
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
