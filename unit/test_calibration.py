"""``fast``'s per-checkpoint calibration (sensimix.calibration_record, sensimix.train.calibrate): the verdict, the record, and what ``fast`` loads."""

import json
import logging

import pytest
import torch
from helpers import logits_of

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import calibration_record, kernels
from sensimix.calibration_record import RECORD, judge
from sensimix.train import calibrate as measuring
from sensimix.train import provenance
from sensimix.train.calibrate import calibrate
from sensimix.export import export_checkpoint
from sensimix.train import TrainSettings, compress

# what a calibration on tiny_glue_dir's train split, trained on 8 rows drawn with seed 3, says it measured
HELD_8_3 = "sst-2 train: 20 examples held out of training (seed 3; 4 repeating a trained text left out)"
needs_int16 = pytest.mark.skipif(kernels.INDEX8_KERNELS["int16"].unavailable(torch.device("cpu")) is not None,
                                 reason="the int16 kernel cannot run on this CPU (AVX2 and a C compiler)")


# ---------------------------------------------------------------------------------------------------
# the verdict
# ---------------------------------------------------------------------------------------------------
def _preds(n: int, changed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    exact = torch.arange(n) % 2
    candidate = exact.clone()
    candidate[:changed] = 1 - candidate[:changed]
    return exact, candidate


def test_judge_passes_at_the_acceptance_bar_and_names_each_failure() -> None:
    exact, cand = _preds(1000, changed=3)  # 99.7% equal, accuracy 100% -> 99.7%: 0.3 points, at the bar
    v = judge(exact, cand, exact, min_examples=200)
    assert v["passed"] and v["equal"] == 997 and "reason" not in v
    labels = exact.clone()
    labels[:5:2] = 1 - labels[:5:2]  # 3 changes fix a prediction, 2 break one: 0.1 points
    v = judge(*_preds(1000, changed=5), labels)
    assert v["passed"] and v["agreement"] == 0.995
    exact, cand = _preds(1000, changed=6)
    v = judge(exact, cand, exact)
    assert not v["passed"] and "6 of 1000 predictions changed" in v["reason"]
    # few changes, but all in one direction: the accuracy moves too far
    exact, cand = _preds(400, changed=2)
    labels = exact.clone()
    v = judge(exact, cand, labels)
    assert v["agreement"] == 0.995 and not v["passed"] and "accuracy" in v["reason"]
    v = judge(*_preds(100), torch.arange(100) % 2)
    assert not v["passed"] and v["reason"] == "100 examples (< 200)"
    v = judge(*_preds(300), None)
    assert not v["passed"] and "no labels" in v["reason"]


# ---------------------------------------------------------------------------------------------------
# the record and what fast loads
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(qat_model, tmp_path):
    qat, inputs = qat_model
    return export_checkpoint(qat, tmp_path / "sensimix"), inputs, qat


def _labelled(folder, inputs) -> dict[str, torch.Tensor]:
    labels = logits_of(Packed.from_pretrained(folder), inputs).argmax(-1)
    return {**inputs, "labels": labels}


@needs_int16
def test_a_passed_calibration_makes_fast_take_int16_for_this_checkpoint_only(folder, caplog) -> None:
    folder, inputs, qat = folder
    n = len(inputs["input_ids"])
    assert Packed.from_pretrained(folder, precision="fast").plan.exact  # no record: exact
    record = calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=n)
    assert record["passed"] and record["equal"] == n and record["index8_kernel"] == "int16"
    saved = json.loads((folder / RECORD).read_text())
    assert saved["checkpoint"] == json.loads((folder / "config.json").read_text())["sensimix_checksum"]
    fast = Packed.from_pretrained(folder, precision="fast")
    assert fast.plan.index8_kernel == "int16" and fast.plan.calibrated and not fast.plan.exact
    assert "calibrated for this checkpoint" in fast.plan.describe()
    exact = logits_of(Packed.from_pretrained(folder), inputs)
    assert torch.equal(logits_of(fast, inputs).argmax(-1), exact.argmax(-1))
    assert (logits_of(fast, inputs) - exact).abs().max() <= 1e-3 * exact.abs().max()
    # the other precisions, and a kernel named at load, are untouched by the record
    assert Packed.from_pretrained(folder).plan.index8_kernel == "dequant"
    assert Packed.from_pretrained(folder, precision="fast", index8_kernel="dequant").plan.exact
    fast.to("cpu")
    assert fast.plan.index8_kernel == "int16"
    # re-exporting the folder replaces it whole: the record of the old weights goes with it
    export_checkpoint(qat, folder, overwrite=True)
    assert not (folder / RECORD).exists() and Packed.from_pretrained(folder, precision="fast").plan.exact


@needs_int16
@pytest.mark.parametrize("damage", ["other weights", "not json", "unknown kernel", "not a record", "kernel a list",
                                    "exact kernel", "passed, counts fail", "passed, counts missing",
                                    "passed a string", "config without a checksum", "counts infinite",
                                    "counts NaN", "counts fractional", "accuracy above 1", "accuracy NaN",
                                    "equal above examples"])
def test_a_record_that_does_not_belong_is_ignored_with_a_warning(folder, caplog, damage: str) -> None:
    folder, inputs, qat = folder
    calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=1)
    path = folder / RECORD
    record = json.loads(path.read_text())
    if damage == "other weights":
        record["checkpoint"]["tensors"] = "0" * 64
        path.write_text(json.dumps(record))
    elif damage == "not json":
        path.write_text("{ half a record")
    elif damage == "unknown kernel":
        path.write_text(json.dumps({**record, "index8_kernel": "magic"}))
    elif damage == "kernel a list":
        path.write_text(json.dumps({**record, "index8_kernel": ["int16"]}))
    elif damage == "exact kernel":
        path.write_text(json.dumps({**record, "index8_kernel": "dequant"}))
    elif damage == "passed, counts fail":
        path.write_text(json.dumps({**record, "passed": True, "equal": 0, "agreement": 0.0}))
    elif damage == "passed, counts missing":
        path.write_text(json.dumps({k: v for k, v in record.items() if k != "exact_accuracy"}))
    elif damage == "passed a string":
        path.write_text(json.dumps({**record, "passed": "yes"}))
    elif damage in ("counts infinite", "counts NaN"):  # Python's json writes and reads Infinity / NaN
        bad = float("inf") if damage == "counts infinite" else float("nan")
        path.write_text(json.dumps({**record, "examples": bad, "equal": bad}))
    elif damage == "counts fractional":
        path.write_text(json.dumps({**record, "examples": record["examples"] + 0.5, "equal": record["equal"] + 0.5}))
    elif damage in ("accuracy above 1", "accuracy NaN"):
        bad = 1.5 if damage == "accuracy above 1" else float("nan")
        path.write_text(json.dumps({**record, "exact_accuracy": bad, "candidate_accuracy": bad}))
    elif damage == "equal above examples":
        path.write_text(json.dumps({**record, "equal": record["examples"] + 1}))
    elif damage == "config without a checksum":  # the record cannot be tied to the weights (nor can the config)
        config = json.loads((folder / "config.json").read_text())
        del config["sensimix_checksum"]
        (folder / "config.json").write_text(json.dumps(config))
    else:
        path.write_text(json.dumps([record]))
    with caplog.at_level(logging.WARNING, logger="sensimix.calibration_record"):
        model = Packed.from_pretrained(folder, precision="fast")
    assert model.plan.exact and not model.plan.calibrated
    assert any(RECORD in r.getMessage() and "exact path" in r.getMessage() for r in caplog.records)


@needs_int16
def test_a_failed_calibration_keeps_fast_exact(folder, monkeypatch) -> None:
    folder, inputs, qat = folder
    real = measuring._predictions

    def flipped(model, inputs, index8_kernel):
        preds = real(model, inputs, index8_kernel)
        return 1 - preds if index8_kernel else preds  # the candidate changes every prediction

    monkeypatch.setattr(measuring, "_predictions", flipped)
    record = calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=1)
    assert not record["passed"] and "predictions changed" in record["reason"]
    assert json.loads((folder / RECORD).read_text())["passed"] is False
    assert Packed.from_pretrained(folder, precision="fast").plan.exact


def test_nothing_is_written_where_the_candidate_cannot_run(folder, monkeypatch) -> None:
    folder, inputs, qat = folder
    monkeypatch.setattr(kernels.INDEX8_KERNELS["int16"], "unavailable", lambda device: "no AVX2 (test)")
    assert calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=1) is None
    assert not (folder / RECORD).exists()


def test_a_folder_without_a_checksum_is_refused(folder) -> None:
    folder, inputs, qat = folder
    if kernels.INDEX8_KERNELS["int16"].unavailable(torch.device("cpu")):
        pytest.skip("int16 unavailable: calibrate stops before reading the folder")
    config = json.loads((folder / "config.json").read_text())
    del config["sensimix_checksum"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sensimix_checksum"):
        calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=1)
    assert not (folder / RECORD).exists()


# ---------------------------------------------------------------------------------------------------
# compress calibrates what it trained
# ---------------------------------------------------------------------------------------------------
def _settings(**overrides) -> TrainSettings:
    return TrainSettings(**{**dict(max_steps=2, batch_size=8, learning_rate=1e-3, seed=3, device="cpu",
                                   logging_steps=1000, max_seq_length=32), **overrides})


@needs_int16
def test_compress_records_its_calibration_and_can_skip_it(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch,
                                                          caplog) -> None:
    # the tiny dev split (8 sentences) is too small for a verdict: nothing recorded, fast stays exact
    result = compress(tiny_bert_dir, "sst-2", tmp_path / "sm", glue_dir=tiny_glue_dir, layers=2, eightbit_layers=1,
                      settings=_settings())
    assert not (result.path / RECORD).exists() and "fewer than the 200 a verdict needs" in caplog.text
    assert Packed.from_pretrained(result.path, precision="fast").plan.exact
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)  # with a bar it can meet, the verdict is recorded
    result = compress(tiny_bert_dir, "sst-2", tmp_path / "sm1", glue_dir=tiny_glue_dir, layers=2, eightbit_layers=1,
                      settings=_settings())
    record = json.loads((result.path / RECORD).read_text())
    assert record["examples"] == 8 and record["data"] == "sst-2 dev"
    assert Packed.from_pretrained(result.path, precision="fast").plan.exact != record["passed"]
    skipped = compress(tiny_bert_dir, "sst-2", tmp_path / "sm2", glue_dir=tiny_glue_dir, layers=2,
                       eightbit_layers=1, settings=_settings(fast_calibration=False))
    untrained = compress(tiny_bert_dir, "sst-2", tmp_path / "sm3", layers=2, eightbit_layers=1,
                         settings=_settings(max_steps=0))
    assert not (skipped.path / RECORD).exists() and not (untrained.path / RECORD).exists()


def test_calibration_takes_train_examples_the_training_never_saw_else_dev(tiny_glue_dir, monkeypatch) -> None:
    from sensimix.data import Examples, load_glue

    numbered = Examples([str(i) for i in range(32)], None, [0] * 32)
    trained, held = numbered.shuffled_subset(8, 3).text_a, numbered.held_out(8, 3, 100).text_a
    assert len(trained) == 8 and sorted(trained + held, key=int) == numbered.text_a  # one permutation, split
    assert numbered.held_out(8, 3, 5).text_a == held[:5] and len(numbered.held_out(40, 3, 5)) == 0
    pairs = Examples(["a", "bbb", "cc", "d"], ["zzzz", "", "y", "xx"], [0, 1, 0, 1])  # both texts count; ties: order
    assert pairs.longest(2).text_a == ["a", "bbb"] and pairs.longest(9).text_a == pairs.text_a
    train = load_glue("sst-2", "train", tiny_glue_dir)
    seen = set(train.shuffled_subset(8, 3).text_a)  # the texts trained on: a repeat of one in another row was seen
    held = [t for t in train.held_out(8, 3, 100).text_a if t not in seen]
    assert len(held) == 20  # of 24 rows left out, 4 repeat a trained text
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 20)
    _, trained = provenance.training_examples("sst-2", tiny_glue_dir, train_limit=8, seed=3)
    examples, data, held_out = measuring.calibration_examples("sst-2", tiny_glue_dir, trained=trained)
    assert held_out and examples.text_a == held
    assert data == "sst-2 train: 20 examples held out of training (seed 3; 4 repeating a trained text left out)"
    # more held out than wanted: the longest (rounding has the most tokens to act on there), in held-out order
    examples, data, held_out = measuring.calibration_examples("sst-2", tiny_glue_dir, trained=trained, count=5)
    size = sorted(len(t) for t in held)
    assert held_out and len(examples) == 5 and min(len(t) for t in examples.text_a) >= size[-5]
    rest = iter(held)
    assert all(t in rest for t in examples.text_a)  # a subsequence
    assert data == ("sst-2 train: the 5 longest of 20 examples held out of training (seed 3; 4 repeating a trained "
                    "text left out)")
    assert measuring.calibration_examples("sst-2", tiny_glue_dir, trained=None)[1:] == ("sst-2 dev", False)
    for limit in (None, 16, 32, 1000):  # the whole split, or fewer than MIN_EXAMPLES left: dev
        _, trained = provenance.training_examples("sst-2", tiny_glue_dir, train_limit=limit, seed=3)
        examples, data, held_out = measuring.calibration_examples("sst-2", tiny_glue_dir, trained=trained)
        assert (data, held_out, len(examples)) == ("sst-2 dev", False, 8)


@needs_int16
def test_compress_calibrates_on_the_train_examples_it_left_out(tiny_bert_dir, tiny_glue_dir, tmp_path,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 20)
    result = compress(tiny_bert_dir, "sst-2", tmp_path / "sm", glue_dir=tiny_glue_dir, layers=2, eightbit_layers=1,
                      settings=_settings(train_limit=8))
    record = json.loads((result.path / RECORD).read_text())
    assert record["data"] == HELD_8_3 and record["examples"] == 20


# ---------------------------------------------------------------------------------------------------
# sensimix calibrate
# ---------------------------------------------------------------------------------------------------
@needs_int16
def test_cli_calibrate_writes_the_record_and_prints_the_verdict(tiny_bert_dir, tiny_glue_dir, tmp_path, capsys,
                                                                caplog, monkeypatch) -> None:
    from sensimix.cli import main

    out = compress(tiny_bert_dir, "sst-2", tmp_path / "sm", layers=2, eightbit_layers=1,
                   settings=_settings(max_steps=0)).path
    args = ["calibrate", "--model", str(out), "--task", "sst-2", "--glue-dir", str(tiny_glue_dir),
            "--max-seq-length", "32"]
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    assert main(args) == 0
    printed = capsys.readouterr().out
    record = (out / RECORD).read_text()
    verdict = "PASSED: precision fast uses int16" if json.loads(record)["passed"] else "FAILED ("
    assert f"of 8 sst-2 dev predictions equal on int16; {verdict}" in printed
    assert json.loads(record)["data"] == "sst-2 dev"
    # at the real bar 8 examples cannot give a verdict: refused, and the record above is kept as it was
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 200)
    assert main(args) == 2 and (out / RECORD).read_text() == record
    assert "sst-2 dev holds 8 examples, fewer than the 200 a verdict needs; nothing written" in caplog.text
    with pytest.raises(SystemExit) as refused:  # argparse: --examples below the bar
        main([*args, "--examples", "10"])
    assert refused.value.code == 2 and (out / RECORD).read_text() == record


def test_cli_calibrate_refuses_a_plain_bert_folder_and_writes_nothing(tiny_bert_dir, tiny_glue_dir, caplog) -> None:
    from sensimix.cli import main

    before = sorted(p.name for p in tiny_bert_dir.iterdir())
    assert main(["calibrate", "--model", str(tiny_bert_dir), "--task", "sst-2", "--glue-dir",
                 str(tiny_glue_dir)]) == 2
    assert "is not a SensiMix packed checkpoint" in caplog.text
    assert sorted(p.name for p in tiny_bert_dir.iterdir()) == before


@needs_int16
def test_cli_calibrate_auto_takes_the_held_out_examples_and_held_out_insists(tiny_bert_dir, tiny_glue_dir, tmp_path,
                                                                              monkeypatch, capsys, caplog) -> None:
    from sensimix.cli import main

    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    subset = compress(tiny_bert_dir, "sst-2", tmp_path / "sub", glue_dir=tiny_glue_dir, layers=2, eightbit_layers=1,
                      settings=_settings(train_limit=8, fast_calibration=False)).path
    whole = compress(tiny_bert_dir, "sst-2", tmp_path / "whole", glue_dir=tiny_glue_dir, layers=2,
                     eightbit_layers=1, settings=_settings(fast_calibration=False)).path
    args = ["--task", "sst-2", "--glue-dir", str(tiny_glue_dir), "--max-seq-length", "32"]
    assert main(["calibrate", "--model", str(subset), *args]) == 0
    assert f"of 20 {HELD_8_3} predictions" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(subset), *args[2:]]) == 0  # --task: the one it was trained on
    assert f"of 20 {HELD_8_3} predictions" in capsys.readouterr().out
    record = (subset / RECORD).read_text()
    assert main(["calibrate", "--model", str(subset), "--task", "qnli", *args[2:]]) == 2  # another: refused
    assert "--task qnli, but" in caplog.text and "was trained on sst-2" in caplog.text
    assert (subset / RECORD).read_text() == record
    assert main(["calibrate", "--model", str(whole), *args]) == 0  # trained on all of train: dev
    assert json.loads((whole / RECORD).read_text())["data"] == "sst-2 dev"
    (whole / RECORD).unlink()
    assert main(["calibrate", "--model", str(whole), "--split", "held-out", *args]) == 2
    assert "was not trained on a subset of sst-2 train" in caplog.text and not (whole / RECORD).exists()
    assert main(["calibrate", "--model", str(subset), "--split", "held-out", "--task", "mrpc",
                 *args[2:]]) == 2  # another task: its label count is checked first


@needs_int16
def test_reports_describe_the_record_in_one_line(folder) -> None:
    # what the V&V report and the acceptance suite print beside fast's plan: why fast ran what it ran
    folder, inputs, qat = folder
    assert calibration_record.describe_record(folder) == "no record"
    calibrate(folder, _labelled(folder, inputs), data="ragged", min_examples=1)
    record = json.loads((folder / RECORD).read_text())
    n = record["examples"]
    assert calibration_record.describe_record(folder) == f"int16 passed: {n} of {n} predictions equal on ragged"
    (folder / RECORD).write_text(json.dumps({**record, "passed": False, "reason": "too few", "equal": n - 1}))
    assert calibration_record.describe_record(folder) == f"int16 failed (too few): {n - 1} of {n} predictions equal on ragged"
    (folder / RECORD).write_text("{ half")
    assert calibration_record.describe_record(folder).startswith("unreadable record (")
