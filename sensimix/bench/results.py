"""The benchmark's arithmetic: per-row figures from the timed rounds, the best peer, and the goals (issues 10, 24).

Every ratio is taken within one run (the rounds interleave every model), so load from other processes hits all rows
alike: ``ratio_vs_bert_fp32`` is the median round of a row over the median round of the baseline, and
``ratio_per_round`` the same per round; ``ratio_vs_best_peer`` divides the median ms per batch by the fastest
peer's. The JSON keys here are those of ``sensimix-benchmark/2``: committed files under benchmarks/ read them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..vv import BERT_FP16, BERT_FP32
from .models import ModelSpec

SCHEMA = "sensimix-benchmark/2"
BEST_PEER = "best peer"  # a goal's `against`: the fastest peer row of the run
MEMORY_FIELDS = ("cuda_allocated_bytes", "weight_memory_bytes")  # what a memory goal compares, first found


@dataclass(frozen=True)
class Goal:
    """``model``'s time or weight memory (``what``) over that of ``against`` (a row key, or :data:`BEST_PEER`) is
    to be at most ``max_ratio``; ``only_on``: the device type whose runs judge it (None: every run)."""

    id: str
    model: str
    against: str
    max_ratio: float
    what: str  # time | memory
    only_on: str | None = None


# issue 10's goals. The benchmark's models are untrained, so their fast is exact; a trained checkpoint whose
# calibration passed (sensimix.calibration_record) runs fast on the int16 row's kernel: its goal is reported beside
# (CPU with AVX2 only)
GOALS = (Goal("fast_time_vs_best_peer", "sensimix-2+1-fast", BEST_PEER, 0.75, "time"),
         Goal("calibrated_fast_time_vs_best_peer", "sensimix-2+1-fp32-8bit-int16", BEST_PEER, 0.75, "time"),
         Goal("exact_time_vs_bert_fp32", "sensimix-2+1-fp32", BERT_FP32, 0.12, "time"),
         Goal("fast_weight_memory_vs_bert_fp32", "sensimix-2+1-fast", BERT_FP32, 0.15, "memory"),
         Goal("exact_weight_memory_vs_bert_fp32", "sensimix-2+1-fp32", BERT_FP32, 0.15, "memory"),
         # issue 24: the A8 (2+1)'s exact integer kernels against the best peer (on every CPU kind)
         Goal("a8_exact_time_vs_best_peer", "sensimix-2+1-a8-fp32", BEST_PEER, 0.6, "time", only_on="cpu"),
         # issues 24 and 26 on a GPU: the A8 (2+1) as a user deploys it (exact, CUDA graphs) against the 3-layer fp16
         # transformers BERT, the best GPU peer (CUDA graphs and torch.compile rows included), BERT-base fp32 and
         # fp16 SDPA on the run's batches (run the benchmark at 128 x 128, the certified shape, for the latter two:
         # scripts/gpu_check.py does); without graphs too, to show what the graphs buy
         Goal("gpu_a8_time_vs_3layer_fp16", "sensimix-2+1-a8-fast-graphs", "bert3-fp16", 0.6, "time", only_on="cuda"),
         Goal("gpu_a8_time_vs_best_peer", "sensimix-2+1-a8-fast-graphs", BEST_PEER, 0.6, "time", only_on="cuda"),
         Goal("gpu_a8_time_vs_bert_fp32", "sensimix-2+1-a8-fast-graphs", BERT_FP32, 0.03, "time", only_on="cuda"),
         Goal("gpu_a8_time_vs_bert_fp16", "sensimix-2+1-a8-fast-graphs", BERT_FP16, 0.20, "time", only_on="cuda"),
         Goal("gpu_a8_eager_time_vs_3layer_fp16", "sensimix-2+1-a8-fast", "bert3-fp16", 0.6, "time", only_on="cuda"))


def make_rows(specs: Sequence[ModelSpec], timers: Mapping[str, Any], trials: Sequence[Mapping[str, float]],
              n_batches: int, logits: Mapping[str, torch.Tensor], memory: Mapping[str, Mapping[str, Any]],
              device: str) -> list[dict[str, Any]]:
    """One JSON row per spec. ``trials``: ms per round by row key (every round runs ``n_batches``); ``timers``: by
    key, what timed each row (``.accuracy``, and ``.results[-1].predictions`` of the last round); ``logits``: each
    row's logits on the gap examples; ``memory``: :func:`sensimix.bench.memory.weight_memory`'s figures."""
    base = [t[BERT_FP32] for t in trials]
    mem_key = "cuda_allocated_bytes" if device.startswith("cuda") else "weight_memory_bytes"
    base_mem = memory.get(BERT_FP32, {}).get(mem_key)
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"key": spec.key, "name": spec.name, "group": spec.group, "runtime": spec.runtime,
                               "precision": spec.precision, "layers": spec.layers, "buckets": spec.buckets,
                               "reference": spec.reference}
        if spec.skip_padding is not None:
            row["skip_padding"] = spec.skip_padding
        if spec.skipped:
            rows.append({**row, "skipped": spec.skipped})
            continue
        per_round = [t[spec.key] / n_batches for t in trials]
        row.update(ms_per_batch=statistics.median(per_round), ms_per_round=per_round,
                   ratio_vs_bert_fp32=statistics.median(t[spec.key] for t in trials) / statistics.median(base),
                   ratio_per_round=[t[spec.key] / b for t, b in zip(trials, base)],
                   accuracy=timers[spec.key].accuracy)
        mem = memory.get(spec.key, {})
        row.update(mem)
        if base_mem and isinstance(mem.get(mem_key), int):
            row["weight_memory_ratio_vs_bert_fp32"] = mem[mem_key] / base_mem
        if spec.reference in logits:  # not when --rows left the reference out
            got, want = logits[spec.key], logits[spec.reference]
            preds, ref_preds = (timers[k].results[-1].predictions for k in (spec.key, spec.reference))
            gap = (got - want).abs().max().item()
            row.update(max_abs_logit_gap=gap, relative_logit_gap=gap / max(want.abs().max().item(), 1e-12),
                       prediction_agreement=(preds == ref_preds).double().mean().item())
        rows.append(row)
    return rows


def best_peer(rows: list[dict[str, Any]]) -> str | None:
    """The key of the fastest peer row (what a user deploys instead; the baseline counts), None when no peer was
    timed; every timed row gets its ratio to it (``ratio_vs_best_peer``, ``ratio_vs_best_peer_per_round``)."""
    peers = [r for r in rows if r["group"] in ("baseline", "peer") and "ms_per_batch" in r]
    if not peers:
        return None
    best = min(peers, key=lambda r: r["ms_per_batch"])
    for r in rows:
        if "ms_per_batch" in r:
            r["ratio_vs_best_peer"] = r["ms_per_batch"] / best["ms_per_batch"]
            r["ratio_vs_best_peer_per_round"] = [a / b for a, b in zip(r["ms_per_round"], best["ms_per_round"])]
    return best["key"]


def goals(rows: Sequence[Mapping[str, Any]], best: str | None, table: Sequence[Goal] = GOALS,
          device: str | None = None) -> list[dict[str, Any]]:
    """Each goal of ``table`` judged on this run's rows (informative: the V&V criteria are judged by `sensimix
    verify`); ``ratio`` and ``met`` are None where a row is missing or was not measured. ``device``: the run's
    device, whose type leaves out the goals of another one (None: every goal)."""
    by_key = {r["key"]: r for r in rows}
    kind = None if device is None else device.split(":")[0]
    out = []
    for goal in table:
        if kind is not None and goal.only_on not in (None, kind):
            continue
        row, ref = by_key.get(goal.model, {}), by_key.get(best if goal.against == BEST_PEER else goal.against, {})
        field = "ms_per_batch" if goal.what == "time" else next(
            (k for k in MEMORY_FIELDS if k in row and k in ref), None)
        value = row[field] / ref[field] if field and field in row and ref.get(field) else None
        met = None if value is None else value <= goal.max_ratio
        out.append({"id": goal.id, "model": goal.model, "against": ref.get("key", goal.against), "what": goal.what,
                    "max_ratio": goal.max_ratio, "ratio": value, "met": met})
    return out
