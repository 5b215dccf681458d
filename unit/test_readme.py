"""The README's Python examples run as written, on a tiny packed model standing in for the trained folder they
name (out/sst2-3+3), in a temporary working folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, tiny_vocab):
    from sensimix.export import export_checkpoint
    from sensimix.qat import from_bert

    qat = from_bert(BertConfig(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                               max_position_embeddings=64, num_hidden_layers=6), num_hidden_layers=6,
                    num_8bit_layers=3, seed=0)
    export_checkpoint(qat, tmp_path / "out" / "sst2-3+3", BertTokenizer(tiny_vocab))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2 and any("pipeline(" in b for b in BLOCKS) and \
        any("AutoModelForSequenceClassification" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(readme_folder, index, capsys):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    for value in namespace.values():  # whatever the example computed is finite
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all()
