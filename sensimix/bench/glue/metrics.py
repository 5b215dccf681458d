"""The GLUE metrics as the GLUE benchmark reports them, from predictions and labels (plain Python: no torch, no
sklearn): accuracy (SST-2, RTE), accuracy and F1 of the positive class (MRPC), Matthews correlation (CoLA)."""

from __future__ import annotations

import math
from collections.abc import Sequence

# the GLUE metrics of each task, the first one the task's headline (what the chart plots); accuracy is recorded for
# every task besides (CoLA's is not a GLUE figure: its classes are 70/30)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sst-2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "rte": ("accuracy",),
    "cola": ("mcc",),
}
METRIC_TITLES = {"accuracy": "accuracy", "f1": "F1", "mcc": "Matthews corr."}


def confusion(predictions: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with class 1 as the positive class (MRPC: paraphrase; CoLA: acceptable)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")
    tp = fp = fn = tn = 0
    for p, y in zip(predictions, labels):
        if p not in (0, 1) or y not in (0, 1):
            raise ValueError(f"binary tasks only: got prediction {p!r}, label {y!r}")
        tp += p == 1 and y == 1
        fp += p == 1 and y == 0
        fn += p == 0 and y == 1
        tn += p == 0 and y == 0
    return tp, fp, fn, tn


def accuracy(tp: int, fp: int, fn: int, tn: int) -> float:
    return (tp + tn) / (tp + fp + fn + tn)


def f1(tp: int, fp: int, fn: int, tn: int) -> float:
    """F1 of the positive class; 0 when it is never predicted nor present (sklearn's zero_division=0)."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def mcc(tp: int, fp: int, fn: int, tn: int) -> float:
    """Matthews correlation; 0 when a row or column of the confusion matrix is empty (one class predicted or
    present only: no correlation measurable, sklearn's convention)."""
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def glue_metrics(task: str, predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The task's GLUE metrics (fractions, not points) plus ``accuracy``."""
    if task not in TASK_METRICS:
        raise ValueError(f"no GLUE metric for task {task!r}; known: {', '.join(TASK_METRICS)}")
    cm = confusion(predictions, labels)
    scores = {"accuracy": accuracy(*cm), "f1": f1(*cm), "mcc": mcc(*cm)}
    return {name: scores[name] for name in dict.fromkeys((*TASK_METRICS[task], "accuracy"))}
