"""KOTCA criterion 1: SensiMix (2+1) pytorch_model.bin <= 10% of BERT's, bytes on disk.

Certified: 42.2 MB / 438.0 MB = 9.6%. The BERT folder is BertForSequenceClassification with bert-base-uncased's
geometry (random weights: the size does not depend on their values); the SensiMix folder is
`sensimix compress --max-steps 0` of it. Each folder's pytorch_model.bin is first proven to hold the tensors of
its model.safetensors (the file transformers loads), which is held to the same bar.
"""

from __future__ import annotations

import json

import pytest

from sensimix.checkpoint import WEIGHTS_SAFETENSORS
from sensimix.vv.criteria import size_criterion
from sensimix.vv.procedure import BERT_BASE_BIN_BYTES, SIZE_THRESHOLD
from sensimix.vv.sizes import CERTIFIED_FOLDER_FILES, SizeReport


@pytest.fixture(scope="module")
def sizes(vv_run) -> SizeReport:
    return vv_run.sizes()


def test_the_folders_are_bert_base_and_its_sensimix_2_1(vv_run):
    # what the certified folders held: bert-base-uncased (12 layers of 768, 12 heads, FFN 3072, its 30,522-token
    # vocabulary) and its SensiMix (2+1): the first 3 layers, 2 of them 8-bit, the same width and vocabulary
    bert, sensimix = vv_run.folders
    for folder in (bert, sensimix):
        missing = [f for f in (*CERTIFIED_FOLDER_FILES, WEIGHTS_SAFETENSORS) if not (folder / f).is_file()]
        assert not missing, f"{folder} lacks {missing}; the certified folders held {CERTIFIED_FOLDER_FILES}"
        vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        assert len(vocab) == 30522 and (vocab[0], *vocab[100:104]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    geometry = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "vocab_size")
    b, s = (json.loads((folder / "config.json").read_text()) for folder in (bert, sensimix))
    assert tuple(b[k] for k in geometry) == ("bert", 12, 768, 12, 3072, 30522)
    assert tuple(s[k] for k in geometry) == ("sensimix", 3, 768, 12, 3072, 30522) and s["num_8bit_layers"] == 2


def test_bert_baseline_is_bert_base_fp32(sizes):
    # The ratio means something only against the certified baseline: bert-base, fp32, 438.0 MB.
    assert sizes.bert_bin == pytest.approx(BERT_BASE_BIN_BYTES, rel=0.01), (
        f"BERT pytorch_model.bin is {sizes.bert_bin / 1e6:.1f} MB; the certified bert-base fp32 file is 438.0 MB")


def test_compression_ratio(sizes):
    c = size_criterion(sizes)
    assert sizes.weight_files_agree, "each folder's two weight files must hold the same tensors"
    assert c.passed, (f"{c.title}: {sizes.sensimix_bin / 1e6:.1f} MB / {sizes.bert_bin / 1e6:.1f} MB = "
                      f"{c.format_value()} > {c.format_value(c.threshold)}")


def test_safetensors_ratio(sizes):
    ratio = sizes.safetensors_ratio
    assert ratio is not None, "a model.safetensors is missing from one of the folders"
    assert ratio <= SIZE_THRESHOLD, (
        f"model.safetensors: {sizes.sensimix_safetensors / 1e6:.1f} MB / {sizes.bert_safetensors / 1e6:.1f} MB "
        f"= {100 * ratio:.2f}% > {100 * SIZE_THRESHOLD:.0f}%")
