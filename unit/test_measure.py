"""The measurement API (sensimix.measure) and `sensimix evaluate`: inputs, batching/cycling, the timing loop,
both model kinds, the certified log lines."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from sensimix import SensiMixForSequenceClassification, cli
from sensimix.export import export_checkpoint
from sensimix.qat import from_bert
from sensimix.measure import (
    InferenceResult,
    NonFiniteLogits,
    is_sensimix_folder,
    load_for_inference,
    make_batches,
    run_inference,
    synthetic_inputs,
    task_inputs,
)

GEOMETRY = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=40, type_vocab_size=2)
WORDS = "what who is the a capital of france paris city river long how many people live in it was built".split()
QNLI_ROWS = [
    ("what is the capital of france", "paris is the capital of france", "entailment"),
    ("who built it", "the river is long", "not_entailment"),
    ("how many people live in paris", "many people live in the city", "entailment"),
    ("what is the river", "it was built long ago", "not_entailment"),
    ("is paris a city", "paris is a city", "entailment"),
    ("who is it", "the capital of france", "not_entailment"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizer:
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS
    tokens += [f"[unused{i}]" for i in range(GEOMETRY["vocab_size"] - len(tokens))]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return BertTokenizer(str(path))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    (root / "QNLI").mkdir()
    lines = ["index\tquestion\tsentence\tlabel"] + [f"{i}\t{q}\t{s}\t{y}" for i, (q, s, y) in enumerate(QNLI_ROWS)]
    (root / "QNLI" / "dev.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def sensimix_dir(tmp_path_factory, tokenizer) -> Path:
    qat = from_bert(BertConfig(**GEOMETRY, num_hidden_layers=3), num_hidden_layers=3, num_8bit_layers=2, seed=0)
    return export_checkpoint(qat, tmp_path_factory.mktemp("sm") / "sensimix", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bert") / "bert"
    BertForSequenceClassification(BertConfig(**GEOMETRY, num_hidden_layers=2)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------
# inputs and batches
# ---------------------------------------------------------------------------------------------------
def test_synthetic_inputs_are_qnli_shaped() -> None:
    inputs = synthetic_inputs(64, max_seq_length=24, vocab_size=30522, seed=3)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    assert ids.shape == mask.shape == types.shape == (64, 24) and inputs["labels"].shape == (64,)
    assert set(inputs["labels"].tolist()) <= {0, 1}
    for row_ids, row_mask, row_types in zip(ids.tolist(), mask.tolist(), types.tolist()):
        n = sum(row_mask)
        assert 5 <= n <= 24 and row_mask == [1] * n + [0] * (24 - n)
        assert row_ids[0] == 101 and row_ids[n - 1] == 102 and row_ids[n:] == [0] * (24 - n)
        seps = [i for i in range(n) if row_ids[i] == 102]
        assert len(seps) == 2 and 2 <= seps[0] <= n - 3  # both segments non-empty
        assert all(999 <= t < 30522 for i, t in enumerate(row_ids[:n]) if i not in (0, *seps))
        assert row_types == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1) + [0] * (24 - n)
    assert torch.equal(ids, synthetic_inputs(64, max_seq_length=24, seed=3)["input_ids"])
    assert not torch.equal(ids, synthetic_inputs(64, max_seq_length=24, seed=4)["input_ids"])


def test_synthetic_inputs_small_vocab_and_errors() -> None:
    ids = synthetic_inputs(10, max_seq_length=8, vocab_size=50)["input_ids"]
    assert ids.max() < 50 and (ids[:, 0] == 1).all()
    with pytest.raises(ValueError, match="max_seq_length must be >= 5"):
        synthetic_inputs(4, max_seq_length=4)
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        synthetic_inputs(0)


def test_make_batches_cycles_to_num_examples() -> None:
    inputs = synthetic_inputs(10, max_seq_length=8, vocab_size=50)
    batches = make_batches(inputs, batch_size=4, num_examples=23)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 4, 4, 4, 3]
    order = torch.arange(23) % 10
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(torch.cat([b[key] for b in batches]), inputs[key][order])
    assert [len(b["input_ids"]) for b in make_batches(inputs, batch_size=4)] == [4, 4, 2]
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        make_batches(inputs, num_examples=0)


def test_task_inputs_pad_to_max_length(tokenizer, glue_dir) -> None:
    inputs = task_inputs("qnli", tokenizer, glue_dir=glue_dir, max_seq_length=16)
    assert inputs["input_ids"].shape == (6, 16) and inputs["labels"].tolist() == [0, 1, 0, 1, 0, 1]
    first = tokenizer("what is the capital of france", "paris is the capital of france")
    n = len(first["input_ids"])
    assert inputs["input_ids"][0, :n].tolist() == first["input_ids"]
    assert inputs["input_ids"][0, n:].eq(0).all() and inputs["attention_mask"][0].sum() == n
    assert inputs["token_type_ids"][0, :n].tolist() == first["token_type_ids"]


# ---------------------------------------------------------------------------------------------------
# the timing loop
# ---------------------------------------------------------------------------------------------------
class ParityModel(nn.Module):
    """Predicts the parity of the second token; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls += 1
        return nn.functional.one_hot(input_ids[:, 1] % 2, 2).float()


def test_run_inference_counts_predictions_and_accuracy() -> None:
    inputs = synthetic_inputs(10, max_seq_length=8, vocab_size=50, seed=1)
    batches = make_batches(inputs, batch_size=4, num_examples=13)
    model = ParityModel()
    result = run_inference(model, batches, warmup_batches=2)
    assert isinstance(result, InferenceResult)
    assert model.calls == 2 + len(batches), "warm-up batches run in addition to the timed pass"
    assert (result.num_examples, result.batch_size) == (13, 4)
    want = (inputs["input_ids"][:, 1] % 2)[torch.arange(13) % 10]
    assert torch.equal(result.predictions, want)
    labels = inputs["labels"][torch.arange(13) % 10]
    assert result.accuracy == pytest.approx((want == labels).double().mean().item())
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    assert run_inference(model, no_labels, warmup_batches=0).accuracy is None
    assert result.log_lines()[:2] == ["Num examples = 13", "Batch size = 4"]


# ---------------------------------------------------------------------------------------------------
# both model kinds
# ---------------------------------------------------------------------------------------------------
def test_load_for_inference_plain_bert(bert_dir) -> None:
    model = load_for_inference(bert_dir, device="cpu", precision="fp32")
    assert not model.training and model.config._attn_implementation == "eager"
    hf = BertForSequenceClassification.from_pretrained(bert_dir, attn_implementation="eager").eval()
    inputs = synthetic_inputs(3, max_seq_length=12, vocab_size=100)
    with torch.inference_mode():
        got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    token_type_ids=inputs["token_type_ids"]).logits
        want = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  token_type_ids=inputs["token_type_ids"]).logits
    assert torch.equal(got, want)
    fp16 = load_for_inference(bert_dir, device="cpu", precision="fp16")
    assert fp16.config._attn_implementation == "sdpa" and fp16.dtype == torch.float16
    too_long = make_batches(synthetic_inputs(2, max_seq_length=41, vocab_size=100))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        run_inference(model, too_long, warmup_batches=0)


def test_load_for_inference_sensimix(sensimix_dir) -> None:
    model = load_for_inference(sensimix_dir, device="cpu")
    assert isinstance(model, SensiMixForSequenceClassification) and model.dtype == torch.float32
    assert model.exact and model.precision == "fp32", "the default stays the exact path"
    assert load_for_inference(sensimix_dir, weights="pytorch_model.bin").source_file.name == "pytorch_model.bin"
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, fast"):
        load_for_inference(sensimix_dir, precision="int4")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_for_inference(sensimix_dir.parent)


def test_load_for_inference_fast(sensimix_dir, bert_dir) -> None:
    from sensimix.inference import fast_index8_kernel

    fast = load_for_inference(sensimix_dir, device="cpu", precision="fast")
    assert fast.precision == "fast" and fast.skip_padding
    assert fast.index8_kernel == fast_index8_kernel("cpu")
    explicit = load_for_inference(sensimix_dir, device="cpu", precision="fast", index8_kernel="bf16")
    assert explicit.index8_kernel == "bf16" and explicit.precision == "fast" and not explicit.exact
    with pytest.raises(ValueError, match="plain BERT folder: precision 'fast' is SensiMix's"):
        load_for_inference(bert_dir, device="cpu", precision="fast")


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------
LINES = [r"Num examples = (\d+)", r"Batch size = (\d+)", r"duration: (\d+) ms", r"acc = ([0-9.]+)"]


@pytest.mark.parametrize("which", ["sensimix", "bert"])
def test_cli_prints_certified_lines_and_json(which, sensimix_dir, bert_dir, glue_dir, tmp_path, capsys) -> None:
    model = sensimix_dir if which == "sensimix" else bert_dir
    out = tmp_path / "result.json"
    code = cli.main(["evaluate", "--model", str(model), "--task", "qnli", "--glue-dir", str(glue_dir),
                     "--examples", "10", "--batch-size", "4", "--max-seq-length", "32", "--device", "cpu",
                     "--warmup-batches", "1", "--json", str(out)])
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(printed) == 4
    values = [re.fullmatch(pattern, line) for pattern, line in zip(LINES, printed)]
    assert all(values), printed
    assert (values[0].group(1), values[1].group(1)) == ("10", "4")
    acc = float(values[3].group(1))
    data = json.loads(out.read_text())
    assert data["log"] == printed and data["kind"] == which
    assert (data["num_examples"], data["batch_size"], data["acc"]) == (10, 4, acc)
    assert data["device"] == "cpu" and data["kind"] == which


def test_cli_json_never_replaces_the_model_or_a_file_that_is_not_a_result(sensimix_dir, tmp_path, caplog) -> None:
    args = ["evaluate", "--model", str(sensimix_dir), "--synthetic", "--examples", "4", "--batch-size", "4",
            "--max-seq-length", "16", "--device", "cpu", "--warmup-batches", "0", "--json"]
    weights = {p.name: p.read_bytes() for p in sensimix_dir.iterdir() if p.is_file()}
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target, message in ((sensimix_dir / "model.safetensors", "is inside the --model folder"),
                            (sensimix_dir / "config.json", "is inside the --model folder"),
                            (sensimix_dir / "new.json", "is inside the --model folder"),
                            (notes, "exists and is not a JSON file")):
        caplog.clear()
        assert cli.main([*args, str(target)]) == 2
        assert message in caplog.text
    assert {p.name: p.read_bytes() for p in sensimix_dir.iterdir() if p.is_file()} == weights
    assert notes.read_text() == "mine"
    earlier = tmp_path / "earlier.json"  # an earlier result is replaced
    earlier.write_text("{}")
    assert cli.main([*args, str(earlier)]) == 0 and json.loads(earlier.read_text())["num_examples"] == 4


def test_cli_task_defaults_to_the_trained_one_and_refuses_another(sensimix_dir, glue_dir, tmp_path, capsys,
                                                                  caplog) -> None:
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(sensimix_dir, trained)
    (trained / "training_metrics.json").write_text(json.dumps({"task": "qnli"}))
    args = ["evaluate", "--model", str(trained), "--glue-dir", str(glue_dir), "--batch-size", "4",
            "--max-seq-length", "32", "--device", "cpu", "--warmup-batches", "0"]
    assert cli.main(args) == 0 and "Num examples = 6" in capsys.readouterr().out
    (trained / "training_metrics.json").write_text(json.dumps({"task": "sst2"}))
    assert cli.main([*args, "--task", "qnli"]) == 2
    assert "--task qnli, but" in caplog.text and "was trained on sst-2 (its training_metrics.json)" in caplog.text


def test_cli_synthetic_needs_no_data(sensimix_dir, capsys) -> None:
    code = cli.main(["evaluate", "--model", str(sensimix_dir), "--synthetic", "--examples", "6", "--batch-size",
                     "4", "--max-seq-length", "16", "--device", "cpu", "--warmup-batches", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Num examples = 6" in printed and "acc = n/a" in printed  # random labels score nothing


def test_cli_hub_data_reads_the_hub_without_a_glue_folder(sensimix_dir, monkeypatch, capsys) -> None:
    from sensimix import data

    monkeypatch.delenv("GLUE_DIR", raising=False)
    rows = data.Examples([q for q, _, _ in QNLI_ROWS], [s for _, s, _ in QNLI_ROWS],
                         [0 if y == "entailment" else 1 for _, _, y in QNLI_ROWS])
    monkeypatch.setattr(data, "_read_hub", lambda spec, split: rows)  # no network
    args = ["evaluate", "--model", str(sensimix_dir), "--task", "qnli", "--batch-size", "4", "--max-seq-length",
            "32", "--device", "cpu", "--warmup-batches", "0"]
    assert cli.main(args) == 2  # no folder, no hub: a clear error
    assert cli.main([*args, "--hub-data"]) == 0
    assert f"Num examples = {len(QNLI_ROWS)}" in capsys.readouterr().out


def test_cli_fast_precision(sensimix_dir, glue_dir, tmp_path, capsys) -> None:
    out = tmp_path / "fast.json"
    code = cli.main(["evaluate", "--model", str(sensimix_dir), "--task", "qnli", "--glue-dir", str(glue_dir),
                     "--batch-size", "4", "--max-seq-length", "32", "--device", "cpu", "--warmup-batches", "0",
                     "--precision", "fast", "--json", str(out)])
    assert code == 0
    assert "Num examples = 6" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["precision"] == "fast" and data["skip_padding"] is True


def test_cli_errors_are_clear(sensimix_dir, glue_dir, tmp_path, caplog) -> None:
    args = ["evaluate", "--task", "qnli", "--glue-dir", str(glue_dir), "--device", "cpu"]
    assert cli.main([*args, "--model", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in caplog.text
    assert cli.main([*args, "--model", str(sensimix_dir), "--max-seq-length", "64"]) == 2
    assert "max_position_embeddings=40" in caplog.text
    assert cli.main([*args, "--model", str(sensimix_dir), "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist; create it first" in caplog.text
    # an existing target that is not a regular file: a rename over it would replace it (/dev/null, a symlink)
    fifo, link, real = tmp_path / "fifo", tmp_path / "link.json", tmp_path / "real.json"
    os.mkfifo(fifo)
    real.write_text("{}")
    link.symlink_to(real)
    for target, message in ((fifo, "is not a regular file"), (link, "is a symbolic link"), (tmp_path, "is a folder")):
        assert cli.main([*args, "--model", str(sensimix_dir), "--json", str(target)]) == 2
        assert message in caplog.text
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and real.read_text() == "{}"


def test_a_bert_whose_weights_do_not_match_its_config_is_refused(tiny_bert_dir, tmp_path, caplog) -> None:
    """Missing layers would run with random values: every encoder weight must come from the file."""
    import shutil

    from sensimix.sources import SourceError, load_bert_classifier

    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))  # the file holds 4
    with pytest.raises(SourceError, match="weights do not match its config.json \\(6 layers.*missing "
                                          "bert.encoder.layer.4"):
        load_bert_classifier(bert, 2)
    assert cli.main(["evaluate", "--model", str(bert), "--synthetic", "--examples", "2", "--device", "cpu"]) == 2
    assert "The model would run with random values there" in caplog.text
    (bert / "config.json").write_text(json.dumps(config))
    assert load_bert_classifier(bert, 2).config.num_hidden_layers == 4
    with pytest.raises(SourceError, match="missing classifier.bias"):  # a teacher's head must be trained
        load_bert_classifier(_without_head(bert), 2, trained_head=True)


def test_a_damaged_bert_folder_is_one_error_line(tiny_bert_dir, sensimix_dir, tmp_path, caplog) -> None:
    """An unknown activation, a truncated model.safetensors, a length past the position table: exit 2 with the
    reason, before any data is tokenized (a huge --max-seq-length would fill the memory with padding first)."""
    import shutil

    from sensimix.sources import SourceError, load_bert_classifier

    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "hidden_act": "nope"}))
    with pytest.raises(SourceError, match="hidden_act must name one of transformers' activations"):
        load_bert_classifier(bert, 2)
    (bert / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 3}))
    with pytest.raises(SourceError, match="some tensors have another shape than config.json says"):
        load_bert_classifier(bert, 2)
    (bert / "config.json").write_text(json.dumps(config))
    weights = bert / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SourceError, match=r"cannot load the BERT weights \(SafetensorError"):
        load_bert_classifier(bert, 2)
    assert cli.main(["evaluate", "--model", str(bert), "--synthetic", "--examples", "2", "--device", "cpu"]) == 2
    assert "cannot load the BERT weights" in caplog.text
    assert cli.main(["evaluate", "--model", str(sensimix_dir), "--synthetic", "--max-seq-length", "100000000",
                     "--device", "cpu"]) == 2
    assert "--max-seq-length 100000000 is longer than the position table" in caplog.text


def test_a_bert_file_with_shared_tensors_loads_untied_and_saves(tiny_bert_dir, tmp_path) -> None:
    import shutil

    from sensimix.sources import load_bert_classifier

    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    state = BertForSequenceClassification.from_pretrained(bert).state_dict()
    first, second = (f"bert.encoder.layer.{i}.attention.output.LayerNorm.weight" for i in (0, 1))
    state[second] = state[first]  # one tensor under two names, as a hand-made checkpoint may hold
    (bert / "model.safetensors").unlink()
    torch.save(state, bert / "pytorch_model.bin")
    model = load_bert_classifier(bert, 2)
    weights = dict(model.named_parameters())
    assert weights[first].untyped_storage().data_ptr() != weights[second].untyped_storage().data_ptr()
    model.save_pretrained(tmp_path / "saved")  # before: transformers refused shared tensors it does not know as tied


def _without_head(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("classifier")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


class NaNModel(nn.Module):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = torch.zeros(len(input_ids), 2)
        out[-1, 0] = float("nan")
        return out


def test_nan_logits_are_an_error_not_a_score() -> None:
    batches = make_batches(synthetic_inputs(10, max_seq_length=8, vocab_size=50), batch_size=4)
    with pytest.raises(NonFiniteLogits, match="NaN/inf logits on 3 of 3 batches"):
        run_inference(NaNModel(), batches, warmup_batches=0)


def test_nan_layer_norm_eps_exits_2(sensimix_dir, tmp_path, caplog) -> None:
    """A config.json edited to layer_norm_eps NaN is refused at load; evaluating never prints acc = 0.5."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sensimix_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["layer_norm_eps"] = float("nan")
    (bad / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["evaluate", "--model", str(bad), "--synthetic", "--examples", "4", "--device", "cpu",
                     "--max-seq-length", "16"]) == 2
    assert "layer_norm_eps" in caplog.text


def test_make_batches_can_carry_the_packing() -> None:
    inputs = synthetic_inputs(10, max_seq_length=16, vocab_size=50)
    batches = make_batches(inputs, batch_size=4, packing=True)
    assert all(b["packing"].batch_shape == tuple(b["input_ids"].shape) for b in batches)


def test_a_sensimix_config_without_its_format_field_is_named_not_read_as_bert(sensimix_dir, bert_dir,
                                                                             tmp_path) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(sensimix_dir, damaged)
    config = json.loads((damaged / "config.json").read_text())
    del config["sensimix_format"]
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="describes a SensiMix model but has no sensimix_format"):
        is_sensimix_folder(damaged)
    assert is_sensimix_folder(sensimix_dir) and not is_sensimix_folder(bert_dir)
