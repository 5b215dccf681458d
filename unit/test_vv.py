"""sensimix.vv: criteria and Pass/Fail, the report writers, timing bookkeeping, folder sizes (with the proof that
both weight files agree), the run object, and the `sensimix verify` exit code. Fast: tiny models, fake timings."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, BertTokenizer

from sensimix.checkpoint import WEIGHTS_SAFETENSORS, CheckpointError
from sensimix.train.jobs import save_bert_folder
from sensimix.vv import accuracy, criteria, procedure, report, sizes, timing
from sensimix.vv.criteria import Criterion, Report
from sensimix.vv.sizes import SizeReport
from sensimix.vv.timing import TimingReport

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_IDS = {"compression_ratio", "inference_time_ratio", "accuracy_gap"}


# ---------------------------------------------------------------------------------------------------
# criteria
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, comparison, expected", [
    (0.0964, "<=", True), (0.10, "<=", True), (0.1001, "<=", False),
    (0.80, ">=", True), (0.75, ">=", True), (0.7499, ">=", False), (float("nan"), "<=", False),
])
def test_criterion_judges_against_its_threshold(value, comparison, expected):
    threshold = 0.10 if comparison == "<=" else 0.75
    assert Criterion.judge("x", "x", value, threshold, comparison=comparison).passed is expected


def test_skipped_criterion_has_no_verdict_and_a_reason():
    c = Criterion.skipped("accuracy_gap", "gap", 5.0, "no SST-2 data", unit="points")
    assert c.passed is None and c.value is None and c.status == "Skipped"
    assert c.to_dict()["pass"] is None and c.to_dict()["reason"] == "no SST-2 data"
    for c in (criteria.size_criterion(None, reason="deselected"), criteria.time_criterion(None, reason="deselected")):
        assert c.passed is None and c.reason == "deselected" and c.id in REQUIRED_IDS


def test_bad_comparison_is_refused():
    with pytest.raises(ValueError, match="comparison"):
        Criterion.judge("x", "x", 1.0, 1.0, comparison="<")


def _sizes(bert: int = 438_000_000, sm: int = 42_200_000) -> SizeReport:
    return SizeReport(bert_bin=bert, sensimix_bin=sm, bert_safetensors=bert - 1000, sensimix_safetensors=sm - 500,
                      bert_folder=bert * 2, sensimix_folder=sm * 2, sensimix_model="SensiMix (2+1)")


def _timing(bert=(1000.0, 2000.0, 1000.0), sm=(100.0, 100.0, 300.0)) -> TimingReport:
    return TimingReport(device="cpu", data="synthetic QNLI-shaped batches", num_examples=256, batch_size=128,
                        max_seq_length=128, warmup_batches=1,
                        trials=[{procedure.BERT_FP32: b, procedure.SENSIMIX: s} for b, s in zip(bert, sm)],
                        accuracy={procedure.BERT_FP32: 0.5, procedure.SENSIMIX: None})


def _accuracy(ref: float = 0.86, sm: float = 0.84) -> accuracy.AccuracyReport:
    return accuracy.AccuracyReport(task="sst-2", split="3+3", reference_accuracy=ref, sensimix_accuracy=sm,
                                dev_examples=872, train_examples=2000)


def _report(sizes=None, timing=None, accuracy=None, reason=None, created=None) -> Report:
    sizes, timing = sizes or _sizes(), timing or _timing()
    judged = [criteria.size_criterion(sizes), criteria.time_criterion(timing), criteria.fp16_time_criterion(timing),
              *criteria.accuracy_criteria(accuracy, max_gap=5.0, min_accuracy=0.75, reason=reason),
              criteria.agreement_criterion(accuracy, reason=reason)]
    r = Report(criteria=judged, environment={"device": "cpu", "device_name": "test CPU", "torch": torch.__version__},
               sizes=sizes, timing=timing, accuracy=accuracy)
    if created:
        r.created = created
    return r


def test_time_ratio_is_the_mean_of_per_trial_ratios():
    t = _timing()
    assert t.ratios() == pytest.approx([0.1, 0.05, 0.3])
    # the certified figure: mean of ratios (0.15), not the ratio of summed times (500 / 4000 = 0.125)
    assert t.mean_ratio() == pytest.approx(0.15)
    assert t.mean_ratio(procedure.SENSIMIX, procedure.BERT_FP16) is None


def test_exit_code_follows_the_criteria():
    passing = _report(accuracy=_accuracy())
    assert passing.passed and passing.exit_code == 0
    skipped = _report(reason="no SST-2 data")  # skipped criteria neither pass nor fail
    assert skipped.exit_code == 0 and skipped.criterion("accuracy_gap").passed is None
    too_big = _report(sizes=_sizes(sm=50_000_000))
    assert too_big.exit_code == 1 and [c.id for c in too_big.failed] == ["compression_ratio"]
    slow = _report(timing=_timing(sm=(300.0, 500.0, 250.0)))
    assert slow.exit_code == 1 and [c.id for c in slow.failed] == ["inference_time_ratio"]
    lossy = _report(accuracy=_accuracy(sm=0.70))  # gap 16 points and below the 0.75 floor
    assert {c.id for c in lossy.failed} == {"accuracy_gap", "sensimix_accuracy"}


# ---------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------
def test_report_json_schema(tmp_path):
    files = report.write_report(_report(reason="no SST-2 data"), tmp_path, chart=False)
    data = json.loads(files.json.read_text())
    assert data["schema"] == procedure.SCHEMA and data["passed"] is True
    assert {"created", "criteria", "sizes", "timing", "accuracy", "environment", "settings"} <= data.keys()
    by_id = {c["id"]: c for c in data["criteria"]}
    assert REQUIRED_IDS <= by_id.keys() and tuple(by_id) == procedure.CRITERION_IDS  # stable ids, stable order
    for c in data["criteria"]:
        assert {"id", "title", "value", "threshold", "comparison", "unit", "pass", "reason", "certified"} <= c.keys()
        if c["pass"] is None:
            assert c["value"] is None and c["reason"], c
    assert by_id["compression_ratio"]["value"] == pytest.approx(42.2 / 438.0)
    assert by_id["compression_ratio"]["pass"] is True and by_id["compression_ratio"]["certified"] is True
    assert by_id["inference_time_ratio"]["value"] == pytest.approx(0.15)
    assert by_id["accuracy_gap"]["reason"] == "no SST-2 data"
    assert "CUDA" in by_id["inference_time_ratio_fp16"]["reason"]
    assert data["timing"]["trials"][1] == {procedure.BERT_FP32: 2000.0, procedure.SENSIMIX: 100.0}
    assert data["sizes"]["safetensors_ratio"] == pytest.approx((42_200_000 - 500) / (438_000_000 - 1000))


def test_markdown_has_the_certified_tables(tmp_path):
    judged = _report(sizes=_sizes(sm=50_000_000), reason="no SST-2 data")
    md = report.write_report(judged, tmp_path, chart=False).markdown.read_text()
    assert "**Result: FAIL**" in md
    assert "| 1 | Compression ratio: SensiMix (2+1) / BERT pytorch_model.bin | 11.42% | <= 10.00% | Fail |" in md
    assert "| 2 | Inference time ratio: SensiMix / BERT fp32, mean of 3 trials | 15.00% | <= 20.00% | Pass |" in md
    assert "Skipped: no SST-2 data" in md
    assert "| Trial | BERT fp32 (ms) | SensiMix (ms) | SensiMix / BERT fp32 |" in md
    assert "| 2 | 2,000 | 100 | 5.00% |" in md and "| Mean | 1,333 | 167 | 15.00% |" in md
    assert "| pytorch_model.bin | 438.0 MB | 50.0 MB | 11.42% |" in md
    assert "| torch |" in md


def test_markdown_shows_accuracy_and_fp16_columns():
    timing = _timing()
    for t, ms in zip(timing.trials, (200.0, 400.0, 1000.0)):
        t[procedure.BERT_FP16] = ms
    md = report.render_markdown(_report(timing=timing, accuracy=_accuracy()))
    assert "SensiMix / BERT fp16 |" in md and "| 3 | 1,000 | 1,000 | 300 | 30.00% | 30.00% |" in md
    assert "| SensiMix (3+3) | 84.00% |" in md and "| Gap | 2.00 points |" in md


def test_chart_and_history_across_runs(tmp_path):
    first = report.write_report(_report(created="2025-01-01T00:00:00+00:00"), tmp_path)
    assert first.chart.read_bytes()[:8] == PNG_MAGIC and first.chart.stat().st_size > 5000
    for i, sm in enumerate((110.0, 120.0)):
        report.write_report(_report(timing=_timing(sm=(sm, sm, sm)), created=f"2025-01-0{i + 2}T00:00:00+00:00"),
                           tmp_path)
    history = report.load_history(tmp_path)
    assert [h["created"][:10] for h in history] == ["2025-01-01", "2025-01-02", "2025-01-03"]
    assert history[1]["inference_time_ratio"] == pytest.approx(0.11 * 2 / 3 + 0.055 / 3)
    assert history[0]["compression_ratio"] == pytest.approx(42.2 / 438.0)
    # with several runs the chart gets a third panel: the ratios across runs
    assert report.write_chart(_report(), history, tmp_path / "c.png") == 3
    assert report.write_chart(_report(), history[:1], tmp_path / "c.png") == 2


def test_history_skips_broken_lines(tmp_path, caplog):
    (tmp_path / "history.jsonl").write_bytes(b'{"created": "a"}\nnot json\n\n[1, 2]\n\xff\xfe\n{"created": "b"}')
    assert [h["created"] for h in report.load_history(tmp_path)] == ["a", "b"]
    assert caplog.text.count("is not a JSON object of a past run") == 3
    # a last line without its newline: the next run's entry starts on a line of its own, both are kept
    report.write_report(_report(sizes=_sizes()), tmp_path, chart=False)
    assert [h.get("created") for h in report.load_history(tmp_path)][:2] == ["a", "b"]
    assert len(report.load_history(tmp_path)) == 3


# ---------------------------------------------------------------------------------------------------
# timing bookkeeping (with a fake run_inference: the real one is tested in unit/test_measure.py)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_evaluate(monkeypatch):
    calls: list[tuple[str, int, int]] = []

    def run_inference(model, batches, *, warmup_batches=2, device="cpu"):
        calls.append((model.name, len(batches), warmup_batches))
        n = sum(len(b["input_ids"]) for b in batches)
        return types.SimpleNamespace(duration_ms=model.ms, num_examples=n, batch_size=len(batches[0]["input_ids"]),
                                     predictions=None, accuracy=0.5)

    monkeypatch.setattr(timing, "run_inference", run_inference)  # inject the fake where the timers call it
    return calls


def test_time_models_warms_up_once_and_interleaves(fake_evaluate):
    models = {procedure.BERT_FP32: types.SimpleNamespace(name="bert", ms=1000.0),
              procedure.SENSIMIX: types.SimpleNamespace(name="sm", ms=50.0)}
    batches = [{"input_ids": torch.zeros(4, 8)}] * 3
    t = timing.time_models(models, batches, trials=3, warmup_batches=2, progress=False,
                          precisions={procedure.BERT_FP32: "fp32", procedure.SENSIMIX: "fast"})
    warmups = [c for c in fake_evaluate if c[1] == 2]
    timed = [c[0] for c in fake_evaluate if c[1] == 3]
    assert warmups == [("bert", 2, 0), ("sm", 2, 0)]
    assert timed == ["bert", "sm"] * 3  # interleaved within each trial
    assert all(c[2] == 0 for c in fake_evaluate)  # warm-up is never inside a timed pass
    assert t.num_examples == 12 and t.batch_size == 4 and len(t.trials) == 3
    assert t.mean_ratio() == pytest.approx(0.05)
    assert t.precisions == {procedure.BERT_FP32: "fp32", procedure.SENSIMIX: "fast"}
    assert "BERT fp32: fp32, SensiMix: fast)" in report.render_markdown(_report(timing=t))
    with pytest.raises(ValueError, match="trials"):
        timing.time_models(models, batches, trials=0, progress=False)


# ---------------------------------------------------------------------------------------------------
# folders and sizes
# ---------------------------------------------------------------------------------------------------
def test_bert_folder_is_written_atomically(tmp_path, monkeypatch, tiny_bert_config, tiny_vocab):
    model, tok = BertForSequenceClassification(tiny_bert_config), BertTokenizer(tiny_vocab)
    save_bert_folder(model, tok, tmp_path / "ok")
    for f in (*sizes.CERTIFIED_FOLDER_FILES, WEIGHTS_SAFETENSORS):
        assert (tmp_path / "ok" / f).is_file(), f
    sd = torch.load(tmp_path / "ok" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(sd["classifier.weight"], model.state_dict()["classifier.weight"])

    def broken_save(*args, **kwargs):  # the disk fills up halfway through the weights
        Path(args[1]).write_bytes(b"half a pickle")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_bert_folder(model, tok, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no half folder, no temp folder left


def test_sizes_are_read_from_small_real_folders(tmp_path, tiny_bert_dir):
    bert = sizes.build_bert_folder(tmp_path / "bert", tiny_bert_dir, seed=0)
    sm = sizes.build_sensimix_folder(bert, tmp_path / "sm", layers=3, eightbit_layers=2)
    s = sizes.measure_sizes(bert, sm)
    assert s.bert_bin == os.path.getsize(bert / "pytorch_model.bin")
    assert s.sensimix_bin == os.path.getsize(sm / "pytorch_model.bin")
    assert s.ratio == s.sensimix_bin / s.bert_bin < 1
    assert s.safetensors_ratio == os.path.getsize(sm / "model.safetensors") / os.path.getsize(bert / "model.safetensors")
    assert s.bert_folder == sum(p.stat().st_size for p in bert.iterdir() if p.is_file())
    assert s.sensimix_model == "SensiMix (2+1)"
    assert s.bert_model == "BERT 4 layers, hidden 32, FFN 52, vocab 120"
    assert s.to_dict()["deviations_from_certified"] == [
        "the baseline is BERT 4 layers, hidden 32, FFN 52, vocab 120 (certified: bert-base, BERT 12 layers, "
        "hidden 768, FFN 3072, vocab 30,522)"]
    certified = dataclasses.replace(s, bert_model=sizes.CERTIFIED_BERT)
    assert certified.deviations() == [] and dataclasses.replace(certified, sensimix_model="SensiMix (3+3)").deviations()
    (sm / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        sizes.measure_sizes(bert, sm)


# ---------------------------------------------------------------------------------------------------
# environment and data
# ---------------------------------------------------------------------------------------------------
def test_sensimix_precision_defaults_to_the_runtimes():
    assert procedure.sensimix_precision("auto", "cuda") == "fast" and procedure.sensimix_precision(None, "cpu") == "fast"
    assert procedure.sensimix_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        procedure.sensimix_precision("int4", "cpu")


def test_default_examples_follow_the_device():
    assert procedure.default_examples("cpu") == procedure.CPU_DEFAULT_EXAMPLES
    assert procedure.default_examples("cuda") == procedure.default_examples("cuda:1") == procedure.CERTIFIED_EXAMPLES == 104_743
    assert procedure.default_warmup_batches("cpu") >= 1 and procedure.default_warmup_batches("cuda") >= 1


def test_environment_names_the_machine():
    env = procedure.environment("cpu")
    assert env["device"] == "cpu" and env["device_name"] and env["torch"] == torch.__version__
    assert {"cuda", "transformers", "python", "cpu_cores", "sensimix", "git_commit", "git_dirty"} <= env.keys()
    assert env["cpu_cores"] == len(os.sched_getaffinity(0))  # the cores it may use, not the host's


def test_the_commit_says_when_the_code_that_ran_had_uncommitted_changes(monkeypatch):
    answers = {("status", "--porcelain", "--untracked-files=no"): " M sensimix/qat.py\n"}
    monkeypatch.setattr(procedure, "_git", lambda *args: answers.get(args))
    assert procedure._git_dirty() is True
    answers[("status", "--porcelain", "--untracked-files=no")] = ""
    assert procedure._git_dirty() is False
    answers.clear()  # not a git checkout (an installed package): unknown, not clean
    assert procedure._git_dirty() is None and procedure._git_commit() is None


def test_accuracy_data_reasons(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert "GLUE_DIR" in accuracy.accuracy_data_missing(None)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n")
    assert "SST-2/train.tsv" in accuracy.accuracy_data_missing(tmp_path)
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    assert accuracy.accuracy_data_missing(tmp_path) is None
    assert "not a folder" in accuracy.accuracy_data_missing(tmp_path / "nowhere")
    assert accuracy.accuracy_data_missing(None, hub=True) is None  # online users read SST-2 from the hub


# ---------------------------------------------------------------------------------------------------
# `sensimix verify`
# ---------------------------------------------------------------------------------------------------
def test_version(capsys):
    import sensimix
    from sensimix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"sensimix {sensimix.__version__}"


def test_verify_help_teaches_the_criteria():
    import argparse

    from sensimix.cli import verify

    p = argparse.ArgumentParser(description=verify.DESCRIPTION)
    verify.add_arguments(p)
    args = p.parse_args([])
    assert args.out == "verify-out" and args.bert == "random:bert-base" and args.examples is None
    assert (args.layers, args.eightbit_layers, args.trials, args.batch_size) == (None, None, 3, 128)  # None: 3, 2
    for words in ("Compression ratio <= 10%", "Inference time ratio <= 20%", "What is timed", "synthetic"):
        assert words in verify.DESCRIPTION
    # the --accuracy-* options (shared with pytest's) round-trip into AccuracySettings
    assert accuracy.accuracy_settings_from(lambda d: getattr(args, d), "cpu") == accuracy.AccuracySettings(device="cpu")
    args = p.parse_args(["--accuracy-train-limit", "0", "--accuracy-min", "0.8", "--accuracy-reference", "ref"])
    s = accuracy.accuracy_settings_from(lambda d: getattr(args, d), "cpu")
    assert (s.train_limit, s.min_accuracy, s.reference) == (None, 0.8, "ref")  # 0 = the whole train set
    args = p.parse_args(["--accuracy-pretrained", "bert-dir", "--accuracy-reference-epochs", "3"])
    s = accuracy.accuracy_settings_from(lambda d: getattr(args, d), "cpu")
    assert (s.pretrained, s.reference_epochs, s.reference) == ("bert-dir", 3.0, None)
    args = p.parse_args(["--accuracy-reference", "ref", "--accuracy-pretrained", "bert-dir"])
    with pytest.raises(ValueError, match="--accuracy-pretrained shape the fine-tuning of the fp32 reference"):
        accuracy.accuracy_settings_from(lambda d: getattr(args, d), "cpu")  # a given reference is not fine-tuned


def test_verify_end_to_end_fails_on_a_bad_ratio(tmp_path, monkeypatch, capsys):
    """A tiny random BERT compresses to ~25%: verify must report Fail and exit 1, with every file written."""
    from sensimix.cli import main

    monkeypatch.delenv("GLUE_DIR", raising=False)
    out = tmp_path / "verify-out"
    code = main(["verify", "--bert", "random:bert-tiny", "--layers", "2", "--8bit-layers", "1", "--out", str(out),
                 "--device", "cpu", "--examples", "8",
                 "--batch-size", "4", "--max-seq-length", "16", "--trials", "2", "--skip-accuracy", "--no-progress"])
    assert code == 1
    data = json.loads((out / "report.json").read_text())
    by_id = {c["id"]: c for c in data["criteria"]}
    assert by_id["compression_ratio"]["pass"] is False and by_id["compression_ratio"]["value"] > 0.10
    assert by_id["accuracy_gap"]["pass"] is None and "--skip-accuracy" in by_id["accuracy_gap"]["reason"]
    assert len(data["timing"]["trials"]) == 2 and data["timing"]["num_examples"] == 8
    assert data["timing"]["data"].startswith("synthetic")
    assert data["timing"]["deviations_from_certified"] == [
        "examples per trial 8 (certified 104,743)", "trials 2 (certified 3)", "batch size 4 (certified 128)",
        "max_seq_length 16 (certified 128)", "synthetic batches (certified: QNLI)"]
    assert data["timing"]["ran"]["bert-fp32"] == "BertForSequenceClassification (float32)"
    assert data["timing"]["ran"]["sensimix"].startswith("precision fast (exact), 1-bit kernel ")
    assert "Not the certified workload: examples per trial 8" in (out / "report.md").read_text()
    assert (out / "report.md").is_file() and (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert len(report.load_history(out)) == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".verify-")]  # temp model folders removed
    assert "| Trial | BERT fp32 (ms) | SensiMix (ms) |" in capsys.readouterr().out


def test_verify_reads_qnli_from_the_hub_when_asked(tmp_path, monkeypatch):
    """--hub-data with no GLUE folder: the timing data is QNLI dev from the hub (the download is faked here)."""
    from sensimix.cli import main
    from sensimix import data

    calls = []

    def fake_hub(spec, split):
        calls.append((spec.hub_config, split))
        return data.Examples(["what is it?"] * 3, ["it is a test."] * 3, [0, 1, 0])

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setattr(data, "_read_hub", fake_hub)
    out = tmp_path / "verify-out"
    main(["verify", "--bert", "random:bert-tiny", "--layers", "2", "--8bit-layers", "1", "--out", str(out),
          "--device", "cpu", "--examples", "8", "--batch-size", "4", "--max-seq-length", "16", "--trials", "1",
          "--skip-accuracy", "--no-progress", "--hub-data"])
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert calls == [("qnli", "dev")]
    assert timing["data"].startswith("QNLI dev from the hub") and timing["num_examples"] == 8


# ---------------------------------------------------------------------------------------------------
# trust: what a PASS rests on
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small_folders(tmp_path, tiny_bert_dir):
    bert = sizes.build_bert_folder(tmp_path / "bert", tiny_bert_dir, seed=0)
    return bert, sizes.build_sensimix_folder(bert, tmp_path / "sm", layers=3, eightbit_layers=2)


def test_a_truncated_bin_beside_an_intact_safetensors_is_refused(small_folders):
    bert, sm = small_folders
    for folder in (sm, bert):
        path = folder / "pytorch_model.bin"
        good = path.read_bytes()
        path.write_bytes(good[:1000])
        with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load"):
            sizes.measure_sizes(bert, sm)
        path.write_bytes(good)
    sizes.measure_sizes(bert, sm)


def test_a_bin_with_other_tensors_than_the_safetensors_is_refused(small_folders):
    bert, sm = small_folders
    state = torch.load(bert / "pytorch_model.bin", weights_only=True)
    state["classifier.bias"] = state["classifier.bias"] + 1
    torch.save(state, bert / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="hold different tensors .*classifier.bias"):
        sizes.measure_sizes(bert, sm)


def test_a_sensimix_safetensors_altered_beside_its_intact_bin_is_refused(small_folders):
    """The SensiMix twin of the test above: criterion 1 sizes the .bin, a user may load the .safetensors; an edit
    to the one not read first is caught by the checksum, in measure_sizes and in a full-verification load."""
    from safetensors.torch import load_file, save_file

    from sensimix.inference import SensiMixForSequenceClassification

    bert, sm = small_folders
    assert sizes.measure_sizes(bert, sm).weight_files_agree
    path = sm / WEIGHTS_SAFETENSORS
    state = load_file(path)
    name = next(n for n in sorted(state) if n.endswith(".weight_q"))
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_SAFETENSORS}: the tensors differ from those exported"):
        sizes.measure_sizes(bert, sm)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_SAFETENSORS}: the tensors differ from those exported"):
        SensiMixForSequenceClassification.from_pretrained(sm, weights="pytorch_model.bin", verify_all_files=True)


def test_weight_files_agree_only_where_both_files_were_compared(small_folders):
    bert, sm = small_folders
    assert sizes.measure_sizes(bert, sm).weight_files_agree
    (sm / WEIGHTS_SAFETENSORS).unlink()
    assert not sizes.measure_sizes(bert, sm).weight_files_agree, "nothing was compared in the SensiMix folder"


def test_a_bert_file_that_is_not_its_fp32_model_is_refused(small_folders):
    bert, sm = small_folders
    path = bert / "pytorch_model.bin"
    good = torch.load(path, weights_only=True)
    (bert / WEIGHTS_SAFETENSORS).unlink()  # only the sized .bin is at stake here
    cases = [(lambda s: s.update(junk=torch.zeros(1000)), "not in the model junk"),  # inflates the BERT's size
             (lambda s: s.pop("classifier.weight"), "missing classifier.weight"),   # timed with a random one
             (lambda s: s.update({k: v.double() for k, v in s.items() if v.is_floating_point()}),
              "the baseline must be fp32 .* torch.float64")]                         # doubles the BERT's size
    for change, match in cases:
        state = dict(good)
        change(state)
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=match):
            sizes.measure_sizes(bert, sm)
    padded = dict(good, **{"bert.embeddings.position_ids": torch.zeros(1, 10**6, dtype=torch.long)})
    torch.save(padded, path)  # a legacy buffer's name, 8 MB of padding
    with pytest.raises(CheckpointError, match="position_ids has shape \\[1, 1000000\\], but the position buffer"):
        sizes.measure_sizes(bert, sm)
    torch.save({k: torch.cat([v.reshape(-1), torch.zeros(10**6)])[: v.numel()].view(v.shape)
                if k == "classifier.weight" else v for k, v in good.items()}, path)  # a view of a 4 MB storage
    with pytest.raises(CheckpointError, match="but its tensors hold .* MB: the file carries other bytes"):
        sizes.measure_sizes(bert, sm)
    torch.save(good, path)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))  # timed: 8 layers, 4 random
    with pytest.raises(CheckpointError, match="\\(8 layers, hidden 32\\): missing bert.encoder.layer.4"):
        sizes.measure_sizes(bert, sm)
    (bert / "config.json").write_text(json.dumps(config))
    sizes.measure_sizes(bert, sm)


def test_a_sensimix_not_made_from_the_bert_is_refused(tmp_path, small_folders):
    bert, sm = small_folders
    other = sizes.build_bert_folder(tmp_path / "other", "random:bert-tiny")
    with pytest.raises(ValueError, match="was not made from --bert .*: vocab_size 120 vs 30522; hidden_size 32 vs 128"):
        sizes.measure_sizes(other, sm)  # a SensiMix of a tiny BERT would be ~1% of a big one's size


def test_verify_refuses_mismatches_and_bad_targets_before_any_work(tmp_path, small_folders, caplog, monkeypatch):
    from sensimix.cli import main

    monkeypatch.delenv("GLUE_DIR", raising=False)
    bert, sm = small_folders
    out = tmp_path / "out"
    refused = [(["--bert", "random:bert-tiny", "--sensimix", str(sm)], "was not made from --bert random:bert-tiny"),
               (["--bert", "random:bert-tiny", "--layers", "3"], "--layers 3 is more than the 2 layers"),
               (["--bert", str(bert), "--sensimix", str(sm), "--layers", "2"], "--sensimix .* is judged as it is"),
               (["--accuracy-min", "70"], "--accuracy-min must be a finite number in \\[0, 1\\]"),
               (["--accuracy-epochs", "nan"], "--accuracy-epochs must be a finite number > 0")]
    for extra, match in refused:
        caplog.clear()
        assert main(_verify_args(out, *extra)) == 2
        assert re.search(match, caplog.text), caplog.text
    assert main(_verify_args("")) == 2 and "--out is empty" in caplog.text
    assert main(_verify_args(sm / "report", "--bert", str(bert), "--sensimix", str(sm))) == 2
    assert "is inside the --sensimix folder" in caplog.text and not (sm / "report").exists()
    glue = tmp_path / "glue"
    (glue / "QNLI").mkdir(parents=True)
    (glue / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n")
    assert main(_verify_args(out, "--glue-dir", str(glue))) == 2 and "has no examples" in caplog.text
    assert not out.exists()
    out.mkdir()
    os.mkfifo(out / "history.jsonl")  # a rename over it (or an append into it) would not be a report
    assert main(_verify_args(out)) == 2 and "history.jsonl exists and is not a regular file" in caplog.text
    (out / "history.jsonl").unlink()
    out.rmdir()

    def broken(self):
        raise ValueError("broken after the report folder was made")

    monkeypatch.setattr("sensimix.vv.run.VVRun.sizes", broken)
    assert main(_verify_args(out, "--bert", str(bert), "--sensimix", str(sm))) == 2
    assert not out.exists(), "a failed run leaves no empty report folder"


def test_two_verify_runs_into_one_report_folder_are_refused(tmp_path, caplog):
    import subprocess
    import sys

    from sensimix.cli import main

    out = tmp_path / "out"
    holder = subprocess.Popen(  # another process holds the report folder, as a running verify does
        [sys.executable, "-c", "import sys, time\nfrom sensimix.io import reserve_output\n"
                               f"with reserve_output({str(out)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_verify_args(out, "--bert", "random:bert-tiny")) == 2
        assert "another process is writing" in caplog.text and not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_qnli_dev_other_than_glues_is_named_in_the_report(tmp_path, tiny_vocab):
    glue = tmp_path / "glue"
    (glue / "QNLI").mkdir(parents=True)
    (glue / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\twhat?\tthe film\tentailment\n")
    _, label = timing.timing_inputs(BertTokenizer(tiny_vocab), glue_dir=glue, num_examples=2, batch_size=2,
                                    max_seq_length=16)
    assert label.startswith("QNLI dev (1 examples, cycled, NOT GLUE's file: sha256 ")
    t = timing.TimingReport("cpu", label, 2, 2, 16, 0, [{"bert-fp32": 1.0, "sensimix": 0.1}])
    assert "a QNLI dev.tsv other than GLUE's (its sha256 differs)" in t.deviations()
    real = os.environ.get("GLUE_DIR")
    if real and (Path(real) / "QNLI" / "dev.tsv").is_file():  # the real file is recognised
        _, label = timing.timing_inputs(BertTokenizer(tiny_vocab), glue_dir=real, num_examples=2, batch_size=2,
                                        max_seq_length=16)
        assert label == "QNLI dev (5,463 examples)"


def test_the_baseline_runs_with_default_runtime_options(small_folders):
    from sensimix.measure import load_for_inference

    bert, _ = small_folders
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "chunk_size_feed_forward": 1, "output_attentions": True,
                                                  "output_hidden_states": True}))
    model = load_for_inference(bert, device="cpu", precision="fp32")
    assert model.bert.encoder.layer[0].chunk_size_feed_forward == 0  # a chunked FFN would slow the baseline
    assert not model.config.output_attentions and not model.config.output_hidden_states
    (bert / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    with pytest.raises(ValueError, match="makes the BERT a decoder"):
        load_for_inference(bert, device="cpu", precision="fp32")


def test_agreement_criterion():
    a = accuracy.Agreement("3+3", 872, 870 / 872, 0.86, 0.861, "fast")
    b = accuracy.Agreement("2+1", 872, 868 / 872, 0.84, 0.836, "fast")
    acc = _accuracy()
    acc.agreements = [a, b]
    c = criteria.agreement_criterion(acc)
    assert c.passed is False and c.value == pytest.approx(868 / 872)  # 99.54% is enough; a 0.4-point move is not
    acc.agreements = [a]
    assert criteria.agreement_criterion(acc).passed is True
    acc.agreements = [accuracy.Agreement("3+3", 872, 872 / 872, 0.86, 0.855, "fast")]
    c = criteria.agreement_criterion(acc)
    assert c.passed is False and "0.50 points" in c.reason
    assert criteria.agreement_criterion(None, reason="no data").passed is None


def _verify_args(out, *extra):
    shape = [] if "--sensimix" in extra or "--layers" in extra else ["--layers", "2", "--8bit-layers", "1"]
    return ["verify", *shape, "--out", str(out), "--device", "cpu", "--examples", "4", "--batch-size", "4",
            "--max-seq-length", "16", "--trials", "1", "--skip-accuracy", "--no-progress", *extra]


def test_verify_keep_models_never_replaces_without_overwrite(tmp_path, monkeypatch):
    from sensimix.cli import main

    monkeypatch.delenv("GLUE_DIR", raising=False)
    keep = tmp_path / "keep"
    (keep / "bert").mkdir(parents=True)
    (keep / "bert" / "mine.txt").write_text("precious")
    args = _verify_args(tmp_path / "out", "--bert", "random:bert-tiny", "--keep-models", str(keep))
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 2  # --overwrite replaces model folders only, not this one
    assert (keep / "bert" / "mine.txt").read_text() == "precious"
    (keep / "bert" / "mine.txt").unlink()
    assert main([*args, "--overwrite"]) == 1  # an empty folder is replaceable (tiny BERT: the size ratio fails)
    assert main(args) == 2  # now DIR/bert and DIR/sensimix are models: kept without --overwrite
    assert main([*args, "--overwrite"]) == 1 and (keep / "sensimix" / "config.json").is_file()


def test_verify_measures_a_given_bert_folder_as_it_is(tmp_path, small_folders, monkeypatch):
    from sensimix.cli import main

    monkeypatch.delenv("GLUE_DIR", raising=False)
    bert, sm = small_folders
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in bert.iterdir()}
    out = tmp_path / "out"
    assert main(_verify_args(out, "--bert", str(bert), "--sensimix", str(sm), "--keep-models", str(bert.parent))) == 1
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in bert.iterdir()} == before
    data = json.loads((out / "report.json").read_text())
    assert data["sizes"]["bert_bin"] == before["pytorch_model.bin"][1] and data["sizes"]["bert_path"] == str(bert)
    assert main(_verify_args(out, "--bert", str(sm))) == 2  # a packed folder is not a BERT baseline


def test_verify_refuses_bad_options_before_any_work(tmp_path, caplog):
    from sensimix.cli import main

    for args in (["--examples", "0"], ["--trials", "-1"], ["--max-seq-length", "abc"]):
        with pytest.raises(SystemExit) as exc:
            main(_verify_args(tmp_path / "out", *args))
        assert exc.value.code == 2
    assert main(_verify_args(tmp_path / "out", "--examples", str(10**12))) == 2  # would not fit in memory
    assert "would stage" in caplog.text
    # accepted and then ignored would be worse than refused
    assert main(_verify_args(tmp_path / "out", "--skip-accuracy", "--accuracy-max-gap", "1")) == 2
    assert "--accuracy-max-gap set the accuracy criteria, which --skip-accuracy skips: drop it" in caplog.text
    assert main(_verify_args(tmp_path / "out", "--accuracy-reference", str(tmp_path), "--accuracy-pretrained",
                             "x", "--accuracy-reference-epochs", "5")) == 2
    assert "--accuracy-reference-epochs shape the fine-tuning of the fp32 reference" in caplog.text
    assert not (tmp_path / "out").exists()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert main(_verify_args(model)) == 2  # the report never goes into a model folder
    assert "is a model folder" in caplog.text and sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_verify_refuses_an_a8_model_in_fp16_or_bf16_before_it_builds_anything(tmp_path, caplog):
    from sensimix.cli import main
    from sensimix.export import export_checkpoint
    from sensimix.qat import from_bert

    keep = tmp_path / "keep"
    for precision in ("fp16", "bf16"):  # the built (2+1) A8: refused from the options alone
        assert main(_verify_args(tmp_path / "out", "--activations", "a8", "--sensimix-precision", precision,
                                 "--keep-models", str(keep))) == 2
        assert f"--sensimix-precision {precision} would change the arithmetic of --activations a8" in caplog.text
    folder = tmp_path / "a8"  # a given A8 folder: refused from its config.json, before BERT is built or sized
    export_checkpoint(from_bert("random:bert-tiny", num_hidden_layers=2, num_8bit_layers=1, activation_quant="a8"),
                      folder)
    caplog.clear()
    assert main(["verify", "--bert", "random:bert-tiny", "--sensimix", str(folder), "--sensimix-precision", "fp16",
                 "--skip-accuracy", "--out", str(tmp_path / "out")]) == 2
    assert f"SensiMix precision fp16 would change the arithmetic of {folder}, an A8 folder" in caplog.text
    assert not (tmp_path / "out").exists() and not keep.exists()


def test_the_fp16_goal_is_reported_and_gated_only_when_asked():
    t = _timing()
    for trial, ms in zip(t.trials, (100.0, 200.0, 400.0)):  # SensiMix / BERT fp16 = 100%, 50%, 75%
        trial[procedure.BERT_FP16] = ms
    missed = criteria.fp16_time_criterion(t)
    assert missed.passed is False and not missed.gated and missed.status == "Fail (goal, not gated)"
    report_ = _report(timing=t)
    report_.criteria[2] = missed
    assert report_.exit_code == 0 and "Fail (goal, not gated)" in report.render_markdown(report_)
    report_.criteria[2] = criteria.fp16_time_criterion(t, gated=True)
    assert report_.exit_code == 1 and [c.id for c in report_.failed] == ["inference_time_ratio_fp16"]


def test_time_all_times_again_in_full_a_model_timed_in_part(monkeypatch):
    """pytest-benchmark with --benchmark-disable runs a pedantic benchmark once: that model's one trial is not
    the run's 3, so time_all times it again from the start (it judged 1 trial against 3 before); a model timed in
    full keeps its trials."""
    from sensimix.vv import run as vv_run

    run = object.__new__(vv_run.VVRun)
    run.s = types.SimpleNamespace(trials=3, examples=8, device="cpu", progress=False)
    full = types.SimpleNamespace(name="bert-fp32", precision="fp32", results=[1, 2, 3])
    part = types.SimpleNamespace(name="sensimix", precision="fast", results=[1])
    run.timers = {"bert-fp32": full, "sensimix": part}
    run.batches = ([], "synthetic")
    timed = []

    def time_models(models, batches, *, trials, timers, **kwargs):
        timed.append([t.name for t in timers])
        for t in timers:
            t.results.extend([9] * trials)

    monkeypatch.setattr(vv_run, "time_models", time_models)
    monkeypatch.setattr(vv_run.VVRun, "timing", lambda self: None)
    run.time_all(["bert-fp32", "sensimix"])
    assert timed == [["sensimix"]] and part.results == [9, 9, 9] and full.results == [1, 2, 3]
    run.time_all(["bert-fp32", "sensimix"])
    assert timed == [["sensimix"]], "nothing is timed twice"
