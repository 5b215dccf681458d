"""Each measured figure judged against its threshold, and the report that gathers them."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from .accuracy import AccuracyReport, AccuracySettings
from .procedure import (
    BERT_FP16,
    BERT_FP32,
    CERTIFIED,
    FAST_ACCURACY_DELTA,
    FAST_AGREEMENT,
    FP16_TIME_THRESHOLD,
    SCHEMA,
    SENSIMIX,
    SIZE_THRESHOLD,
    TIME_THRESHOLD,
    TRIALS,
)
from .sizes import SizeReport
from .timing import TimingReport


@dataclass
class Criterion:
    """One acceptance criterion: ``value`` judged against ``threshold`` with ``comparison``.

    ``passed`` is None when the criterion was not measured (``reason`` says why); a skipped criterion neither
    passes nor fails the report. A criterion with ``gated`` False is judged and reported, but its failure does not
    fail the report (a goal, e.g. SensiMix vs BERT fp16, until a run asks to gate on it).
    """

    id: str
    title: str
    value: float | None
    threshold: float
    comparison: str                     # "<=" or ">="
    unit: str                           # "ratio" (a fraction, shown as %), "points", "accuracy"
    passed: bool | None
    certified: bool                     # part of KST-21-049, or added beyond it
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    gated: bool = True

    @classmethod
    def judge(cls, id: str, title: str, value: float, threshold: float, *, comparison: str = "<=",
              unit: str = "ratio", certified: bool = True, details: dict[str, Any] | None = None,
              gated: bool = True) -> Criterion:
        if comparison not in ("<=", ">="):
            raise ValueError(f"comparison must be '<=' or '>=', got {comparison!r}")
        if value != value:  # NaN can never pass
            passed = False
        else:
            passed = value <= threshold if comparison == "<=" else value >= threshold
        return cls(id, title, float(value), float(threshold), comparison, unit, passed, certified,
                   details=details or {}, gated=gated)

    @classmethod
    def skipped(cls, id: str, title: str, threshold: float, reason: str, *, comparison: str = "<=",
                unit: str = "ratio", certified: bool = True, gated: bool = True) -> Criterion:
        return cls(id, title, None, float(threshold), comparison, unit, None, certified, reason=reason, gated=gated)

    @property
    def status(self) -> str:
        status = {True: "Pass", False: "Fail", None: "Skipped"}[self.passed]
        return status if self.gated or self.passed is None else f"{status} (goal, not gated)"

    def format_value(self, value: float | None = None) -> str:
        v = self.value if value is None else value
        if v is None:
            return "-"
        if self.unit == "ratio":
            return f"{100 * v:.2f}%"
        if self.unit == "accuracy":
            return f"{100 * v:.2f}%"
        return f"{v:.2f} pt"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("passed")
        return d


def size_criterion(sizes: SizeReport | None, threshold: float = SIZE_THRESHOLD, reason: str | None = None
                   ) -> Criterion:
    model = sizes.sensimix_model if sizes and sizes.sensimix_model else "SensiMix"
    title = f"Compression ratio: {model} / BERT pytorch_model.bin"
    if sizes is None:
        return Criterion.skipped("compression_ratio", title, threshold, reason or "sizes were not measured")
    return Criterion.judge("compression_ratio", title, sizes.ratio, threshold,
                           details={"safetensors_ratio": sizes.safetensors_ratio,
                                    "sensimix_bytes": sizes.sensimix_bin, "bert_bytes": sizes.bert_bin})


def time_criterion(timing: TimingReport | None, threshold: float = TIME_THRESHOLD, reason: str | None = None
                   ) -> Criterion:
    trials = len(timing.trials) if timing else TRIALS
    title = f"Inference time ratio: SensiMix / BERT fp32, mean of {trials} trials"
    mean = timing.mean_ratio(SENSIMIX, BERT_FP32) if timing else None
    if mean is None:
        return Criterion.skipped("inference_time_ratio", title, threshold,
                                 reason or "BERT fp32 or SensiMix was not timed")
    return Criterion.judge("inference_time_ratio", title, mean, threshold,
                           details={"per_trial": timing.ratios(SENSIMIX, BERT_FP32), "device": timing.device})


def fp16_time_criterion(timing: TimingReport | None, threshold: float = FP16_TIME_THRESHOLD,
                        reason: str | None = None, *, gated: bool = False) -> Criterion:
    """SensiMix vs the fp16 BERT a GPU user deploys (transformers SDPA, padded): a goal reported beside the
    certified criteria; it fails the report only when ``gated`` (``--gate-fp16`` / ``--kotca-gate-fp16``)."""
    title = "Inference time ratio: SensiMix / BERT fp16 SDPA (beyond the certificate)"
    mean = timing.mean_ratio(SENSIMIX, BERT_FP16) if timing else None
    if mean is None:
        return Criterion.skipped("inference_time_ratio_fp16", title, threshold, certified=False, gated=gated,
                                 reason=reason or ("the fp16 BERT baseline is measured on CUDA only (fp16 GEMMs on "
                                                   "CPU are not what a CPU user deploys)"))
    return Criterion.judge("inference_time_ratio_fp16", title, mean, threshold, certified=False, gated=gated,
                           details={"per_trial": timing.ratios(SENSIMIX, BERT_FP16), "device": timing.device})


def accuracy_criteria(acc: AccuracyReport | None, *, max_gap: float, min_accuracy: float,
                      reason: str | None = None) -> list[Criterion]:
    split = acc.split if acc else AccuracySettings().split
    gap_title = f"Accuracy gap: fp32 reference - SensiMix ({split}), SST-2 dev (beyond the certificate)"
    floor_title = f"SensiMix ({split}) SST-2 dev accuracy, far above chance (beyond the certificate)"
    if acc is None:
        why = reason or "accuracy was not measured"
        return [Criterion.skipped("accuracy_gap", gap_title, max_gap, why, unit="points", certified=False),
                Criterion.skipped("sensimix_accuracy", floor_title, min_accuracy, why, comparison=">=",
                                  unit="accuracy", certified=False)]
    details = {"reference_accuracy": acc.reference_accuracy, "sensimix_accuracy": acc.sensimix_accuracy}
    return [Criterion.judge("accuracy_gap", gap_title, acc.gap_points, max_gap, unit="points", certified=False,
                            details=details),
            Criterion.judge("sensimix_accuracy", floor_title, acc.sensimix_accuracy, min_accuracy, comparison=">=",
                            unit="accuracy", certified=False, details=details)]


def agreement_criterion(acc: AccuracyReport | None, *, min_agreement: float = FAST_AGREEMENT,
                        max_delta: float = FAST_ACCURACY_DELTA, reason: str | None = None) -> Criterion:
    """The fast recipe vs the exact path on trained models: the lowest share of equal predictions must reach
    ``min_agreement`` and every accuracy difference stay within ``max_delta`` points."""
    title = (f"fast vs exact on trained SensiMix, SST-2 dev: predictions equal (>= {100 * min_agreement:.1f}%) and "
             f"accuracy within {max_delta} points (beyond the certificate)")
    if acc is None or not acc.agreements:
        return Criterion.skipped("fast_agreement", title, min_agreement, reason or "no trained model was evaluated",
                                 comparison=">=", unit="accuracy", certified=False)
    worst = min(a.agreement for a in acc.agreements)
    delta = max(a.accuracy_delta_points for a in acc.agreements)
    details = {"per_split": [dataclasses.asdict(a) | {"accuracy_delta_points": a.accuracy_delta_points}
                             for a in acc.agreements], "max_accuracy_delta_points": delta}
    c = Criterion.judge("fast_agreement", title, worst, min_agreement, comparison=">=", unit="accuracy",
                        certified=False, details=details)
    if delta > max_delta:
        c.passed = False
        c.reason = f"accuracy moved by {delta:.2f} points (> {max_delta})"
    return c


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    criteria: list[Criterion]
    environment: dict[str, Any]
    sizes: SizeReport | None = None
    timing: TimingReport | None = None
    accuracy: AccuracyReport | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def criterion(self, id: str) -> Criterion | None:
        return next((c for c in self.criteria if c.id == id), None)

    @property
    def failed(self) -> list[Criterion]:
        """Gated criteria that failed (a goal that missed is reported, not failed)."""
        return [c for c in self.criteria if c.passed is False and c.gated]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when no criterion failed (skipped ones do not count), 1 otherwise."""
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "passed": self.passed,
            "criteria": [c.to_dict() for c in self.criteria],
            "sizes": self.sizes.to_dict() if self.sizes else None,
            "timing": self.timing.to_dict() if self.timing else None,
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
            "environment": self.environment,
            "settings": self.settings,
            "certified": CERTIFIED,
        }

    def history_entry(self) -> dict[str, Any]:
        """One line of ``history.jsonl``: the judged figures of this run and where they were measured."""
        entry: dict[str, Any] = {"created": self.created, "passed": self.passed,
                                 "device": self.environment.get("device"),
                                 "device_name": self.environment.get("device_name"),
                                 "git_commit": self.environment.get("git_commit"),
                                 "git_dirty": self.environment.get("git_dirty")}
        for c in self.criteria:
            entry[c.id] = c.value
        if self.timing:
            entry.update(data=self.timing.data, num_examples=self.timing.num_examples)
        return entry


