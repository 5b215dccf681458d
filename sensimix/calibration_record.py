"""What a packed folder holds about its own ``fast`` calibration: ``fast_calibration.json``'s name, schema,
validation and verdict. The measuring that writes it lives with training (:mod:`sensimix.train.calibrate`); this
module only reads and judges, so the loader (:mod:`sensimix.inference.plan`) and the reports can use it without
importing anything that measures.

Why a record exists: rounding the activations of the 8-bit linears (the ``int16`` kernel: 15-bit integers per row)
keeps every prediction of some trained models and changes 1.4% of another's (:func:`sensimix.inference.plan.
fast_index8_kernel` has the table); nothing in a checkpoint tells them apart before their predictions are measured.
:func:`sensimix.train.calibrate.calibrate` measures them and writes::

    {"schema": "sensimix-fast-calibration/1", "index8_kernel": "int16", "passed": true,
     "examples": 4096, "equal": 4093, "exact_accuracy": 0.8203, "candidate_accuracy": 0.8206,
     "data": "sst-2 train: the 4096 longest of 65349 examples held out of training (seed 42)", ...}

It passes with at least :data:`MIN_EXAMPLES` examples, >= :data:`FAST_AGREEMENT` of the predictions equal and the
accuracies within :data:`FAST_ACCURACY_DELTA` points (the bar of ``pytest acceptance``'s ``fast_agreement``).
``precision="fast"`` then takes the recorded kernel where the device runs it (:func:`calibrated_index8_kernel`), and
the exact path otherwise: with no record, a failed one, a record of other weights (its checksum differs from
config.json's), or one that cannot be read or whose fields are not what a measurement writes (logged). Writing a
folder anew (``compress``, ``save_pretrained``) drops the old record (:data:`sensimix.checkpoint.NOT_CARRIED`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from . import kernels
from .io import read_json

log = logging.getLogger(__name__)

RECORD = "fast_calibration.json"
SCHEMA = "sensimix-fast-calibration/1"
CANDIDATE = "int16"        # the approximate 8-bit kernel fast may take (CPU, AVX2)
MIN_EXAMPLES = 200         # fewer say too little about a model's margins
MAX_EXAMPLES = 4096        # enough to judge 99.5% (20 changes allowed); caps the time on large dev splits
FAST_AGREEMENT = 0.995     # fast vs exact: at least this fraction of predictions equal (also the V&V bar) ...
FAST_ACCURACY_DELTA = 0.3  # ... and their accuracies within this many points


def judge(exact: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor | None, *,
          min_examples: int | None = None) -> dict[str, Any]:
    """The verdict on two prediction vectors: counts, accuracies, ``passed`` and, when not, ``reason``."""
    n, equal = len(exact), int((exact == candidate).sum())
    out: dict[str, Any] = {"examples": n, "equal": equal, "agreement": equal / n if n else 0.0,
                           "min_agreement": FAST_AGREEMENT, "max_accuracy_delta_points": FAST_ACCURACY_DELTA}
    if labels is not None:
        out["exact_accuracy"] = float((exact == labels).double().mean())
        out["candidate_accuracy"] = float((candidate == labels).double().mean())
    reasons = _shortfalls(n, equal, out.get("exact_accuracy"), out.get("candidate_accuracy"),
                          MIN_EXAMPLES if min_examples is None else min_examples)
    out["passed"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def _shortfalls(n: int, equal: int, exact_accuracy: float | None, candidate_accuracy: float | None,
                min_examples: int) -> list[str]:
    """Where counts miss the bar (none: they pass); the one statement of it, for :func:`judge` and for
    checking a record's own counts. Accuracies None: no labels."""
    reasons = []
    agreement = equal / n if n else 0.0
    if n < min_examples:
        reasons.append(f"{n} examples (< {min_examples})")
    if agreement < FAST_AGREEMENT:
        reasons.append(f"{n - equal} of {n} predictions changed (agreement {100 * agreement:.2f}% < "
                       f"{100 * FAST_AGREEMENT:.1f}%)")
    if exact_accuracy is None or candidate_accuracy is None:
        reasons.append("no labels: the accuracy change cannot be measured")
    elif 100 * abs(candidate_accuracy - exact_accuracy) > FAST_ACCURACY_DELTA + 1e-9:
        reasons.append(f"accuracy {100 * exact_accuracy:.2f}% -> {100 * candidate_accuracy:.2f}% "
                       f"(> {FAST_ACCURACY_DELTA} points)")
    return reasons


def calibrated_index8_kernel(folder: str | os.PathLike, checksum: Any) -> str | None:
    """The approximate 8-bit kernel a passed, valid record of ``folder`` names for the weights whose
    ``sensimix_checksum`` (config.json's) is ``checksum``, else None (a record that cannot be trusted is logged)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path, what="a fast calibration record")
    except (OSError, ValueError) as exc:
        log.warning("%s ignored (fast runs the exact path): %s", path, exc)
        return None
    problem = record_problem(record, checksum)
    if problem:
        log.warning("%s ignored (fast runs the exact path): %s", path, problem)
        return None
    return record["index8_kernel"] if record["passed"] is True else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 <= value <= 1


def record_problem(record: Any, checksum: Any) -> str | None:
    """What makes ``record`` (a parsed fast_calibration.json) unfit to decide ``fast`` for the weights whose
    checksum is ``checksum``, or None. Every field a measurement writes is checked for its type and range (counts
    are integers, accuracies finite fractions: JSON's ``Infinity``, ``NaN`` or ``4096.5`` are not what
    :func:`sensimix.train.calibrate.calibrate` writes), and a record that says passed must meet the bar by its own
    counts."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return f"not a {SCHEMA} record"
    kernel = record.get("index8_kernel")
    if not isinstance(kernel, str) or kernel not in kernels.INDEX8_KERNELS or kernels.INDEX8_KERNELS[kernel].exact:
        return f"{str(kernel)[:40]!r} is not an approximate 8-bit kernel"
    if not isinstance(checksum, dict):
        return "config.json has no sensimix_checksum to tie it to these weights: re-export the folder, calibrate again"
    if record.get("checkpoint") != checksum:
        return "it was measured on other weights (its checksum differs from config.json's): calibrate again"
    if not isinstance(record.get("passed"), bool):
        return f"its passed is {str(record.get('passed'))[:40]!r}, not true or false: calibrate again"
    n, equal = record.get("examples"), record.get("equal")
    if not (_count(n) and _count(equal) and 0 <= equal <= n):
        return (f"its counts (examples {str(n)[:20]}, equal {str(equal)[:20]}) are not whole numbers with 0 <= "
                f"equal <= examples: calibrate again")
    accuracies = [record.get(k) for k in ("exact_accuracy", "candidate_accuracy")]
    if any(a is not None and not _fraction(a) for a in accuracies):
        return f"its accuracies {[str(a)[:20] for a in accuracies]} are not fractions in [0, 1]: calibrate again"
    if record["passed"] and _shortfalls(n, equal, *accuracies, min_examples=1):
        return "it says passed, but its counts do not meet the bar: calibrate again"
    return None


def describe_record(folder: str | os.PathLike) -> str:
    """One line on ``folder``'s calibration record, for reports: its verdict, kernel, counts and data (what it
    says; whether ``fast`` takes it is :func:`calibrated_index8_kernel`'s, and the plan's, to say)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return "no record"
    try:
        r = read_json(path, what="a fast calibration record")
        verdict = "passed" if r["passed"] is True else f"failed ({r.get('reason', 'no reason given')})"
        return f"{r['index8_kernel']} {verdict}: {r['equal']:,} of {r['examples']:,} predictions equal on {r['data']}"
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"unreadable record ({type(exc).__name__}: {str(exc)[:80]})"
