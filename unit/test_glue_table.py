"""The GLUE table (scripts/glue_table.py, sensimix.bench.glue): each plan's run list written out by hand, resuming
(done runs skipped, a cut last line), the metrics and the summary arithmetic on hand-computed figures, the time
left, the refusals (one line, exit 2, nothing written), and one tiny end-to-end session with a few training steps."""

from __future__ import annotations

import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import load_script
from transformers import BertConfig

from sensimix.bench.glue import metrics as M
from sensimix.bench.glue.plans import CPU_TRAIN_LIMITS, RunSpec, plan_runs, protocol_for
from sensimix.bench.glue.results import SCHEMA, NotResultsFile, append_result, read_results
from sensimix.bench.glue.runner import (Context, check_done, duration, estimate_left, reference_problem,
                                        run_all)
from sensimix.bench.glue.summary import machine_slug, render, summarize, verdict
from sensimix.io import OutputError, file_sha256
from sensimix.train.provenance import training_examples

REF, FULL = "fp32", "full"


def R(task, seed, model=REF, act="fp32", ablation=FULL) -> RunSpec:
    return RunSpec(task, seed, model, act, ablation)


def five(task, seed) -> list[RunSpec]:
    """The reference and the four full-recipe SensiMix runs of one (task, seed), in plan order."""
    return [R(task, seed), R(task, seed, "3+3"), R(task, seed, "3+3", "a8"), R(task, seed, "2+1"),
            R(task, seed, "2+1", "a8")]


# ---------------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------------
def test_a8_decision_plan_is_sst2_and_mrpc_both_activations_two_seeds():
    assert plan_runs(["a8-decision"]) == five("sst-2", 42) + five("sst-2", 43) + five("mrpc", 42) + five("mrpc", 43)


def seven(task, seed) -> list[RunSpec]:
    """:func:`five` and the int8 peers of the (3+3) and the (2+1)."""
    return five(task, seed) + [R(task, seed, "bert6-int8", "int8"), R(task, seed, "bert3-int8", "int8")]


def test_table_plan_seeds_per_task_on_cpu_and_cuda():
    cpu = plan_runs(["table"])
    assert cpu == (seven("sst-2", 42) + seven("mrpc", 42) + seven("mrpc", 43) + seven("mrpc", 44) + seven("rte", 42)
                   + seven("rte", 43) + seven("rte", 44) + seven("cola", 42))
    cuda = plan_runs(["table"], "cuda")
    assert len(cuda) == 84 and {(r.task, r.seed) for r in cuda} == {(t, s) for t in ("sst-2", "mrpc", "rte", "cola")
                                                                      for s in (42, 43, 44)}


def test_ablation_plan_skips_the_2plus1_ilf_ablation_that_is_its_full_recipe():
    runs = plan_runs(["ablation"])
    per_seed = ([R("mrpc", 42)] + [R("mrpc", 42, "3+3", "fp32", a) for a in
                                   ("full", "no-abwr", "no-pt", "no-ilf", "no-distill")]
                + [R("mrpc", 42, "2+1", "fp32", a) for a in ("full", "no-abwr", "no-pt", "no-distill")])
    assert runs[:10] == per_seed and len(runs) == 60
    assert {(r.task, r.seed) for r in runs} == {(t, s) for t in ("mrpc", "rte") for s in (42, 43, 44)}
    assert R("rte", 44, "2+1", "fp32", "no-ilf") not in runs


def test_plans_merge_without_repeats_and_axes_replace():
    both = plan_runs(["table", "ablation"])
    assert len(both) == len(set(both)) == 56 + 60 - 18  # shared: 6 references, 12 full-recipe fp32 runs
    assert both[:7] == seven("sst-2", 42)  # task order, then seed; the reference first
    assert plan_runs(["table"], tasks=["mrpc"], models=["2+1"], seeds=[7]) == [R("mrpc", 7), R("mrpc", 7, "2+1"),
                                                                               R("mrpc", 7, "2+1", "a8")]
    assert plan_runs(["a8-decision"], tasks=["rte"], activations=["a8"], models=[]) == [R("rte", 42), R("rte", 43)]
    # an int8 peer runs its int8 whatever --activations says, and only with the full recipe
    assert plan_runs(["table"], tasks=["rte"], seeds=[1], models=["bert3-int8"], activations=["a8"]) == [
        R("rte", 1), R("rte", 1, "bert3-int8", "int8")]
    assert plan_runs(["table"], tasks=["rte"], seeds=[1], models=["bert3-int8"], ablations=["no-pt"]) == [R("rte", 1)]
    with pytest.raises(ValueError, match="unknown plan 'nope'"):
        plan_runs(["nope"])


def test_protocols_cpu_subsets_cuda_everything_and_the_settings_of_each_run():
    cpu = protocol_for("sst-2", "cpu", "minilm")
    assert cpu.train_limit == CPU_TRAIN_LIMITS["sst-2"] == 2000 and cpu.max_seq_length == 64
    assert protocol_for("mrpc", "cpu", "minilm").train_limit is None
    assert protocol_for("sst-2", "cuda", "minilm").train_limit is None
    assert protocol_for("sst-2", "cuda", "minilm", train_limits={"sst-2": 500}).train_limit == 500
    p = protocol_for("mrpc", "cpu", "minilm")
    assert p.digest == protocol_for("mrpc", "cpu", "minilm").digest != protocol_for(
        "mrpc", "cpu", "minilm", train_limits={"mrpc": 100}).digest
    ref, full33 = p.settings(R("mrpc", 43), "cpu"), p.settings(R("mrpc", 43, "3+3"), "cpu")
    assert (ref.epochs, ref.seed, ref.batch_size, ref.learning_rate, ref.max_seq_length) == (2.0, 43, 32, 5e-5, 128)
    assert (full33.epochs, full33.abwr, full33.pt, full33.ilf, full33.distill) == (4.0, True, True, True, True)
    assert not full33.fast_calibration  # the table scores the exact path
    no_pt = p.settings(R("mrpc", 43, "3+3", "fp32", "no-pt"), "cpu")
    assert (no_pt.epochs, no_pt.pt, no_pt.abwr) == (4.0, False, True)  # the full recipe's budget
    assert p.settings(R("mrpc", 43, "2+1", "fp32", "no-distill"), "cpu").distill is False
    assert p.settings(R("mrpc", 43, "2+1"), "cpu").epochs == 2.0
    for peer, epochs in (("bert3-int8", 2.0), ("bert6-int8", 4.0)):  # the SensiMix model of its depth's budget
        got = p.settings(R("mrpc", 43, peer, "int8"), "cpu")
        assert (got.epochs, got.distill, got.abwr, got.pt, got.ilf) == (epochs, True, False, False, False)


# ---------------------------------------------------------------------------------------------------
# metrics and summaries, by hand
# ---------------------------------------------------------------------------------------------------
def test_metrics_on_hand_computed_confusion_matrices():
    preds, labels = [1, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0, 1, 1]
    assert M.confusion(preds, labels) == (3, 1, 2, 2)  # tp fp fn tn
    got = M.glue_metrics("mrpc", preds, labels)
    assert list(got) == ["f1", "accuracy"]
    assert got["accuracy"] == 5 / 8 and got["f1"] == pytest.approx(6 / 9)
    cola = M.glue_metrics("cola", preds, labels)
    assert cola["mcc"] == pytest.approx((3 * 2 - 1 * 2) / math.sqrt(4 * 5 * 3 * 4))  # 4 / sqrt(240)
    assert M.glue_metrics("cola", [1, 0, 1, 0], [0, 1, 0, 1])["mcc"] == pytest.approx(-1.0)
    assert M.glue_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0])["mcc"] == 0.0  # one class predicted: no correlation
    assert M.glue_metrics("mrpc", [0, 0], [0, 0])["f1"] == 0.0
    assert list(M.glue_metrics("rte", [1], [1])) == ["accuracy"]
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        M.confusion([0, 1], [1])


def rec(task, seed, model=REF, act="fp32", ablation=FULL, score=0.5, digest="p1", **extra) -> dict:
    metric = M.TASK_METRICS[task]
    return {"schema": SCHEMA, "task": task, "model": model, "activations": act, "ablation": ablation, "seed": seed,
            "protocol_digest": digest, "metrics": {m: score for m in (*metric, "accuracy")},
            "model_bytes": {"fp32": 90e6, "3+3": 12e6, "2+1": 9e6, "bert3-int8": 15e6, "bert6-int8": 23e6}[model],
            "train_examples": 2490,
            "machine": {"device": "cpu", "cpu": "AMD EPYC", "cpu_cores": 2, "cpu_flags": ["avx2", "fma"],
                        "git_commit": "abc1234"}} | extra


# RTE accuracy per seed (42, 43, 44); the expected figures below are worked out by hand
RTE = {("fp32", "fp32", FULL): (0.60, 0.62, 0.64), ("3+3", "fp32", FULL): (0.59, 0.60, 0.64),
       ("3+3", "a8", FULL): (0.58, 0.61, 0.63), ("3+3", "fp32", "no-abwr"): (0.55, 0.57, 0.60),
       ("3+3", "fp32", "no-pt"): (0.60, 0.59, 0.65), ("3+3", "fp32", "no-ilf"): (0.62, 0.63, 0.66)}


def records() -> list[dict]:
    out = [rec("rte", s, m, a, ab, score) for (m, a, ab), scores in RTE.items()
           for s, score in zip((42, 43, 44), scores)]
    out += [rec("rte", 42, "2+1", score=0.50), rec("rte", 42, "2+1", ablation="no-distill", score=0.49)]
    out += [rec("rte", 42, score=0.7, digest="p2")]  # another protocol: its own row, never averaged in
    out += [rec("rte", 42, "bert3-int8", "int8", score=0.53, model_file="model.int8.onnx")]
    out += [rec("rte", s, "bert6-int8", "int8", score=x, model_file="model.int8.onnx", fp32_metrics={"accuracy": f})
            for s, x, f in zip((42, 43, 44), (0.57, 0.58, 0.60), (0.58, 0.58, 0.61))]
    return out


def test_summary_means_spreads_gaps_a8_and_ablation_by_hand():
    s = summarize(records())
    rows = {(r["model"], r["activations"], r["protocol_digest"]): r for r in s["table"]}
    ref = rows[("fp32", "fp32", "p1")]["metrics"]["accuracy"]
    assert ref["mean"] == pytest.approx(62.0) and ref["spread"] == pytest.approx(2.0) and ref["n"] == 3
    assert rows[("fp32", "fp32", "p2")]["metrics"]["accuracy"] == {"mean": pytest.approx(70.0), "spread": None, "n": 1}
    assert rows[("3+3", "fp32", "p1")]["model_mb"] == 12.0
    gaps = {(g["model"], g["activations"]): g["gap"]["accuracy"] for g in s["gap_to_reference"]}
    assert gaps[("3+3", "fp32")]["mean"] == pytest.approx(1.0)
    assert gaps[("3+3", "fp32")]["spread"] == pytest.approx(1.0)
    assert gaps[("2+1", "fp32")] == {"mean": pytest.approx(10.0), "spread": None, "n": 1, "seeds": [42]}
    (a8,) = s["a8_vs_fp32"]  # A8 - fp32 per seed: -1, +1, -1
    assert a8["difference"]["accuracy"]["mean"] == pytest.approx(-1 / 3)
    assert a8["difference"]["accuracy"]["spread"] == pytest.approx(math.sqrt(4 / 3))
    effects = {(a["model"], a["ablation"]): (a["effect"]["accuracy"], a["verdict"]["accuracy"]) for a in s["ablation"]}
    assert effects[("3+3", "no-abwr")][0]["mean"] == pytest.approx(11 / 3)   # 4, 3, 4
    assert effects[("3+3", "no-abwr")][0]["spread"] == pytest.approx(math.sqrt(1 / 3))
    assert effects[("3+3", "no-abwr")][1] == "helps"
    assert effects[("3+3", "no-pt")][1] == "inside the noise"                  # -1, 1, -1
    assert effects[("3+3", "no-ilf")][0]["mean"] == pytest.approx(-8 / 3)     # -3, -3, -2
    assert effects[("3+3", "no-ilf")][1] == "hurts"
    assert effects[("2+1", "no-distill")][1] == "one seed: no spread"
    assert any("one 1-bit layer" in why for why in s["not_run"])
    verdicts = {g["goal"].split(" within")[0]: g["met"] for g in s["goals"]}
    assert verdicts["SensiMix (3+3) fp32 activations"] is True      # gap 1.0 <= 1.0
    assert verdicts["SensiMix (3+3) a8 activations"] is False       # gaps 2, 1, 1: mean 1.33 > 1.0
    assert verdicts["SensiMix (2+1) fp32 activations"] is False     # 10 > 3
    assert verdicts["SensiMix (2+1) a8 activations"] is None        # no data
    assert verdicts["A8"] is True                                   # -0.33 >= -0.5
    assert "no-abwr" not in json.dumps(s["table"])  # the table holds the full recipe only
    peer = rows[("bert3-int8", "int8", "p1")]
    assert peer["model_file"] == "model.int8.onnx" and peer["model_mb"] == 15.0
    assert rows[("2+1", "fp32", "p1")]["model_file"] == "pytorch_model.bin"
    vs = {(d["model"], d["activations"], d["peer"]): (d["difference"]["accuracy"], d["verdict"]["accuracy"])
          for d in s["vs_int8_peer"]}
    assert list(vs) == [("3+3", "fp32", "bert6-int8"), ("3+3", "a8", "bert6-int8"), ("2+1", "fp32", "bert3-int8")]
    assert vs[("2+1", "fp32", "bert3-int8")][0]["mean"] == pytest.approx(-3.0)  # seed 42: 50 - 53
    assert vs[("2+1", "fp32", "bert3-int8")][1] == "one seed: no spread"
    diff, judged = vs[("3+3", "fp32", "bert6-int8")]  # 59 - 57, 60 - 58, 64 - 60
    assert diff["mean"] == pytest.approx(8 / 3) and diff["spread"] == pytest.approx(math.sqrt(4 / 3))
    assert judged == "SensiMix higher" and vs[("3+3", "a8", "bert6-int8")][1] == "SensiMix higher"  # 1, 3, 3
    cost = {d["model"]: d["difference"]["accuracy"] for d in s["int8_cost"]}
    assert cost["bert6-int8"]["mean"] == pytest.approx(-2 / 3) and cost["bert6-int8"]["n"] == 3  # -1, 0, -1
    assert cost["bert3-int8"]["n"] == 0  # no fp32 score recorded
    peer_gap = next(g for g in s["gap_to_reference"] if g["model"] == "bert3-int8")
    assert peer_gap["goal_points"] is None and peer_gap["gap"]["accuracy"]["mean"] == pytest.approx(7.0)
    assert all(g["goal"].startswith("SensiMix") or g["goal"].startswith("A8") for g in s["goals"])


def test_noise_rule_and_duration_and_machine_slug():
    assert verdict({"mean": 0.5, "spread": 0.5, "n": 3}) == "inside the noise"  # |effect| <= spread
    assert verdict({"mean": -0.51, "spread": 0.5, "n": 3}) == "hurts"
    assert verdict({"mean": 0.0, "spread": 0.0, "n": 2}) == "inside the noise"
    assert (duration(None), duration(45), duration(750), duration(11100)) == ("?", "45s", "12m30s", "3h05m")
    assert machine_slug(records()) == "cpu-amd-epyc-2core-avx2"
    gpu = rec("rte", 1, machine={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"})
    assert machine_slug([gpu]) == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="2 machines"):
        machine_slug(records() + [gpu])


def test_time_left_from_the_runs_done_so_far():
    p = {"mrpc": protocol_for("mrpc", "cpu", "m"), "rte": protocol_for("rte", "cpu", "m")}
    d = p["mrpc"].digest
    done = [rec("mrpc", 42, "3+3", wall_s=100.0, digest=d), rec("mrpc", 43, "3+3", wall_s=200.0, digest=d),
            rec("mrpc", 42, wall_s=60.0, digest=d),
            rec("mrpc", 43, wall_s=5.0, digest=d, reference={"reused": True})]  # no training in it: left out
    pending = [R("mrpc", 44, "3+3"), R("mrpc", 44, "2+1"), R("rte", 42)]
    # 3+3: its own mean 150; 2+1: mrpc's mean (100 + 200 + 60) / 3 = 120; rte: every run's mean, 120
    assert estimate_left(pending, done, p) == (pytest.approx(390.0), 1)
    assert estimate_left(pending, [], p) == (None, 0)


# ---------------------------------------------------------------------------------------------------
# the results file and resuming
# ---------------------------------------------------------------------------------------------------
def stub_context(tmp_path, tasks=("mrpc",)) -> Context:
    return Context(glue_dir=tmp_path, work=tmp_path / "work", device="cpu", pretrained="m",
                   protocols={t: protocol_for(t, "cpu", "m") for t in tasks}, machine={"device": "cpu"})


def fake_execute(calls):
    def execute(spec, ctx, out):
        calls.append(spec)
        return {"task": spec.task, "model": spec.model, "activations": spec.activations, "ablation": spec.ablation,
                "seed": spec.seed, "protocol_digest": ctx.protocols[spec.task].digest,
                "metrics": {"f1": 0.8, "accuracy": 0.75}, "wall_s": 10.0}
    return execute


def test_resume_runs_only_what_the_file_lacks_and_redoes_a_cut_last_line(tmp_path):
    ctx, results, lines = stub_context(tmp_path), tmp_path / "r.jsonl", []
    runs = plan_runs(["a8-decision"], tasks=["mrpc"], seeds=[42])  # 5 runs
    first = []
    run_all(runs, ctx, results, execute=fake_execute(first), out=lines.append, max_runs=2)
    assert first == runs[:2] and len(results.read_text().splitlines()) == 2
    with open(results, "a") as f:  # a third line cut short by a crash elsewhere
        f.write('{"schema": "sensimix-glue-run/1", "task": "mrpc", "mo')
    loaded = read_results(results)
    assert len(loaded.records) == 2 and "cut short" in loaded.truncated
    second = []
    outcome = run_all(runs, ctx, results, execute=fake_execute(second), out=lines.append)
    assert second == runs[2:] and (outcome.ran, outcome.skipped) == (3, 2)
    assert any("cut short" in line for line in lines) and any("left ~" in line for line in lines)
    text = results.read_text()
    assert text.endswith("\n") and [json.loads(x)["model"] for x in text.splitlines()] == [
        r.model for r in runs] and "task\": \"mrpc\", \"mo\n" not in text
    again = []
    run_all(runs, ctx, results, execute=fake_execute(again), out=lines.append)
    assert again == []
    changed = stub_context(tmp_path)
    changed.protocols["mrpc"] = protocol_for("mrpc", "cpu", "m", train_limits={"mrpc": 64})  # another protocol
    run_all(runs[:1], changed, results, execute=fake_execute(again), out=lines.append)
    assert again == runs[:1]


def test_a_second_session_on_the_same_results_file_is_refused_at_once(tmp_path):
    ctx, results = stub_context(tmp_path), tmp_path / "r.jsonl"

    def execute(spec, c, out):  # while this session runs, another one starts on the same file
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(run_all, [spec], c, results, execute=fake_execute([]), out=lambda _: None)
            with pytest.raises(OutputError, match="another thread of this process is writing"):
                other.result()
        return fake_execute([])(spec, c, out)

    assert run_all([R("mrpc", 1)], ctx, results, execute=execute, out=lambda _: None).ran == 1
    assert len(read_results(results).records) == 1


def test_a_reference_folder_is_reused_only_when_it_is_the_one_asked_for(tmp_path, glue4):
    ctx = Context(glue_dir=glue4, work=tmp_path, device="cpu", pretrained="/models/minilm",
                  protocols={"rte": protocol_for("rte", "cpu", "minilm", train_limits={"rte": 8})},
                  machine={})
    spec, folder = R("rte", 3), ctx.reference_folder("rte", 3)
    assert folder.parent == tmp_path / "references" and folder.name.startswith("rte-seed3-")
    assert ctx.reference_folder("rte", 4) != folder
    folder.mkdir(parents=True)
    assert reference_problem(folder, spec, ctx) == "it lacks config.json, pytorch_model.bin, training_metrics.json"
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"0")
    settings = ctx.protocols["rte"].settings(spec, "cpu").as_dict()
    _, record = training_examples("rte", glue4, train_limit=8, seed=3)
    metrics = {"task": "rte", "bert": "/models/minilm", "settings": settings, "train_data": record}

    def problem(**changes) -> str | None:
        (folder / "training_metrics.json").write_text(json.dumps(metrics | changes))
        return reference_problem(folder, spec, ctx)

    assert problem() is None
    assert problem(settings=settings | {"device": "cuda", "logging_steps": 7}) is None  # they change no weight
    assert problem(task="mrpc") == "it was fine-tuned on 'mrpc', not rte"
    assert problem(bert="/elsewhere") == "it was fine-tuned from '/elsewhere', not /models/minilm"
    assert problem(settings=settings | {"learning_rate": 1e-4}) == "its training settings differ (learning_rate)"
    other = training_examples("rte", glue4, train_limit=8, seed=4)[1]
    assert "its training data differ: this numpy draws other rows" in problem(train_data=other | {"seed": 3})


def test_results_file_not_ours_is_refused_and_a_line_without_newline_is_kept(tmp_path):
    for text in ("hello\n", '{"schema": "other/1", "task": "mrpc"}\n', "\xff", "x"):
        path = tmp_path / "bad.jsonl"
        path.write_text(text, encoding="latin-1")
        with pytest.raises(NotResultsFile, match="not a results file of scripts/glue_table.py"):
            read_results(path)
    good = tmp_path / "good.jsonl"
    loaded = read_results(good)
    append_result(good, loaded, {"task": "rte", "model": "fp32", "activations": "fp32", "ablation": "full",
                                 "seed": 1, "protocol_digest": "d", "metrics": {"accuracy": float("nan")}})
    assert good.read_text().startswith('{"schema": "sensimix-glue-run/1"') and loaded.records[0]["metrics"] == {
        "accuracy": None}
    good.write_text(good.read_text().rstrip("\n"))  # complete, only its newline lost
    assert len(read_results(good).records) == 1 and read_results(good).truncated is None


# ---------------------------------------------------------------------------------------------------
# the command: refusals and one tiny session
# ---------------------------------------------------------------------------------------------------
WORDS = {1: ("good", "great"), 0: ("bad", "awful")}


@pytest.fixture(scope="module")
def glue4(tmp_path_factory):
    """SST-2, MRPC, RTE, CoLA (train 16, dev 8 rows each) and QNLI dev only, of the tiny vocabulary's words."""
    root = tmp_path_factory.mktemp("glue4")
    rows = [(f"the {noun} was {WORDS[y][i % 2]}", f"it is {'very ' * (i % 2)}{WORDS[y][1 - i % 2]}", y)
            for i in range(24) for noun, y in [(("movie", "film")[i % 2], i % 3 % 2)]]
    layouts = {"SST-2": ("sentence\tlabel", lambda a, b, y: f"{a}\t{y}"),
               "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda a, b, y: f"{y}\t1\t2\t{a}\t{b}"),
               "RTE": ("index\tsentence1\tsentence2\tlabel",
                       lambda a, b, y: f"0\t{a}\t{b}\t{('not_entailment', 'entailment')[y]}"),
               "CoLA": (None, lambda a, b, y: f"src\t{y}\t*\t{a}")}
    for name, (header, line) in layouts.items():
        (root / name).mkdir()
        for split, part in (("train", rows[:16]), ("dev", rows[16:])):
            text = [header] if header else []
            (root / name / f"{split}.tsv").write_text("\n".join(text + [line(*r) for r in part]) + "\n")
    (root / "QNLI").mkdir()
    (root / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\twhat is it\tit is good\tentailment\n")
    return root


def refused(capsys, tmp_path, argv) -> str:
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()  # what fixtures printed
    assert load_script("glue_table").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("glue_table: error: ")
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    return err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "qnli"], "unknown task 'qnli' (QNLI has no train split here)"),
    (["--tasks", "sst2x"], "unknown task 'sst2x'"),
    (["--plan", "everything"], "unknown plan 'everything'; choose from a8-decision, table, ablation"),
    (["--models", "4+2"], "unknown model '4+2'"),
    (["--train-limit", "qnli=5"], "unknown task 'qnli'"),
])
def test_bad_selections_are_refused_in_one_line(capsys, tmp_path, glue4, argv, message):
    assert message in refused(capsys, tmp_path, ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4),
                                                 *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path, glue4):
    err = refused(capsys, tmp_path, ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4),
                                     "--device", "cuda"])
    assert "CUDA is not available" in err


def test_a_results_file_that_is_not_ours_is_refused_untouched(capsys, tmp_path, glue4, tiny_bert_dir):
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"loss": 0.3}\n')
    err = refused(capsys, tmp_path, ["--results", str(foreign), "--glue-dir", str(glue4), "--pretrained",
                                     str(tiny_bert_dir), "--tasks", "rte", "--models", "2+1", "--max-seq-length", "32"])
    assert "line 1 is not a sensimix-glue-run/1 record" in err and foreign.read_text() == '{"loss": 0.3}\n'
    assert "no such file" in refused(capsys, tmp_path, ["--report", "--results", str(tmp_path / "none.jsonl")])
    err = refused(capsys, tmp_path, ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4), "--pretrained",
                                     str(tiny_bert_dir), "--tasks", "rte"])  # a 4-layer BERT: no (3+3) from it
    assert "has 4 layers, fewer than SensiMix (3+3) keeps" in err


def test_dry_run_lists_the_runs_and_writes_nothing(capsys, tmp_path, glue4, tiny_bert_dir):
    capsys.readouterr()
    assert load_script("glue_table").main(["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4),
                                           "--pretrained", str(tiny_bert_dir), "--plan", "ablation", "--models",
                                           "2+1", "--seeds", "5", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "to run  rte SensiMix (2+1) fp32 no-pt seed 5" in out and "no-ilf" not in out
    assert "10 runs: 0 done, 10 to run (~?)" in out and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_tiny_session_trains_resumes_reuses_the_reference_and_reports(capsys, tmp_path, glue4, tiny_bert_dir,
                                                                        monkeypatch):
    script, results = load_script("glue_table"), tmp_path / "runs.jsonl"
    argv = ["--results", str(results), "--glue-dir", str(glue4), "--pretrained", str(tiny_bert_dir), "--device",
            "cpu", "--tasks", "mrpc", "--models", "2+1", "--seeds", "1", "--max-steps", "1", "--train-limit", "8",
            "--batch-size", "4", "--max-seq-length", "32"]
    assert script.main(argv) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [(x["model"], x["activations"]) for x in lines] == [("fp32", "fp32"), ("2+1", "fp32"), ("2+1", "a8")]
    first = lines[1]
    assert set(first["metrics"]) == {"f1", "accuracy"} and first["dev_examples"] == 8
    assert first["settings"]["max_steps"] == 1 and first["settings"]["distill"] is True
    assert first["eval"]["precision"] == "fp32" and first["model_bytes"] > 0 and first["machine"]["torch"]
    models = tmp_path / "runs-work" / "models"
    assert models.is_dir() and not list(models.glob("mrpc-2+1-fp32-full-seed1-*"))  # scored, then deleted
    out = capsys.readouterr().out
    assert "3/3" in out and "left ~" in out

    from sensimix import train

    monkeypatch.setattr(train, "finetune", lambda *a, **k: pytest.fail("the reference was fine-tuned again"))
    assert script.main(argv + ["--activations", "fp32", "--ablation", "full", "no-abwr"]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["ablation"] == "no-abwr" and lines[-1]["settings"]["abwr"] is False
    assert lines[-1]["reference"]["reused"] is True
    assert lines[-1]["reference"]["pytorch_model_sha256"] == lines[0]["reference"]["pytorch_model_sha256"]
    assert "3 runs in the plan: 2 already in" in capsys.readouterr().out

    report = tmp_path / "table.json"
    assert script.main(["--report", "--results", str(results), "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["schema"] == "sensimix-glue-table/1" and saved["runs"] == 4
    assert {(r["model"], r["activations"]) for r in saved["table"]} == {("fp32", "fp32"), ("2+1", "fp32"),
                                                                        ("2+1", "a8")}
    assert (tmp_path / "table.png").stat().st_size > 0
    assert "Noise rule" in capsys.readouterr().out


def _has_ort() -> bool:
    from sensimix.bench.peers import ort_missing

    return ort_missing() is None


@pytest.mark.slow
@pytest.mark.skipif(not _has_ort(), reason="the int8 peers need ONNX Runtime (the bench extra)")
def test_int8_peers_cut_distil_quantize_and_score_and_never_touch_the_reference(capsys, tmp_path, glue4,
                                                                                tiny_bert_dir, tiny_bert_config):
    from transformers import BertForSequenceClassification

    script = load_script("glue_table")
    common = ["--glue-dir", str(glue4), "--device", "cpu", "--tasks", "mrpc", "--seeds", "1", "--max-steps", "1",
              "--train-limit", "8", "--batch-size", "4", "--max-seq-length", "32", "--models", "2+1", "bert3-int8",
              "--activations", "fp32"]
    # a 4-layer BERT: the peer is the reference's first 3 layers, distilled as the (2+1) is
    results = tmp_path / "cut.jsonl"
    assert script.main(["--results", str(results), "--pretrained", str(tiny_bert_dir), *common]) == 0
    ref, sm, peer = (json.loads(x) for x in results.read_text().splitlines())
    assert (peer["model"], peer["activations"], peer["ablation"]) == ("bert3-int8", "int8", "full")
    assert peer["settings"]["distill"] is True and peer["settings"]["abwr"] is False
    assert peer["settings"]["epochs"] == sm["settings"]["epochs"]  # the (2+1)'s training budget
    assert peer["model_file"] == "model.int8.onnx" and peer["model_bytes"] > 0 and peer["parity"] is None
    assert peer["eval"]["int8_ops"] and peer["eval"]["device"] == "cpu" and peer["eval"]["onnxruntime"]
    assert set(peer["fp32_metrics"]) == {"f1", "accuracy"} and peer["reference"]["reused"] is True
    assert peer["eval"]["fp32_folder"] == "distilled from the reference"
    models = tmp_path / "cut-work" / "models"
    assert models.is_dir() and not list(models.glob("mrpc-bert3-int8-int8-full-seed1-*"))
    # a 3-layer BERT: the peer is the reference itself, quantized, never trained, and the reference stays
    shallow = tmp_path / "bert3"
    shutil.copytree(tiny_bert_dir, shallow)  # its tokenizer; the weights are replaced
    config = BertConfig(**(tiny_bert_config.to_dict() | {"num_hidden_layers": 3}))
    BertForSequenceClassification(config).save_pretrained(shallow)
    results = tmp_path / "same.jsonl"
    assert script.main(["--results", str(results), "--pretrained", str(shallow), *common]) == 0
    ref, _, peer = (json.loads(x) for x in results.read_text().splitlines())
    assert peer["settings"] is None and "not trained" in peer["training"]["note"] and peer["train_wall_s"] is None
    assert peer["eval"]["fp32_folder"] == "the reference" and peer["fp32_metrics"] == ref["metrics"]
    folder = tmp_path / ref["folder"]
    assert folder.is_dir() and file_sha256(folder / "pytorch_model.bin") == ref["reference"]["pytorch_model_sha256"]
    models = tmp_path / "same-work" / "models"
    assert models.is_dir() and not list(models.glob("mrpc-bert3-int8-int8-full-seed1-*"))

    report = tmp_path / "table.json"
    assert script.main(["--report", "--results", str(results), "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert [(d["model"], d["activations"], d["peer"]) for d in saved["vs_int8_peer"]] == [
        ("2+1", "fp32", "bert3-int8")]
    (cost,) = saved["int8_cost"]
    assert cost["model"] == "bert3-int8" and cost["difference"]["accuracy"]["n"] == 1
    out = capsys.readouterr().out
    assert "| 3-layer BERT, ORT int8 |" in out and "(model.int8.onnx)" in out and "What int8 cost" in out


def test_the_int8_peers_without_onnx_runtime_are_refused_before_training(capsys, tmp_path, glue4, tiny_bert_dir,
                                                                         monkeypatch):
    from sensimix.bench import peers

    monkeypatch.setattr(peers, "ort_missing", lambda: "onnxruntime is not installed: pip install 'sensimix[bench]'")
    argv = ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4), "--pretrained", str(tiny_bert_dir),
            "--tasks", "rte", "--models", "2+1", "bert3-int8", "--max-seq-length", "32"]
    err = refused(capsys, tmp_path, argv)
    assert "onnxruntime is not installed" in err and "or leave the int8 peers out: --models 3+3 2+1" in err
    capsys.readouterr()
    assert load_script("glue_table").main(argv + ["--dry-run"]) == 0  # listing the runs needs no ONNX Runtime
    assert "to run  rte 3-layer BERT, ORT int8 seed 42" in capsys.readouterr().out


def test_a_model_asked_for_without_a_run_in_the_selection_is_refused(capsys, tmp_path, glue4):
    argv = ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4), "--tasks", "rte"]
    err = refused(capsys, tmp_path, argv + ["--models", "2+1", "bert3-int8", "--ablation", "no-pt"])
    assert "--models bert3-int8: no run of it in this selection (an int8 peer runs the full recipe only" in err
    err = refused(capsys, tmp_path, argv + ["--plan", "ablation", "--models", "2+1", "--ablation", "no-ilf"])
    assert "--models 2+1: no run of it in this selection" in err


def test_lines_another_writer_appended_meanwhile_are_kept(tmp_path):
    results = tmp_path / "r.jsonl"
    loaded = read_results(results)
    append_result(results, loaded, rec("mrpc", 42))
    with open(results, "a") as f:  # e.g. lines merged from another machine while a session runs
        f.write(json.dumps(rec("mrpc", 43)) + "\n")
    append_result(results, loaded, rec("mrpc", 44))
    assert [r["seed"] for r in read_results(results).records] == [42, 43, 44] == [r["seed"] for r in loaded.records]
    with open(results, "a") as f:  # the file stopped being ours meanwhile: refused, nothing written
        f.write('{"loss": 1}\n')
    before = results.read_text()
    with pytest.raises(NotResultsFile, match="line 4 is not a sensimix-glue-run/1 record"):
        append_result(results, loaded, rec("mrpc", 45))
    assert results.read_text() == before


def test_a_line_is_done_only_if_this_version_would_run_it_the_same_way(tmp_path, glue4):
    protocols, results = {"mrpc": protocol_for("mrpc", "cpu", "m")}, tmp_path / "r.jsonl"
    spec = R("mrpc", 42, "2+1")
    settings = protocols["mrpc"].settings(spec, "cpu").as_dict()
    line = rec("mrpc", 42, "2+1", digest=protocols["mrpc"].digest, settings=settings, eval={"device": "cpu"},
               train_data={"sha256": file_sha256(glue4 / "MRPC" / "train.tsv")})
    check_done([spec], [line], protocols, "cpu", glue4, results)  # the same recipe, data and device: done
    check_done([spec], [line | {"settings": settings | {"logging_steps": 7}}], protocols, "cpu", glue4, results)
    with pytest.raises(ValueError, match=r"line for mrpc SensiMix \(2\+1\) fp32 seed 42 was trained with another "
                                         r"abwr_coef, weight_decay than this version trains with"):
        check_done([spec], [line | {"settings": settings | {"weight_decay": 0.1, "abwr_coef": 2.0}}], protocols,
                   "cpu", glue4, results)
    with pytest.raises(ValueError, match="was trained on another mrpc train file than"):
        check_done([spec], [line | {"train_data": {"sha256": "0" * 64}}], protocols, "cpu", glue4, results)
    with pytest.raises(ValueError, match="holds runs on cpu; this session runs on cuda: one table per machine kind"):
        check_done([spec], [line], protocols, "cuda:0", glue4, results)


def test_the_report_never_writes_over_its_results_and_checks_the_chart_before_writing(capsys, tmp_path):
    results = tmp_path / "runs.jsonl"
    results.write_text(json.dumps(rec("rte", 42)) + "\n")  # one line: it parses as one JSON document too
    before = results.read_text()
    err = refused(capsys, tmp_path, ["--report", "--results", str(results), "--json", str(results)])
    assert "--json" in err and "is the --results file" in err and results.read_text() == before
    err = refused(capsys, tmp_path, ["--report", "--results", str(results), "--json", str(tmp_path / "t.json"),
                                     "--chart", str(tmp_path / "t.txt")])
    assert "--chart" in err and ".png, .svg, .pdf" in err  # and t.json was not written (refused() checks)


def test_runs_pair_only_with_runs_from_the_same_reference(tmp_path):
    runs = [rec("rte", s, score=0.6, reference={"pytorch_model_sha256": "a"}) for s in (42, 43)]
    runs += [rec("rte", 42, "2+1", score=0.5, reference={"pytorch_model_sha256": "a"}),
             rec("rte", 43, "2+1", score=0.4, reference={"pytorch_model_sha256": "b"})]  # a reference trained again
    summary = summarize(runs)
    gap = summary["gap_to_reference"][0]["gap"]["accuracy"]
    assert gap["seeds"] == [42] and gap["other_reference"] == [43] and gap["mean"] == pytest.approx(10.0)
    assert "(seeds 43 not paired: another reference)" in render(summary)


def test_a_line_of_ours_damaged_inside_the_file_is_named_as_such(tmp_path):
    results = tmp_path / "r.jsonl"
    good = json.dumps(rec("mrpc", 42))
    results.write_text(good[:50] + "\n" + json.dumps(rec("mrpc", 43)) + "\n")  # cut, then more lines
    with pytest.raises(NotResultsFile, match="line 1 is a sensimix-glue-run/1 record damaged inside the file .*"
                                             "repair or delete that line"):
        read_results(results)


def test_a_second_card_is_chosen_with_cuda_visible_devices(capsys, tmp_path, glue4, monkeypatch):
    import sensimix.devices

    monkeypatch.setattr(sensimix.devices, "resolve_device", lambda d: d)  # as on a machine with two cards
    err = refused(capsys, tmp_path, ["--results", str(tmp_path / "r.jsonl"), "--glue-dir", str(glue4),
                                     "--device", "cuda:1"])
    assert "--device cuda:1: training runs on the first visible GPU; choose the card with CUDA_VISIBLE_DEVICES=1" in err
