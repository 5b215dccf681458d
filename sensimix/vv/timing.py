"""Criterion 2 -- inference time: the certified timing trials, interleaved, and their bookkeeping."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..measure import InferenceResult, make_batches, run_inference, synthetic_inputs, task_inputs
from .procedure import (
    BATCH_SIZE,
    BERT_FP16,
    BERT_FP32,
    CERTIFIED_EXAMPLES,
    MAX_SEQ_LENGTH,
    QNLI_DEV_SHA256,
    SENSIMIX,
    TRIALS,
)

log = logging.getLogger(__name__)


def timing_inputs(tokenizer: Any, *, glue_dir: str | os.PathLike | None = None, num_examples: int,
                  batch_size: int = BATCH_SIZE, max_seq_length: int = MAX_SEQ_LENGTH, device: str = "cpu",
                  seed: int = 0, hub: bool = False, vocab_size: int = 30522,
                  packing: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Batches for the timing trials and a label saying what they are.

    QNLI dev (5,463 pairs, padded to ``max_seq_length``), cycled to ``num_examples``, when ``glue_dir`` (or
    ``$GLUE_DIR``) holds ``QNLI/dev.tsv``; otherwise synthetic QNLI-shaped pairs (random ids, lengths uniform up
    to ``max_seq_length``, padded to it): cost depends on shapes and padding, not on the ids, so times (not
    accuracies) compare. With ``hub`` and no local folder, QNLI dev comes from the hub (online users only).
    """
    from ..data import resolve_glue_dir

    root = resolve_glue_dir(glue_dir)
    local = root is not None and (root / "QNLI" / "dev.tsv").is_file()
    if local or (root is None and hub):
        inputs = task_inputs("qnli", tokenizer, glue_dir=root, split="dev", max_seq_length=max_seq_length, hub=hub)
        n = len(inputs["labels"])
        source = "QNLI dev" if local else "QNLI dev from the hub, nyu-mll/glue"
        digest = hashlib.sha256((root / "QNLI" / "dev.tsv").read_bytes()).hexdigest() if local else None
        mark = "" if digest in (None, QNLI_DEV_SHA256) else f", NOT GLUE's file: sha256 {digest[:16]}"
        label = f"{source} ({n:,} examples{', cycled' if num_examples > n else ''}{mark})"
    else:
        why = "no GLUE folder given" if root is None else f"no QNLI/dev.tsv in {root}"
        inputs = synthetic_inputs(num_examples, max_seq_length=max_seq_length, vocab_size=vocab_size, seed=seed)
        label = f"synthetic QNLI-shaped batches ({why}; accuracies are meaningless)"
    batches = make_batches(inputs, batch_size=batch_size, num_examples=num_examples, device=device, packing=packing)
    return batches, label


class ModelTimer:
    """Times one model over fixed batches, one trial per call; warms up once, before its first trial.

    Each trial is one :func:`run_inference` pass (model work only, inputs already on the device, device
    synchronized, warm-up excluded).
    """

    def __init__(self, name: str, model: torch.nn.Module, batches: Sequence[dict[str, Any]], *,
                 device: str, warmup_batches: int = 1, precision: str = "") -> None:
        self.name, self.model, self.batches, self.device, self.precision = name, model, batches, device, precision
        self.ran = describe_model(model)  # kept for the report after the model is released
        self.warmup_batches = warmup_batches
        self.results: list[InferenceResult] = []
        self._warm = False

    def warm_up(self) -> None:
        """Run ``warmup_batches`` untimed batches the first time only (pytest-benchmark ``setup`` hook)."""
        if not self._warm and self.warmup_batches > 0:
            log.info("%s: warm-up (%d batch(es), not timed)", self.name, self.warmup_batches)
            run_inference(self.model, list(self.batches[: self.warmup_batches]), warmup_batches=0, device=self.device)
        self._warm = True

    def trial(self) -> InferenceResult:
        self.warm_up()
        result = run_inference(self.model, list(self.batches), warmup_batches=0, device=self.device)
        self.results.append(result)
        acc = "n/a" if result.accuracy is None else f"{result.accuracy:.3f}"
        log.info("%s trial %d: Num examples = %d, Batch size = %d, duration: %.0f ms, acc = %s", self.name,
                 len(self.results), result.num_examples, result.batch_size, result.duration_ms, acc)
        return result

    @property
    def durations_ms(self) -> list[float]:
        return [float(r.duration_ms) for r in self.results]

    @property
    def accuracy(self) -> float | None:
        return self.results[-1].accuracy if self.results else None


@dataclass
class TimingReport:
    """Per-trial inference times (ms) of each model over the same batches, on one device, in one run."""

    device: str
    data: str
    num_examples: int
    batch_size: int
    max_seq_length: int
    warmup_batches: int
    trials: list[dict[str, float]]               # [{"bert-fp32": ms, "sensimix": ms, ...}, ...]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)  # {"bert-fp32": "fp32", "sensimix": "fp16", ...}
    ran: dict[str, str] = field(default_factory=dict)  # what each model ran: class, dtype, SensiMix's kernels

    def deviations(self) -> list[str]:
        """How this workload differs from the certified one (a ratio measured on less is a noisier figure)."""
        certified = (("examples per trial", self.num_examples, CERTIFIED_EXAMPLES),
                     ("trials", len(self.trials), TRIALS), ("batch size", self.batch_size, BATCH_SIZE),
                     ("max_seq_length", self.max_seq_length, MAX_SEQ_LENGTH))
        out = [f"{what} {value:,} (certified {want:,})" for what, value, want in certified if value != want]
        if not self.data.startswith("QNLI dev"):
            out.append("synthetic batches (certified: QNLI)")
        elif "NOT GLUE's file" in self.data:
            out.append("a QNLI dev.tsv other than GLUE's (its sha256 differs)")
        return out

    @classmethod
    def from_timers(cls, timers: Iterable[ModelTimer], **fields: Any) -> TimingReport:
        timers = [t for t in timers if t.results]
        n = min((len(t.results) for t in timers), default=0)
        trials = [{t.name: t.durations_ms[i] for t in timers} for i in range(n)]
        return cls(trials=trials, accuracy={t.name: t.accuracy for t in timers},
                   precisions={t.name: t.precision for t in timers if t.precision},
                   ran={t.name: t.ran for t in timers}, **fields)

    @property
    def models(self) -> list[str]:
        return list(self.trials[0]) if self.trials else []

    def ratios(self, model: str = SENSIMIX, baseline: str = BERT_FP32) -> list[float]:
        return [t[model] / t[baseline] for t in self.trials if model in t and baseline in t]

    def mean_ratio(self, model: str = SENSIMIX, baseline: str = BERT_FP32) -> float | None:
        r = self.ratios(model, baseline)
        return statistics.fmean(r) if r else None  # the certified figure: mean of per-trial ratios

    def median_ms(self, model: str) -> float:
        return statistics.median(t[model] for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratios"] = {f"{SENSIMIX}/{b}": self.ratios(SENSIMIX, b) for b in (BERT_FP32, BERT_FP16)
                       if self.ratios(SENSIMIX, b)}
        d["mean_ratio"] = self.mean_ratio()
        d["mean_ratio_fp16"] = self.mean_ratio(SENSIMIX, BERT_FP16)
        d["deviations_from_certified"] = self.deviations()
        return d


def describe_model(model: Any) -> str:
    """What a timed model runs: a packed SensiMix's plan (precision and kernels), else its class and dtype."""
    plan = getattr(model, "plan", None)
    if plan is not None and hasattr(plan, "describe"):
        return plan.describe()
    dtype = next((p.dtype for p in model.parameters()), None) if hasattr(model, "parameters") else None
    return f"{type(model).__name__}" + (f" ({str(dtype).removeprefix('torch.')})" if dtype is not None else "")


def time_models(models: Mapping[str, torch.nn.Module], batches: Sequence[dict[str, Any]], *,
                trials: int = TRIALS, device: str = "cpu", warmup_batches: int = 1, data: str = "",
                max_seq_length: int = MAX_SEQ_LENGTH, precisions: Mapping[str, str] | None = None,
                progress: bool = True, timers: Sequence[ModelTimer] | None = None) -> TimingReport:
    """``trials`` timing trials; within a trial the models run one after another (interleaved), so a slow
    drift of the machine (other jobs, clocks) hits every model of a trial alike and cancels in the ratio.
    ``timers`` (instead of ``models``) reuses timers that may already be warm."""
    from tqdm.auto import tqdm

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    precisions = precisions or {}
    timers = list(timers) if timers is not None else [
        ModelTimer(name, m, batches, device=device, warmup_batches=warmup_batches, precision=precisions.get(name, ""))
        for name, m in models.items()]
    for t in timers:
        t.warm_up()
    steps = tqdm(total=trials * len(timers), desc="timing trials", unit="run", disable=not progress)
    for i in range(trials):
        for t in timers:
            steps.set_postfix_str(f"trial {i + 1}/{trials}: {t.name}")
            t.trial()
            steps.update()
    steps.close()
    num_examples = sum(len(b["input_ids"]) for b in batches)
    batch_size = len(batches[0]["input_ids"]) if batches else 0
    return TimingReport.from_timers(timers, device=device, data=data, num_examples=num_examples,
                                    batch_size=batch_size, max_seq_length=max_seq_length,
                                    warmup_batches=warmup_batches)
