"""sensimix.bench.parity: the packed model against the QAT model it came from (issue 24's parity goal)."""

from __future__ import annotations

import pytest
import torch
from helpers import build_qat, ragged_inputs

from sensimix.bench.parity import parity
from sensimix.export import export_checkpoint


@pytest.mark.parametrize("activation_quant", [None, "a8"])
def test_an_export_has_parity_and_an_a8_export_is_bitwise(tmp_path, activation_quant):
    qat = build_qat(4, 2, seed=3, activation_quant=activation_quant)
    folder = export_checkpoint(qat, tmp_path / "m")
    inputs = {**ragged_inputs(), "labels": torch.tensor([0, 1] * 6)}
    r = parity(qat, folder, inputs)
    assert r["met"] and r["examples"] == 12 and r["predictions_equal"] == 12 and r["flips"] == []
    assert r["bitwise"] == (activation_quant == "a8")
    assert r["max_abs_logit_gap"] <= 1e-5 and r["qat_accuracy"] == r["packed_accuracy"]
    assert r["rows_above_tolerance"] == 0  # no row needed the sign-step excuse


def test_another_model_s_folder_is_no_parity(tmp_path):
    # the check can fail: the folder of another model (other seed) differs in logits and predictions
    folder = export_checkpoint(build_qat(4, 2, seed=4), tmp_path / "other")
    r = parity(build_qat(4, 2, seed=3), folder, ragged_inputs())
    assert not r["met"] and r["max_abs_logit_gap"] > 1e-3 and not r["bitwise"]
    assert r["rows_above_tolerance"] >= 1
