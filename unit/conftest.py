"""Shared fixtures for the fast unit tests: tiny BERT geometries and a tiny tokenizer, all offline."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=52,
            max_position_embeddings=64, type_vocab_size=2)
WORDS = "the a movie film good bad great awful is was not very what who where when why how of to and it".split()


@pytest.fixture
def tiny_bert_config() -> BertConfig:
    return BertConfig(**TINY)


@pytest.fixture
def tiny_vocab(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokens += [f"[unused{i}]" for i in range(TINY["vocab_size"] - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


@pytest.fixture
def tiny_bert_dir(tmp_path_factory, tiny_bert_config, tiny_vocab):
    """A saved random tiny BERT classifier with a tokenizer: stands in for a pre-trained checkpoint."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(tiny_bert_config).save_pretrained(out)
    BertTokenizer(tiny_vocab).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_glue_dir(tmp_path_factory):
    """SST-2 in the glue_data layout, made of tiny-vocab words: train 32 rows, dev 8 rows."""
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    adjectives = {"good": 1, "great": 1, "bad": 0, "awful": 0}
    rows = [(f"the {noun} was {'very ' * (i % 2)}{adj}", y)
            for i, (noun, (adj, y)) in enumerate((n, a) for n in ("movie", "film") for a in adjectives.items()
                                                 for _ in range(5))]
    for split in ("train", "dev"):
        part = [row for i, row in enumerate(rows) if (i % 5 == 0) == (split == "dev")]
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in part]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root
