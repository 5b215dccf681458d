"""The benchmark's arithmetic (sensimix.bench.results) on made-up rounds whose figures were computed by hand: per-row
times and ratios, weight memory, logit gaps, the best peer and issue 10's goals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sensimix.bench.models import ModelSpec
from sensimix.bench.results import BEST_PEER, GOALS, Goal, best_peer, goals, make_rows

BASE, PEER, EXACT, FAST = "bert-fp32", "bert3-ort-int8-bucketed", "sensimix-2+1-fp32", "sensimix-2+1-fast"
SPECS = [ModelSpec(BASE, "BERT fp32", "baseline", "certified", "bert"),
         ModelSpec("bert-ort-int8", "BERT ORT int8", "peer", "ort", "", "int8", skipped="onnxruntime is not installed"),
         ModelSpec(PEER, "3-layer BERT ORT int8, 4 length buckets", "peer", "ort", "b3.onnx", "int8", layers=3,
                   buckets=4),
         ModelSpec(EXACT, "SensiMix (2+1) fp32 (exact)", "sensimix", "sensimix", "sm21"),
         ModelSpec(FAST, "SensiMix (2+1) fast, padding kept", "sensimix", "sensimix", "sm21", "fast",
                   skip_padding=False, reference=EXACT)]
# ms per round (2 batches each); the baseline's median round is 200 ms, the peer's 50, exact 30, fast 20
TRIALS = [{BASE: 200.0, PEER: 40.0, EXACT: 30.0, FAST: 20.0},
          {BASE: 100.0, PEER: 50.0, EXACT: 10.0, FAST: 25.0},
          {BASE: 300.0, PEER: 60.0, EXACT: 60.0, FAST: 15.0}]
MEMORY = {BASE: {"weight_memory_bytes": 400}, PEER: {"error": "MemoryError: boom"},
          EXACT: {"weight_memory_bytes": 40, "rss_load_bytes": 50}, FAST: {"weight_memory_bytes": 60}}


def timer(accuracy: float, predictions: list[int]) -> SimpleNamespace:
    return SimpleNamespace(accuracy=accuracy, results=[SimpleNamespace(predictions=torch.tensor(predictions))])


TIMERS = {BASE: timer(0.5, [0, 0, 1, 1]), PEER: timer(0.75, [0, 1, 1, 1]), EXACT: timer(0.5, [0, 1, 1, 0]),
          FAST: timer(0.25, [0, 1, 0, 0])}
LOGITS = {BASE: torch.zeros(2, 2), PEER: torch.zeros(2, 2), EXACT: torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
          FAST: torch.tensor([[1.25, -2.0], [0.5, 2.0]])}


@pytest.fixture
def rows() -> dict[str, dict]:
    made = make_rows(SPECS, TIMERS, TRIALS, 2, LOGITS, MEMORY, "cpu")
    assert best_peer(made) == PEER
    return {r["key"]: r for r in made}


def test_times_are_per_batch_and_ratios_are_of_the_median_rounds(rows):
    assert rows[PEER]["ms_per_round"] == [20.0, 25.0, 30.0] and rows[PEER]["ms_per_batch"] == 25.0
    assert rows[EXACT]["ms_per_round"] == [15.0, 5.0, 30.0] and rows[EXACT]["ms_per_batch"] == 15.0
    # median round over the baseline's median round (50 / 200), not the median of the per-round ratios (0.2)
    assert rows[PEER]["ratio_vs_bert_fp32"] == pytest.approx(0.25)
    assert rows[PEER]["ratio_per_round"] == pytest.approx([0.2, 0.5, 0.2])
    assert rows[EXACT]["ratio_vs_bert_fp32"] == pytest.approx(0.15)
    assert rows[FAST]["ratio_vs_bert_fp32"] == pytest.approx(0.10)
    assert rows[FAST]["ratio_per_round"] == pytest.approx([0.1, 0.25, 0.05])
    assert (rows[FAST]["accuracy"], rows[FAST]["skip_padding"]) == (0.25, False)
    assert "skip_padding" not in rows[EXACT]  # None: the plan's choice, not written


def test_the_best_peer_is_the_fastest_peer_even_when_sensimix_is_faster(rows):
    # fast (10 ms per batch) beats the peer (25 ms) but is not a peer; the baseline (100 ms) counts as one
    assert rows[BASE]["ratio_vs_best_peer"] == pytest.approx(4.0)
    assert rows[PEER]["ratio_vs_best_peer"] == pytest.approx(1.0)
    assert rows[EXACT]["ratio_vs_best_peer"] == pytest.approx(0.6)
    assert rows[FAST]["ratio_vs_best_peer"] == pytest.approx(0.4)
    assert rows[FAST]["ratio_vs_best_peer_per_round"] == pytest.approx([0.5, 0.5, 0.25])
    assert rows[BASE]["ratio_vs_best_peer_per_round"] == pytest.approx([5.0, 2.0, 5.0])


def test_weight_memory_against_the_baseline(rows):
    assert rows[EXACT]["weight_memory_ratio_vs_bert_fp32"] == pytest.approx(0.10)  # 40 / 400 bytes
    assert rows[FAST]["weight_memory_ratio_vs_bert_fp32"] == pytest.approx(0.15)  # 60 / 400
    assert rows[EXACT]["rss_load_bytes"] == 50  # every figure measured is kept
    assert rows[PEER]["error"] == "MemoryError: boom" and "weight_memory_ratio_vs_bert_fp32" not in rows[PEER]


def test_logit_gap_and_agreement_against_the_reference_row(rows):
    # |1.25 - 1| = 0.25 and |2 - 3| = 1: the gap is 1, relative to the reference's largest |logit|, 3
    assert rows[FAST]["max_abs_logit_gap"] == pytest.approx(1.0)
    assert rows[FAST]["relative_logit_gap"] == pytest.approx(1 / 3)
    assert rows[FAST]["prediction_agreement"] == pytest.approx(0.75)  # [0, 1, 0, 0] vs [0, 1, 1, 0]
    assert "max_abs_logit_gap" not in rows[EXACT] and "prediction_agreement" not in rows[BASE]  # references


def test_a_skipped_row_says_why_and_has_no_figures(rows):
    assert rows["bert-ort-int8"] == {"key": "bert-ort-int8", "name": "BERT ORT int8", "group": "peer", "runtime": "ort",
                                     "precision": "int8", "layers": None, "buckets": None, "reference": None,
                                     "skipped": "onnxruntime is not installed"}


def test_a_row_whose_reference_was_left_out_gets_no_gap():
    # --rows picked the fast row without its exact row
    made = make_rows([SPECS[0], SPECS[4]], TIMERS, TRIALS, 2, {BASE: LOGITS[BASE], FAST: LOGITS[FAST]}, {}, "cpu")
    assert "max_abs_logit_gap" not in made[1] and made[1]["ms_per_batch"] == 10.0


def test_goals_from_hand_computed_rows(rows):
    got = {g["id"]: g for g in goals(list(rows.values()), PEER)}
    assert list(got) == [g.id for g in GOALS]
    assert got["fast_time_vs_best_peer"] == {"id": "fast_time_vs_best_peer", "model": "sensimix-2+1-fast",
                                             "against": PEER, "what": "time", "max_ratio": 0.75, "ratio": 0.4,
                                             "met": True}  # 10 / 25 ms
    assert (got["exact_time_vs_bert_fp32"]["ratio"], got["exact_time_vs_bert_fp32"]["met"]) == (0.15, False)
    assert (got["fast_weight_memory_vs_bert_fp32"]["ratio"], got["fast_weight_memory_vs_bert_fp32"]["met"]) == (
        0.15, True)  # 60 / 400 bytes: at the bar counts as met
    assert (got["exact_weight_memory_vs_bert_fp32"]["ratio"], got["exact_weight_memory_vs_bert_fp32"]["met"]) == (
        0.1, True)
    # no int16 row in this run (a CPU without AVX2, or --rows): not measured, neither met nor missed
    calibrated = got["calibrated_fast_time_vs_best_peer"]
    assert (calibrated["against"], calibrated["ratio"], calibrated["met"]) == (PEER, None, None)


def test_goals_without_a_peer_or_memory_are_not_measured():
    lone = [{"key": FAST, "group": "sensimix", "ms_per_batch": 10.0, "ms_per_round": [10.0]}]
    assert best_peer(lone) is None and "ratio_vs_best_peer" not in lone[0]
    got = goals(lone, None, [Goal("g", FAST, BEST_PEER, 0.75, "time"), Goal("m", FAST, "bert-fp32", 0.15, "memory")])
    assert [(g["against"], g["ratio"], g["met"]) for g in got] == [(BEST_PEER, None, None), ("bert-fp32", None, None)]


def test_gpu_goals_judge_the_a8_graph_row_on_cuda_runs_only():
    # a CUDA run's rows, made up: the A8 (2+1) with graphs 0.5 ms per batch, the 3-layer fp16 peer 1 ms (0.5: met),
    # BERT fp32 20 ms (0.025: met), BERT fp16 2 ms (0.25: missed); the eager A8 row 0.8 ms (0.8: missed)
    def row(key: str, group: str, ms: float) -> dict:
        return {"key": key, "group": group, "ms_per_batch": ms, "ms_per_round": [ms]}

    made = [row("bert-fp32", "baseline", 20.0), row("bert-fp16", "peer", 2.0), row("bert3-fp16", "peer", 1.0),
            row("bert3-fp16-graphs", "peer", 0.7), row("sensimix-2+1-a8-fast-graphs", "sensimix", 0.5),
            row("sensimix-2+1-a8-fast", "sensimix", 0.8)]
    best = best_peer(made)
    assert best == "bert3-fp16-graphs"
    on_cuda = {g["id"]: (g["against"], g["ratio"], g["met"]) for g in goals(made, best, device="cuda:0")}
    assert on_cuda["gpu_a8_time_vs_3layer_fp16"] == ("bert3-fp16", 0.5, True)
    assert on_cuda["gpu_a8_time_vs_best_peer"] == ("bert3-fp16-graphs", pytest.approx(0.5 / 0.7), False)
    assert on_cuda["gpu_a8_time_vs_bert_fp32"] == ("bert-fp32", 0.025, True)
    assert on_cuda["gpu_a8_time_vs_bert_fp16"] == ("bert-fp16", 0.25, False)
    assert on_cuda["gpu_a8_eager_time_vs_3layer_fp16"] == ("bert3-fp16", 0.8, False)
    assert "a8_exact_time_vs_best_peer" not in on_cuda  # issue 24's CPU goal
    on_cpu = [g["id"] for g in goals(made, best, device="cpu")]
    assert "a8_exact_time_vs_best_peer" in on_cpu and not [g for g in on_cpu if g.startswith("gpu_")]
