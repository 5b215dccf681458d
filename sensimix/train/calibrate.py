"""Measuring ``fast``'s approximate 8-bit kernel on a saved folder and writing its record
(:mod:`sensimix.calibration_record` defines the record, its bar and how the loader reads it).

The examples (:func:`calibration_examples`): the longest train examples the model never saw when it was trained on a
subset of the very train split given (its training_metrics.json identifies it: :mod:`sensimix.train.provenance`),
else the dev split; ``sensimix compress`` and ``sensimix calibrate`` choose the same way.
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


def calibration_examples(task: str, glue_dir: str | os.PathLike | None, *, trained: dict[str, Any] | None,
                         hub: bool = False, count: int = record.MAX_EXAMPLES, held_out_only: bool = False,
                         model: str | os.PathLike = "the model") -> tuple[Any, str, bool]:
    """(examples, what they are, whether they are held out of training) to calibrate ``model`` of ``task``, which
    was trained as ``trained`` says (:func:`trained_on`).

    The ``count`` longest train examples its training never saw (:meth:`~sensimix.data.Examples.held_out`, less
    those whose texts it trained on under another row), when the train split given is the one it was trained on
    (:func:`sensimix.train.provenance.differs`) and at least :data:`~sensimix.calibration_record.MIN_EXAMPLES` are
    left; else the dev split (logged with the reason), or with ``held_out_only`` a ``ValueError`` naming it.
    Held-out examples leave the dev split independent evidence: ``pytest acceptance`` and ``sensimix verify``
    judge ``fast`` against the exact path there, and a record measured on dev would only restate that check.

    Why the longest: rounding acts on every token, so the more tokens, the likelier a flipped prediction, and a
    train split of short phrases (SST-2's: 13 tokens on average) understates what longer inputs see. CI's (2+1),
    int16 against exact: 23 of 4,096 held-out predictions changed at random (0.56%), 56-57 of the 4,096 longest (39
    tokens: 1.37-1.39%, two measurements), 12 of 872 on dev (25 tokens: 1.38%). The longest make a verdict err
    toward exact."""
    from ..data import load_glue
    from . import provenance

    def on_dev(reason: str, quiet: bool = False, fix: str = "") -> tuple[Any, str, bool]:
        if held_out_only:
            raise ValueError(f"{reason}: {fix}use --split dev")
        (log.info if quiet else log.warning)("fast calibration on %s dev: %s", task, reason)
        return load_glue(task, "dev", glue_dir, hub=hub), f"{task} dev", False

    if trained is None or trained.get("train_limit") is None:
        return on_dev(f"{model} was not trained on a subset of {task} train leaving {record.MIN_EXAMPLES} examples "
                      f"out (its training_metrics.json; compress --train-limit)", quiet=True)
    if trained.get("legacy"):
        return on_dev(f"{model}'s training_metrics.json records a seeded subset of {task} train (train_limit "
                      f"{trained['train_limit']}, seed {trained['seed']}) but not which train data it was drawn from "
                      f"(written before {provenance.FIELD} was recorded), so no example can be shown to be held out "
                      f"of its training")
    train = load_glue(task, "train", glue_dir, hub=hub)
    problem = provenance.differs(trained, train)
    if problem:
        return on_dev(f"the {task} train split given is not the one {model} was trained on ({trained['source']}): "
                      f"{problem}, so the examples its training left out cannot be told apart here",
                      fix="give the --glue-dir it was trained with, or ")
    seen = provenance.trained_texts(trained, train)
    held = train.held_out(trained["train_limit"], trained["seed"], len(train))
    unseen = [i for i in range(len(held)) if held.inputs(i) not in seen]  # a repeat of a trained text was seen
    repeats, held = len(held) - len(unseen), held.select(unseen)
    if len(held) < record.MIN_EXAMPLES:
        return on_dev(f"training saw all but {len(held)} of the {len(train)} train examples", quiet=True)
    longest = held.longest(count)
    what = f"{len(held)} examples held out of training (seed {trained['seed']}"
    what += f"; {repeats} repeating a trained text left out)" if repeats else ")"
    if len(longest) < len(held):
        what = f"the {len(longest)} longest of {what}"
    return longest, f"{task} train: {what}", True


def trained_on(folder: str | os.PathLike, task: str) -> dict[str, Any] | None:
    """What ``folder``'s training_metrics.json says it was trained on for ``task``: its ``train_data`` record
    (:mod:`sensimix.train.provenance`); None where it records no training on that task's train split.

    A folder written before ``train_data`` was recorded that says it trained on a seeded subset (``settings``'
    ``train_limit`` and ``seed``) gets ``{"legacy": True, "train_limit": ..., "seed": ...}``: the subset cannot be
    tied to a file, so :func:`calibration_examples` calibrates it on dev (``--split held-out`` is refused)."""
    from ..io import read_json
    from ..data import METRICS_FILE, TASKS, recorded_task, task_spec
    from . import provenance

    path = Path(folder) / METRICS_FILE
    fix = "it says which train examples the model never saw: calibrate with --split dev instead"
    try:
        metrics = read_json(path, what="training metrics") if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{exc}; {fix}") from exc
    trained = recorded_task(metrics)
    try:
        same_task = trained is not None and TASKS[trained].name == task_spec(task).name
    except ValueError:  # a task name this version does not know
        same_task = False
    if not isinstance(metrics, dict) or not same_task:
        return None
    if provenance.FIELD in metrics:
        problem = provenance.record_problem(metrics[provenance.FIELD])
        if problem:
            raise ValueError(f"{path}: {problem}; {fix}")
        return metrics[provenance.FIELD]
    settings = metrics.get("settings")
    if not isinstance(settings, dict) or settings.get("train_limit") is None:
        return None
    limit, seed = settings.get("train_limit"), settings.get("seed", 42)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1 or \
            not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path} records train_limit={limit!r}, seed={seed!r}: not a training subset; calibrate "
                         f"with --split dev")
    return {"legacy": True, "train_limit": limit, "seed": seed}


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
        if raw.get("activation_quant") is not None:
            raise ValueError(f"{folder} is an A8 checkpoint (8-bit activations trained in): its fast plan is its "
                             f"exact integer kernels already, so there is nothing to calibrate")
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
