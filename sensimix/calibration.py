"""``fast``'s per-checkpoint calibration: an approximate kernel is used only where it was measured to keep this
model's predictions.

Rounding the activations of the 8-bit linears (the ``int16`` kernel: 15-bit integers per row) keeps every
prediction of some trained models and changes 1.4% of another's (:func:`sensimix.inference.plan.fast_index8_kernel`
has the table); nothing in a checkpoint tells them apart before their predictions are measured. So they are
measured: :func:`calibrate` runs a saved folder on labelled examples with the exact path and with the candidate
kernel, and writes ``fast_calibration.json`` beside the weights::

    {"schema": "sensimix-fast-calibration/1", "index8_kernel": "int16", "passed": true,
     "examples": 4096, "equal": 4093, "exact_accuracy": 0.8203, "candidate_accuracy": 0.8206,
     "data": "sst-2 train: the 4096 longest of 65349 examples held out of training (seed 42)", ...}

The examples (:func:`calibration_examples`): the longest train examples the model never saw when it was trained on a
subset, else the dev split; ``sensimix compress`` and ``sensimix calibrate`` choose the same way.

It passes with at least :data:`MIN_EXAMPLES` examples, >= 99.5% of the predictions equal and the accuracies
within 0.3 points (the bar of ``pytest acceptance``'s ``fast_agreement``). ``precision="fast"`` then takes the
recorded kernel where the device runs it (:func:`calibrated_index8_kernel`), and the exact path otherwise: with no
record, a failed one, a record of other weights (its checksum differs from config.json's), or one that cannot be
read (logged). Writing a folder anew (``compress``, ``save_pretrained``) drops the old record
(:data:`sensimix.checkpoint._NOT_CARRIED`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import kernels

log = logging.getLogger(__name__)

RECORD = "fast_calibration.json"
SCHEMA = "sensimix-fast-calibration/1"
CANDIDATE = "int16"        # the approximate 8-bit kernel fast may take (CPU, AVX2)
MIN_EXAMPLES = 200         # fewer say too little about a model's margins
MAX_EXAMPLES = 4096        # enough to judge 99.5% (20 changes allowed); caps the time on large dev splits


def judge(exact: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor | None, *,
          min_examples: int | None = None) -> dict[str, Any]:
    """The verdict on two prediction vectors: counts, accuracies, ``passed`` and, when not, ``reason``."""
    from .vv.procedure import FAST_ACCURACY_DELTA, FAST_AGREEMENT

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
    from .vv.procedure import FAST_ACCURACY_DELTA, FAST_AGREEMENT

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


def calibration_examples(task: str, glue_dir: str | os.PathLike | None, *, train_limit: int | None, seed: int,
                         hub: bool = False, count: int = MAX_EXAMPLES) -> tuple[Any, str, bool]:
    """(examples, what they are, whether they are held out of training) to calibrate a model of ``task`` trained
    on ``train_limit`` seeded train examples.

    The ``count`` longest train examples its training never saw (:meth:`~sensimix.train.data.Examples.held_out`),
    when at least :data:`MIN_EXAMPLES` are left; else (trained on the whole split, or nearly) the dev split.
    Held-out examples leave the dev split independent evidence: ``pytest acceptance`` and ``sensimix verify``
    judge ``fast`` against the exact path there, and a record measured on dev would only restate that check.

    Why the longest: rounding acts on every token, so the more tokens, the likelier a flipped prediction, and a
    train split of short phrases (SST-2's: 13 tokens on average) understates what longer inputs see. CI's (2+1),
    int16 against exact: 23 of 4,096 held-out predictions changed at random (0.56%), 57 of the 4,096 longest (39
    tokens: 1.39%), 12 of 872 on dev (25 tokens: 1.38%). The longest make a verdict err toward exact."""
    from .train.data import load_glue

    if train_limit is not None:
        train = load_glue(task, "train", glue_dir, hub=hub)
        held = train.held_out(train_limit, seed, len(train))
        if len(held) >= MIN_EXAMPLES:
            longest = held.longest(count)
            what = f"{len(held)} examples held out of training (seed {seed})"
            if len(longest) < len(held):
                what = f"the {len(longest)} longest of {what}"
            return longest, f"{task} train: {what}", True
        log.info("fast calibration on %s dev: training used all but %d of the %d train examples", task, len(held),
                 len(train))
    return load_glue(task, "dev", glue_dir, hub=hub), f"{task} dev", False


def training_subset(folder: str | os.PathLike, task: str) -> tuple[int | None, int]:
    """(train_limit, seed) with which ``sensimix compress`` trained ``folder`` on ``task``, from its
    training_metrics.json; (None, 42) where it recorded no training on a subset of that task's train split."""
    from .io import read_json
    from .train.data import METRICS_FILE, TASKS, recorded_task, task_spec

    path = Path(folder) / METRICS_FILE
    try:
        metrics = read_json(path, what="training metrics") if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{exc}; it says which train examples the model never saw: calibrate with --split dev "
                         f"instead") from exc
    settings = metrics.get("settings") if isinstance(metrics, dict) else None
    trained = recorded_task(metrics)
    try:
        same_task = trained is not None and TASKS[trained].name == task_spec(task).name
    except ValueError:  # a task name this version does not know
        same_task = False
    if not isinstance(settings, dict) or not same_task:
        return None, 42
    limit, seed = settings.get("train_limit"), settings.get("seed", 42)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1) or \
            not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path} records train_limit={limit!r}, seed={seed!r}: not a training subset; calibrate "
                         f"with --split dev")
    return limit, seed


def _predictions(model: torch.nn.Module, inputs: dict[str, torch.Tensor], index8_kernel: str | None) -> torch.Tensor:
    """``model``'s predictions with its 8-bit linears on ``index8_kernel`` (None: the exact default), fp32, CPU."""
    from .inference import make_plan
    from .vv.measure import make_batches, run_inference

    model.prepare(make_plan("cpu", "fp32", index8_kernel=index8_kernel))  # the weights are read (and checked) once
    return run_inference(model, make_batches(inputs, batch_size=64), warmup_batches=0).predictions


def calibrate(folder: str | os.PathLike, inputs: dict[str, torch.Tensor], *, data: str,
              kernel: str = CANDIDATE, max_examples: int = MAX_EXAMPLES,
              min_examples: int | None = None) -> dict[str, Any] | None:
    """Measure ``kernel`` against the exact path on ``inputs`` (padded tensors with ``labels``; the first
    ``max_examples``) and write the record into ``folder``; None (nothing written) where this CPU cannot run it.
    Fewer than ``min_examples`` (default :data:`MIN_EXAMPLES`) inputs: ``ValueError``, nothing written."""
    from .checkpoint import CHECKSUM_KEY, read_raw_config
    from .inference import SensiMixForSequenceClassification
    from .io import reserve_output, write_json

    folder = Path(folder)
    if kernel not in kernels.INDEX8_KERNELS or kernels.INDEX8_KERNELS[kernel].exact:
        raise ValueError(f"{kernel!r} is not an approximate 8-bit kernel to calibrate; choose one of "
                         f"{', '.join(n for n, k in kernels.INDEX8_KERNELS.items() if not k.exact)}")
    reason = kernels.INDEX8_KERNELS[kernel].unavailable(torch.device("cpu"))
    if reason:
        log.info("fast calibration skipped: the %s kernel cannot run here (%s); fast stays exact", kernel, reason)
        return None
    picked = {k: v[:max_examples] for k, v in inputs.items()
              if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    n, min_examples = len(picked["input_ids"]), MIN_EXAMPLES if min_examples is None else min_examples
    if n < min_examples:  # the verdict is known: writing it could only replace a better-founded one
        raise ValueError(f"{data} holds {n} examples, fewer than the {min_examples} a verdict needs; nothing "
                         f"written: calibrate on a larger split")
    with reserve_output(folder):  # the weights cannot change under the measurement (compress holds it already)
        raw = read_raw_config(folder)
        if not isinstance(raw.get(CHECKSUM_KEY), dict):
            raise ValueError(f"{folder}/config.json has no {CHECKSUM_KEY} (written before checksums): re-export "
                             f"the folder before calibrating it")
        model = SensiMixForSequenceClassification.from_pretrained(folder)
        exact = _predictions(model, picked, None)
        candidate = _predictions(model, picked, kernel)
        record = {"schema": SCHEMA, "index8_kernel": kernel, "data": data, "checkpoint": raw[CHECKSUM_KEY],
                  **judge(exact, candidate, picked.get("labels"), min_examples=min_examples)}
        write_json(folder / RECORD, record)
    if record["passed"]:
        log.info("fast calibration: the %s kernel kept %d of %d %s predictions: precision fast uses it for %s",
                 kernel, record["equal"], record["examples"], data, folder)
    else:
        log.info("fast calibration: the %s kernel did not qualify on %s (%s): precision fast stays exact for %s",
                 kernel, data, record["reason"], folder)
    return record


def calibrated_index8_kernel(folder: str | os.PathLike, raw_config: dict[str, Any]) -> str | None:
    """The approximate 8-bit kernel a passed record of ``folder`` names for these weights, else None."""
    from .checkpoint import CHECKSUM_KEY
    from .io import read_json

    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path, what="a fast calibration record")
    except (OSError, ValueError) as exc:
        log.warning("%s ignored (fast runs the exact path): %s", path, exc)
        return None
    problem = None
    kernel = record.get("index8_kernel") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        problem = f"not a {SCHEMA} record"
    elif not isinstance(kernel, str) or kernel not in kernels.INDEX8_KERNELS or kernels.INDEX8_KERNELS[kernel].exact:
        problem = f"{str(kernel)[:40]!r} is not an approximate 8-bit kernel"
    elif not isinstance(raw_config.get(CHECKSUM_KEY), dict):
        problem = f"config.json has no {CHECKSUM_KEY} to tie it to these weights: re-export the folder, calibrate again"
    elif record.get("checkpoint") != raw_config.get(CHECKSUM_KEY):
        problem = "it was measured on other weights (its checksum differs from config.json's): calibrate again"
    elif not isinstance(record.get("passed"), bool):
        problem = f"its passed is {str(record.get('passed'))[:40]!r}, not true or false: calibrate again"
    elif record.get("passed") is True and not _counts_pass(record):
        problem = "it says passed, but its counts do not meet the bar: calibrate again"
    if problem:
        log.warning("%s ignored (fast runs the exact path): %s", path, problem)
        return None
    if record.get("passed") is not True:
        return None
    return kernel


def describe_record(folder: str | os.PathLike) -> str:
    """One line on ``folder``'s calibration record, for reports: its verdict, kernel, counts and data (what it
    says; whether ``fast`` takes it is :func:`calibrated_index8_kernel`'s, and the plan's, to say)."""
    from .io import read_json

    path = Path(folder) / RECORD
    if not path.is_file():
        return "no record"
    try:
        r = read_json(path, what="a fast calibration record")
        verdict = "passed" if r["passed"] is True else f"failed ({r.get('reason', 'no reason given')})"
        return f"{r['index8_kernel']} {verdict}: {r['equal']:,} of {r['examples']:,} predictions equal on {r['data']}"
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"unreadable record ({type(exc).__name__}: {str(exc)[:80]})"


def _counts_pass(record: dict[str, Any]) -> bool:
    """Whether a record's own counts meet the agreement and accuracy bar its ``passed`` claims (a hand-edited or
    damaged record may not; the examples' minimum is :func:`calibrate`'s to enforce, a caller may lower it)."""
    numbers = [record.get(k) for k in ("examples", "equal", "exact_accuracy", "candidate_accuracy")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return False
    n, equal, exact, candidate = numbers
    return 0 <= equal <= n and not _shortfalls(n, equal, exact, candidate, min_examples=1)
