"""Measuring ``fast``'s approximate 8-bit kernel on a saved folder and writing its record
(:mod:`sensimix.calibration_record` defines the record, its bar and how the loader reads it).

The examples (:func:`calibration_examples`): the longest train examples the model never saw when it was trained on a
subset, else the dev split; ``sensimix compress`` and ``sensimix calibrate`` choose the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import kernels
from .. import calibration_record as record

log = logging.getLogger(__name__)


def calibration_examples(task: str, glue_dir: str | os.PathLike | None, *, train_limit: int | None, seed: int,
                         hub: bool = False, count: int = record.MAX_EXAMPLES) -> tuple[Any, str, bool]:
    """(examples, what they are, whether they are held out of training) to calibrate a model of ``task`` trained
    on ``train_limit`` seeded train examples.

    The ``count`` longest train examples its training never saw (:meth:`~sensimix.data.Examples.held_out`),
    when at least :data:`~sensimix.calibration_record.MIN_EXAMPLES` are left; else (trained on the whole split, or nearly) the dev split.
    Held-out examples leave the dev split independent evidence: ``pytest acceptance`` and ``sensimix verify``
    judge ``fast`` against the exact path there, and a record measured on dev would only restate that check.

    Why the longest: rounding acts on every token, so the more tokens, the likelier a flipped prediction, and a
    train split of short phrases (SST-2's: 13 tokens on average) understates what longer inputs see. CI's (2+1),
    int16 against exact: 23 of 4,096 held-out predictions changed at random (0.56%), 57 of the 4,096 longest (39
    tokens: 1.39%), 12 of 872 on dev (25 tokens: 1.38%). The longest make a verdict err toward exact."""
    from ..data import load_glue

    if train_limit is not None:
        train = load_glue(task, "train", glue_dir, hub=hub)
        held = train.held_out(train_limit, seed, len(train))
        if len(held) >= record.MIN_EXAMPLES:
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
    from ..io import read_json
    from ..data import METRICS_FILE, TASKS, recorded_task, task_spec

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
    from ..inference import make_plan
    from ..measure import make_batches, run_inference

    model.prepare(make_plan("cpu", "fp32", index8_kernel=index8_kernel))  # the weights are read (and checked) once
    return run_inference(model, make_batches(inputs, batch_size=64), warmup_batches=0).predictions


def calibrate(folder: str | os.PathLike, inputs: dict[str, torch.Tensor], *, data: str,
              kernel: str = record.CANDIDATE, max_examples: int = record.MAX_EXAMPLES,
              min_examples: int | None = None) -> dict[str, Any] | None:
    """Measure ``kernel`` against the exact path on ``inputs`` (padded tensors with ``labels``; the first
    ``max_examples``) and write the record into ``folder``; None (nothing written) where this CPU cannot run it.
    Fewer than ``min_examples`` (default :data:`~sensimix.calibration_record.MIN_EXAMPLES`) inputs: ``ValueError``,
    nothing written."""
    from ..checkpoint import CHECKSUM_KEY, read_raw_config
    from ..inference import SensiMixForSequenceClassification
    from ..io import reserve_output, write_json

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
    n, min_examples = len(picked["input_ids"]), record.MIN_EXAMPLES if min_examples is None else min_examples
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
        result = {"schema": record.SCHEMA, "index8_kernel": kernel, "data": data, "checkpoint": raw[CHECKSUM_KEY],
                  **record.judge(exact, candidate, picked.get("labels"), min_examples=min_examples)}
        write_json(folder / record.RECORD, result)
    if result["passed"]:
        log.info("fast calibration: the %s kernel kept %d of %d %s predictions: precision fast uses it for %s",
                 kernel, result["equal"], result["examples"], data, folder)
    else:
        log.info("fast calibration: the %s kernel did not qualify on %s (%s): precision fast stays exact for %s",
                 kernel, data, result["reason"], folder)
    return result
