"""Shared fixtures for the fast unit tests: tiny BERT geometries and a tiny tokenizer, all offline; a tiny QAT model
that splits a ragged batch, and spies on the CUDA code paths (plain helpers: helpers.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, WORDS, Calls, Launches, build_qat, ragged_inputs
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from sensimix.kernels import cuda as cuda_kernels
from sensimix.kernels import triton_kernels


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


# 100: N and K not multiples of 16 (the FP8 GEMM pads them; its sliced output takes the sign pass's torch fallback);
# 128: BERT-like multiples of 16 (the sign pass is the Triton kernel where triton runs)
@pytest.fixture(scope="module", params=[100, 128], ids=["ffn100", "ffn128"])
def qat_model(request):
    """A QAT model with a classifier that splits ``ragged_inputs`` into both classes with wide margins (a random head
    gives every row the same class, and equal predictions would prove nothing)."""
    qat, inputs = build_qat(intermediate_size=request.param), ragged_inputs()
    with torch.no_grad():
        pooled = qat.bert(**inputs).pooler_output
        centred = pooled - pooled.mean(0)
        u = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        proj = (centred @ u).sort().values
        b = len(proj)
        gaps = proj[1:] - proj[:-1]
        i = b // 4 + int(gaps[b // 4:3 * b // 4].argmax())  # the widest gap in the middle half
        cut = float(proj[i] + proj[i + 1]) / 2 + float(pooled.mean(0) @ u)
        scale = 4.0 / float(gaps[i])
        qat.classifier.weight.copy_(torch.stack([u, -u]) * scale)
        qat.classifier.bias.copy_(torch.tensor([-cut, cut]) * scale)
    qat.round_float_tensors_to_fp16_()  # what the checkpoint stores
    return qat.eval(), inputs


@pytest.fixture
def spies(monkeypatch) -> SimpleNamespace:
    """Which CUDA code ran: ``scaled_mm`` (the FP8 GEMM's calls), ``sign`` (the FP8 kernel's sign passes) and
    ``triton_sign`` (launches of the Triton sign kernel; None without triton)."""
    scaled_mm = Calls(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    sign = Calls(cuda_kernels.sign_operand)
    monkeypatch.setattr(cuda_kernels, "sign_operand", sign)
    triton_sign = None
    if triton_kernels.triton is not None:
        triton_sign = Launches(triton_kernels._sign_operand_kernel)
        monkeypatch.setattr(triton_kernels, "_sign_operand_kernel", triton_sign)
    return SimpleNamespace(scaled_mm=scaled_mm, sign=sign, triton_sign=triton_sign)
