"""The training recipe: PT/ILF schedule, losses, a real (tiny) Trainer run, reproducibility."""

import math

import pytest
import torch

from sensimix.qat import from_bert
from sensimix.train import recipe
from sensimix.data import Examples, tokenize


@pytest.mark.parametrize("pt,ilf,expected", [
    (True, True, [[], [5], [4, 5], [3, 4, 5], [3, 4, 5], [3, 4, 5]]),
    (False, True, [[5], [4, 5], [3, 4, 5], [3, 4, 5], [3, 4, 5], [3, 4, 5]]),
    (True, False, [[], [3, 4, 5], [3, 4, 5], [3, 4, 5], [3, 4, 5], [3, 4, 5]]),
    (False, False, [[3, 4, 5]] * 6),
])
def test_schedule(pt, ilf, expected):
    got = [recipe.binarized_layers_at(e, [3, 4, 5], pt=pt, ilf=ilf) for e in range(6)]
    assert got == expected


def test_schedule_epochs_needed():
    assert recipe.epochs_to_binarize_all(3) == 4
    assert recipe.epochs_to_binarize_all(1, pt=False) == 1
    assert recipe.epochs_to_binarize_all(3, ilf=False) == 2


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 2)
    assert recipe.distillation_loss(a, a, 2.0).abs().item() < 1e-6
    assert recipe.distillation_loss(a, -a, 2.0).item() > 0.01


def _tiny_data(tokenizer, n=48):
    words = ["good", "great", "bad", "awful"]
    texts = [f"the movie was {words[i % 4]}" for i in range(n)]
    labels = [0 if i % 4 < 2 else 1 for i in range(n)]
    return tokenize(Examples(texts, None, labels), tokenizer, 16)


def _train_tiny(tiny_bert_dir, tmp_path, **overrides):
    from transformers import AutoTokenizer, set_seed

    kwargs = dict(epochs=4, batch_size=8, learning_rate=1e-3, seed=7, device="cpu", logging_steps=1000)
    settings = recipe.TrainSettings(**{**kwargs, **overrides})
    set_seed(settings.seed)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = from_bert(tiny_bert_dir, num_hidden_layers=3, num_8bit_layers=1)
    data = _tiny_data(tok)
    metrics, schedule = recipe.train(model, tok, data, data, settings, tmp_path)
    return model, metrics, schedule


def test_training_follows_the_schedule_and_updates_every_part(tiny_bert_dir, tmp_path):
    from transformers import BertForSequenceClassification

    start = BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    model, metrics, schedule = _train_tiny(tiny_bert_dir, tmp_path)
    assert schedule == [(0, []), (1, [2]), (2, [1, 2]), (3, [1, 2])]
    assert model.binarized_layers == [1, 2]
    assert metrics["train_steps"] == 24 and metrics["train_examples"] == 48
    # every trainable part moved: 8-bit embeddings, 8-bit and 1-bit linears, float LayerNorm
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight",
                 "bert.encoder.layer.2.output.dense.weight", "bert.encoder.layer.2.output.LayerNorm.weight"):
        assert not torch.equal(model.get_parameter(name), start.get_parameter(name)), name


def test_training_is_reproducible(tiny_bert_dir, tmp_path):
    m1, _, _ = _train_tiny(tiny_bert_dir, tmp_path / "a", epochs=1)
    m2, _, _ = _train_tiny(tiny_bert_dir, tmp_path / "b", epochs=1)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n


def test_abwr_switch_changes_the_loss(tiny_bert_dir, tmp_path):
    _, with_abwr, _ = _train_tiny(tiny_bert_dir, tmp_path / "a", epochs=1)
    _, without, _ = _train_tiny(tiny_bert_dir, tmp_path / "b", epochs=1, abwr=False)
    # |W| ~ 0.02 at init, so ABWR adds about (1 - 0.02)^2 ~ 0.96 to the loss
    assert with_abwr["train_loss"] - without["train_loss"] > 0.5


@pytest.mark.parametrize("field,value,flag", [
    ("epochs", math.nan, "--epochs"), ("epochs", 0.0, "--epochs"), ("batch_size", 0, "--batch-size"),
    ("learning_rate", math.inf, "--lr"), ("max_seq_length", 1, "--max-seq-length"), ("train_limit", 0, "--train-limit"),
    ("distill_alpha", 1.5, "--distill-alpha"), ("distill_temperature", 0.0, "--distill-temperature"),
    ("device", "tpu", "--device"),
])
def test_settings_refuse_bad_values_by_flag_name(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        recipe.TrainSettings(**{field: value})


def test_no_training_examples_is_an_error(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = from_bert(tiny_bert_dir, num_hidden_layers=2, num_8bit_layers=1)
    empty = tokenize(Examples([], None, []), tok, 16)
    with pytest.raises(ValueError, match="no training examples"):
        recipe.train(model, tok, empty, None, recipe.TrainSettings(device="cpu"), tmp_path)
