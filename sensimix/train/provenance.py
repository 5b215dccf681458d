"""What identifies the data a model was trained on, and the check that data given later is that data.

``sensimix compress`` and ``sensimix finetune`` record it in the folder's training_metrics.json as ``train_data``::

    {"schema": "sensimix-train-data/1", "task": "sst-2", "source": "/data/glue/SST-2/train.tsv",
     "sha256": "<the file's bytes>", "examples": 67349, "examples_sha256": "<the examples read from it, in order>",
     "train_limit": 2000, "seed": 42, "trained": 2000, "trained_sha256": "<the rows trained on, in draw order>"}

A seeded subset (``train_limit`` + ``seed``) names rows only together with the data it was drawn from: the same
seed over a copy of the file in another order, or with rows added, draws other examples. So before any example is
called "held out of training" (:func:`sensimix.train.calibrate.calibration_examples`), the train split given then
must be the recorded one -- the same examples in the same order (``examples_sha256``: the texts and labels as read,
so a copy with other line endings still matches, and hub data is checked the same way) -- and this numpy must draw
the same rows from it (``trained_sha256``). ``sha256`` (the file's bytes; none for hub data) is there for people
(``sha256sum``). Folders written before this record: see :func:`trained_on`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..data import Examples, load_glue, resolve_glue_dir, task_file, task_spec, tokenize
from ..io import file_sha256

SCHEMA = "sensimix-train-data/1"
FIELD = "train_data"  # its key in training_metrics.json


def examples_digest(examples: Examples) -> str:
    """SHA-256 of the examples as read (texts and label of each, in order): what the training drew its rows from."""
    h = hashlib.sha256()
    for i in range(len(examples)):
        h.update(json.dumps([*examples.inputs(i), examples.labels[i]], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def rows_digest(rows: list[int]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()



def _trained_rows(train: Examples, train_limit: int | None, seed: int) -> list[int]:
    """The rows a job trains on: a seeded subset when ``train_limit`` is smaller than the split, else all of it."""
    if train_limit is not None and train_limit < len(train):
        return train.subset_rows(train_limit, seed)
    return list(range(len(train)))


def training_examples(task: str, glue_dir: str | os.PathLike | None, *, train_limit: int | None, seed: int,
                      hub: bool = False) -> tuple[Examples, dict[str, Any]]:
    """The train examples a job trains on and the ``train_data`` record that identifies them."""
    train = load_glue(task, "train", glue_dir, hub=hub)
    rows = _trained_rows(train, train_limit, seed)
    root = resolve_glue_dir(glue_dir)
    record: dict[str, Any] = {"schema": SCHEMA, "task": task}
    if root is not None:
        path = task_file(task, "train", root).resolve()
        record.update(source=str(path), sha256=file_sha256(path))
    else:  # no file: the examples' digest identifies the hub's copy (its revision is not reported)
        record.update(source=f"the hub's nyu-mll/glue ({task_spec(task).hub_config}, train split)", sha256=None)
    record.update(examples=len(train), examples_sha256=examples_digest(train), train_limit=train_limit, seed=seed,
                  trained=len(rows), trained_sha256=rows_digest(rows))
    return train.select(rows), record


def task_data(task: str, tokenizer: Any, glue_dir: str | os.PathLike | None, *, max_seq_length: int = 128,
              train_limit: int | None = None, eval_limit: int | None = None, seed: int = 42,
              hub: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenized (train, dev) sets of ``task`` and the ``train_data`` record of the train set (``train_limit``: a
    seeded random subset of train)."""
    train, record = training_examples(task, glue_dir, train_limit=train_limit, seed=seed, hub=hub)
    dev = load_glue(task, "dev", glue_dir, hub=hub, limit=eval_limit)
    return tokenize(train, tokenizer, max_seq_length), tokenize(dev, tokenizer, max_seq_length), record


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def record_problem(record: Any) -> str | None:
    """What makes a parsed ``train_data`` record other than what :func:`training_examples` writes, or None."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return f"its {FIELD} is not a {SCHEMA} record"
    limit = record.get("train_limit")
    if not (isinstance(record.get("source"), str) and _count(record.get("examples"), 1)
            and _count(record.get("trained"), 1) and record["trained"] <= record["examples"]
            and _digest(record.get("examples_sha256")) and _digest(record.get("trained_sha256"))
            and _count(record.get("seed"), 0) and (limit is None or _count(limit, 1))):
        return f"its {FIELD} fields are not those compress writes (counts, digests, seed)"
    return None


def differs(record: dict[str, Any], train: Examples) -> str | None:
    """How ``train`` (the split given now) is not the data ``record`` says was trained on, or None when it is."""
    if len(train) != record["examples"]:
        return f"it holds {len(train):,} examples, the training's {record['examples']:,}"
    if examples_digest(train) != record["examples_sha256"]:
        return f"its {len(train):,} examples are not the training's (another order, or other text or labels)"
    if rows_digest(_trained_rows(train, record["train_limit"], record["seed"])) != record["trained_sha256"]:
        return f"this numpy draws other rows for seed {record['seed']} than the training's did"
    return None


def trained_texts(record: dict[str, Any], train: Examples) -> set[tuple[str, str | None]]:
    """The inputs (texts) of the examples ``record`` trained on, in ``train`` (checked with :func:`differs`)."""
    return {train.inputs(i) for i in _trained_rows(train, record["train_limit"], record["seed"])}
