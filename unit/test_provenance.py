"""What a trained folder records of its train data (training_metrics.json's ``train_data``), and that no example is
called held out of its training unless the data given later is that data (issue 21, class 3)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import TINY, WORDS

from sensimix import calibration_record
from sensimix.cli import main
from sensimix.data import METRICS_FILE, Examples
from sensimix.train import TrainSettings, compress, finetune, provenance

# the tiny train split (32 rows) trained on 8 rows drawn with seed 3: 20 texts it never saw are left
HELD = "sst-2 train: 20 examples held out of training (seed 3; 4 repeating a trained text left out)"


def _settings(**overrides) -> TrainSettings:
    return TrainSettings(**{**dict(max_steps=2, batch_size=8, learning_rate=1e-3, seed=3, device="cpu",
                                   logging_steps=1000, max_seq_length=32, train_limit=8, fast_calibration=False),
                            **overrides})


@pytest.fixture(scope="module")
def trained(tiny_glue_dir, tmp_path_factory):
    """A SensiMix folder compressed from a tiny BERT on 8 seeded rows of the tiny SST-2 train split (made once: the
    tests only read it)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(0)
    bert = tmp_path_factory.mktemp("bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (bert / "vocab.txt").write_text("\n".join(tokens + [f"[unused{i}]" for i in range(TINY["vocab_size"] - len(tokens))]))
    BertForSequenceClassification(BertConfig(**TINY)).save_pretrained(bert)
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    out = tmp_path_factory.mktemp("trained") / "sm"
    return compress(bert, "sst-2", out, glue_dir=tiny_glue_dir, layers=2, eightbit_layers=1,
                    settings=_settings()).path


def _glue_copy(tmp_path: Path, tiny_glue_dir: Path, edit) -> Path:
    """A copy of the tiny glue folder whose SST-2 train.tsv lines (header first) went through ``edit``."""
    root = Path(shutil.copytree(tiny_glue_dir, tmp_path / "glue"))
    lines = (root / "SST-2" / "train.tsv").read_text().splitlines()
    (root / "SST-2" / "train.tsv").write_bytes(edit(lines).encode())
    return root


def _calibrate(folder: Path, glue: Path, split: str) -> int:
    return main(["calibrate", "--model", str(folder), "--glue-dir", str(glue), "--split", split,
                 "--max-seq-length", "32"])


def test_training_metrics_identify_the_examples_trained_on(trained, tiny_glue_dir, tiny_bert_dir, tmp_path):
    record = json.loads((trained / METRICS_FILE).read_text())["train_data"]
    train_file = (tiny_glue_dir / "SST-2" / "train.tsv").resolve()
    assert record["schema"] == provenance.SCHEMA and record["source"] == str(train_file)
    assert record["sha256"] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert (record["examples"], record["train_limit"], record["seed"], record["trained"]) == (32, 8, 3, 8)
    examples, again = provenance.training_examples("sst-2", tiny_glue_dir, train_limit=8, seed=3)
    assert again == record and len(examples) == 8  # what compress trained on, drawn again
    assert provenance.record_problem(record) is None
    reference = finetune(tiny_bert_dir, "sst-2", tmp_path / "ref", glue_dir=tiny_glue_dir,
                         settings=_settings(train_limit=None))  # finetune records it too: the whole split
    record = json.loads((reference.path / METRICS_FILE).read_text())["train_data"]
    assert (record["train_limit"], record["trained"], record["examples"]) == (None, 32, 32)


@pytest.mark.parametrize("edit, problem", [
    (lambda lines: "\n".join(lines[:1] + lines[:0:-1]) + "\n", "are not the training's (another order"),
    (lambda lines: "\n".join(lines + ["the film was bad\t0"]) + "\n", "it holds 33 examples, the training's 32"),
    (lambda lines: "\n".join(lines[:-1]) + "\n", "it holds 31 examples, the training's 32"),
    (lambda lines: "\n".join(lines[:1] + [lines[1][:-1] + "01"[lines[1].endswith("0")]] + lines[2:]) + "\n",
     "are not the training's (another order, or other text or labels)"),
], ids=["reordered", "row-added", "row-dropped", "label-changed"])
def test_held_out_is_refused_on_other_train_data_and_auto_says_why(trained, tiny_glue_dir, tmp_path, edit, problem,
                                                                   caplog, monkeypatch):
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    glue = _glue_copy(tmp_path, tiny_glue_dir, edit)
    before = sorted(p.name for p in trained.iterdir())
    assert _calibrate(trained, glue, "held-out") == 2  # before: "24 examples held out of training (seed 3)"
    error = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert error.startswith(f"the sst-2 train split given is not the one {trained} was trained on (")
    assert problem in error and error.endswith("use --split dev") and "\n" not in error
    assert sorted(p.name for p in trained.iterdir()) == before  # nothing written
    from sensimix.train.calibrate import calibration_examples, trained_on

    caplog.clear()
    examples, data, held_out = calibration_examples("sst-2", glue, trained=trained_on(trained, "sst-2"))
    assert (data, held_out) == ("sst-2 dev", False) and "fast calibration on sst-2 dev: the sst-2 train" in caplog.text


def test_the_same_examples_in_other_bytes_are_still_that_data(trained, tiny_glue_dir, tmp_path, monkeypatch):
    from sensimix.train.calibrate import calibration_examples, trained_on

    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    glue = _glue_copy(tmp_path, tiny_glue_dir, lambda lines: "\r\n".join(lines) + "\r\n")  # Windows line endings
    _, data, held_out = calibration_examples("sst-2", glue, trained=trained_on(trained, "sst-2"))
    assert held_out and data == HELD


def test_another_draw_of_the_same_seed_is_refused(trained, tiny_glue_dir, monkeypatch):
    from sensimix.train.calibrate import calibration_examples, trained_on

    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    real = Examples.subset_rows
    monkeypatch.setattr(Examples, "subset_rows", lambda self, limit, seed: real(self, limit, seed + 1))  # numpy changed
    with pytest.raises(ValueError, match="this numpy draws other rows for seed 3 than the training's did"):
        calibration_examples("sst-2", tiny_glue_dir, trained=trained_on(trained, "sst-2"), held_out_only=True)


def test_a_folder_without_the_record_is_calibrated_on_dev_and_held_out_refused(trained, tiny_glue_dir, tmp_path,
                                                                                 caplog, monkeypatch):
    from sensimix.train.calibrate import calibration_examples, trained_on

    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    old = Path(shutil.copytree(trained, tmp_path / "old"))
    metrics = json.loads((old / METRICS_FILE).read_text())
    del metrics["train_data"]  # written before the record existed: settings say train_limit 8, seed 3
    (old / METRICS_FILE).write_text(json.dumps(metrics))
    assert trained_on(old, "sst-2") == {"legacy": True, "train_limit": 8, "seed": 3}
    assert _calibrate(old, tiny_glue_dir, "held-out") == 2
    assert "records a seeded subset of sst-2 train (train_limit 8, seed 3) but not which train data" in caplog.text
    assert "use --split dev" in caplog.text
    caplog.clear()
    assert calibration_examples("sst-2", tiny_glue_dir, trained=trained_on(old, "sst-2"))[1:] == ("sst-2 dev", False)
    assert "WARNING" in caplog.text and "no example can be shown to be held out" in caplog.text
    metrics["train_data"] = {**json.loads((trained / METRICS_FILE).read_text())["train_data"], "examples_sha256": "ab"}
    (old / METRICS_FILE).write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="train_data fields are not those compress writes.*--split dev"):
        trained_on(old, "sst-2")


def test_the_recorded_data_gives_held_out_examples_as_before(trained, tiny_glue_dir, monkeypatch):
    from sensimix.data import load_glue
    from sensimix.train.calibrate import calibration_examples, trained_on

    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    examples, data, held_out = calibration_examples("sst-2", tiny_glue_dir, trained=trained_on(trained, "sst-2"))
    train = load_glue("sst-2", "train", tiny_glue_dir)
    seen = set(train.shuffled_subset(8, 3).text_a)
    assert held_out and data == HELD and len(examples) == 20 and not seen & set(examples.text_a)


def test_hub_data_is_identified_by_its_examples(monkeypatch, tiny_glue_dir):
    from sensimix import data
    from sensimix.train.calibrate import calibration_examples

    monkeypatch.delenv("GLUE_DIR", raising=False)
    local = data.load_glue("sst-2", "train", tiny_glue_dir)
    hub = {"train": local, "dev": data.load_glue("sst-2", "dev", tiny_glue_dir)}
    monkeypatch.setattr(data, "_read_hub", lambda spec, split: hub[split])  # no network in tests
    _, record = provenance.training_examples("sst-2", None, train_limit=8, seed=3, hub=True)
    assert record["source"] == "the hub's nyu-mll/glue (sst2, train split)" and record["sha256"] is None
    monkeypatch.setattr(calibration_record, "MIN_EXAMPLES", 8)
    assert calibration_examples("sst-2", None, trained=record, hub=True)[1:] == (HELD, True)
    # the same examples from a local file are the same data; another revision of the hub's is not
    assert calibration_examples("sst-2", tiny_glue_dir, trained=record)[1:] == (HELD, True)
    hub["train"] = local.select(list(range(1, len(local))))
    with pytest.raises(ValueError, match="it holds 31 examples, the training's 32"):
        calibration_examples("sst-2", None, trained=record, hub=True, held_out_only=True)
