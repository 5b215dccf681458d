"""scripts/precision_agreement.py: the measurement behind `fast` being the exact path, on a tiny folder."""

from __future__ import annotations

import json

from helpers import load_script

from sensimix.export import export_checkpoint
from sensimix.inference.plan import fast_index8_kernel
from sensimix.qat import from_bert
from sensimix.sources import load_tokenizer


def test_each_precision_is_compared_with_the_exact_path(tiny_bert_dir, tiny_glue_dir, tmp_path):
    script = load_script("precision_agreement")
    folder = export_checkpoint(from_bert(tiny_bert_dir, num_hidden_layers=2, num_8bit_layers=1), tmp_path / "sm",
                               load_tokenizer(tiny_bert_dir))
    out = tmp_path / "agreement.json"
    assert script.main([str(folder), "--glue-dir", str(tiny_glue_dir), "--max-seq-length", "16",
                        "--precisions", "fp32", "bf16", "fast", "--index8-kernels", "dequant", "--json",
                        str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["precision"] + ("+" + r["index8_kernel"] if i > 2 else ""): r for i, r in enumerate(result["rows"])}
    assert list(rows) == ["fp32", "bf16", "fast", "fp32+dequant"] and result["environment"]["torch"]
    n = rows["fp32"]["examples"]
    assert n > 0 and all(r["examples"] == n for r in rows.values())
    # the exact path against itself, fast (the exact path's kernels) and the exact kernel named: all equal
    assert rows["fp32"]["predictions_equal"] == rows["fast"]["predictions_equal"] == n
    assert rows["fp32+dequant"]["predictions_equal"] == n and rows["fast"]["index8_kernel"] == fast_index8_kernel("cpu")
    assert "approximate" in rows["bf16"]["plan"] and 0 <= rows["bf16"]["predictions_equal"] <= n
