"""GLUE classification tasks from a local ``glue_data/<TASK>/{train,dev}.tsv`` folder, or from the hub online.

Local files are read with Python's csv module, tab-separated, quoting disabled (GLUE's TSVs hold unbalanced
quotes), strictly: a row with another number of fields than the header, a field over :data:`MAX_FIELD_BYTES`,
bytes that are not UTF-8 or an unknown label is an error naming the file and line. Every example becomes
``text_a`` (+ ``text_b`` for pair tasks) and an integer label. Nothing here needs the ``datasets`` package; only
``--hub-data`` (online users) imports it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GLUE_DIR_ENV = "GLUE_DIR"
MAX_FIELD_BYTES = 1 << 20  # a GLUE sentence is < 2 KB; a larger field is a broken file, not data


@dataclass(frozen=True)
class TaskSpec:
    name: str             # canonical folder name in glue_data/
    text_a: str           # column of the first sentence in the TSV
    text_b: str | None    # column of the second sentence (pair tasks)
    label: str            # label column
    labels: tuple[str, ...]  # label strings, in id order
    hub_config: str       # config name of the hub's "nyu-mll/glue" dataset
    header: bool = True
    columns: tuple[str, ...] | None = None  # names for header-less files


TASKS: dict[str, TaskSpec] = {
    "qnli": TaskSpec("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), "qnli"),
    "sst-2": TaskSpec("SST-2", "sentence", None, "label", ("0", "1"), "sst2"),
    "mrpc": TaskSpec("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), "mrpc"),
    "rte": TaskSpec("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), "rte"),
    "cola": TaskSpec("CoLA", "sentence", None, "label", ("0", "1"), "cola", header=False,
                     columns=("source", "label", "orig_label", "sentence")),
}
ALIASES = {"sst2": "sst-2", "sst": "sst-2"}
SPLITS = ("train", "dev")


@dataclass(frozen=True)
class Examples:
    """One split of a task in memory: parallel lists (``text_b`` None for single-sentence tasks)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: list[int]) -> Examples:
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Examples(pick(self.text_a), None if self.text_b is None else pick(self.text_b), pick(self.labels))

    def head(self, limit: int) -> Examples:
        return self.select(list(range(min(limit, len(self)))))

    def subset_rows(self, limit: int, seed: int) -> list[int]:
        """The rows of a seeded random subset of ``limit`` examples, in the order drawn (numpy's permutation, as
        ``datasets.shuffle`` draws it)."""
        import numpy as np

        return [int(i) for i in np.random.default_rng(seed).permutation(len(self))[:limit]]

    def shuffled_subset(self, limit: int, seed: int) -> Examples:
        """A seeded random subset of ``limit`` examples (:meth:`subset_rows`)."""
        return self.select(self.subset_rows(limit, seed))

    def inputs(self, i: int) -> tuple[str, str | None]:
        """The texts of example ``i``: what a model reads of it."""
        return self.text_a[i], None if self.text_b is None else self.text_b[i]

    def held_out(self, limit: int, seed: int, count: int) -> Examples:
        """Up to ``count`` examples that ``shuffled_subset(limit, seed)`` leaves out (the same permutation's next
        ones, in its order): a run that trained on that subset never saw them."""
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(self))[limit:limit + count]
        return self.select([int(i) for i in order])

    def longest(self, count: int) -> Examples:
        """The ``count`` examples with the most characters (both texts), in their order here."""
        size = [len(a) + (len(self.text_b[i]) if self.text_b is not None else 0) for i, a in enumerate(self.text_a)]
        keep = sorted(sorted(range(len(self)), key=lambda i: -size[i])[:count])
        return self.select(keep)


def task_spec(task: str) -> TaskSpec:
    key = ALIASES.get(str(task).lower(), str(task).lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
    return TASKS[key]


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """``glue_dir`` if given, else ``$GLUE_DIR``, else None. A given folder must exist."""
    value = glue_dir if glue_dir is not None else os.environ.get(GLUE_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--glue-dir" if glue_dir is not None else f"${GLUE_DIR_ENV}"
        raise FileNotFoundError(f"{source} points to {path}, which is not a folder (expected glue_data/<TASK>/...)")
    return path


def task_file(task: str, split: str, glue_dir: str | os.PathLike) -> Path:
    spec = task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = Path(glue_dir) / spec.name / f"{split}.tsv"
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (a folder?): expected the {spec.name} {split} split as a "
                         f"tab-separated file")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected the GLUE layout <glue-dir>/{spec.name}/{split}.tsv "
            f"(set --glue-dir or ${GLUE_DIR_ENV} to the folder that holds {spec.name}/)")
    return path


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (BOM dropped), decoding line by line so an error names its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                                 f"GLUE files are UTF-8 text") from exc


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    with _field_limit(MAX_FIELD_BYTES):
        for lineno, line in _lines(path):
            if len(line) > MAX_FIELD_BYTES:
                raise ValueError(f"{path}:{lineno}: a line of {len(line):,} characters (limit "
                                 f"{MAX_FIELD_BYTES:,}); is this a GLUE file?")
            if "\r" in line.rstrip("\r\n"):  # csv would say "new-line character seen in unquoted field"
                raise ValueError(f"{path}:{lineno}: a carriage return (CR) inside the line: the file has old Mac "
                                 f"(CR-only) line endings or a stray CR in a sentence; save it with LF line endings")
            try:
                row = next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE))
            except StopIteration:
                row = []
            except csv.Error as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
            if row:  # blank lines carry nothing
                yield lineno, row


def _read_local(spec: TaskSpec, path: Path) -> Examples:
    rows = _rows(path)
    if spec.header:
        first = next(rows, None)
        if first is None:
            raise ValueError(f"{path} is empty: expected a header line and examples")
        header = first[1]
    else:
        header = list(spec.columns)
    needed = [c for c in (spec.text_a, spec.text_b, spec.label) if c]
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} for {spec.name}; found {header}")
    twice = sorted({c for c in needed if header.count(c) > 1})
    if twice:
        raise ValueError(f"{path}: column(s) {twice} appear more than once in the header; which one holds the "
                         f"data is ambiguous")
    col = {c: header.index(c) for c in needed}
    label_ids = {name: i for i, name in enumerate(spec.labels)}
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int] = []
    for lineno, row in rows:
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)} ({header}); a tab inside "
                             f"a sentence, or a truncated line?")
        raw = row[col[spec.label]].strip()
        if raw not in label_ids:
            raise ValueError(f"{path}:{lineno}: unknown label {raw!r} for {spec.name}; expected one of "
                             f"{list(spec.labels)}")
        for column in (c for c in (spec.text_a, spec.text_b) if c):
            if not row[col[column]].strip():  # an empty input: tokenized to [CLS] [SEP], a score of nothing
                raise ValueError(f"{path}:{lineno}: the {column!r} field is empty; every {spec.name} example needs "
                                 f"its text (a shifted column or a truncated line?)")
        text_a.append(row[col[spec.text_a]])
        if spec.text_b:
            text_b.append(row[col[spec.text_b]])
        labels.append(label_ids[raw])
    if not labels:
        raise ValueError(f"{path} has no examples (a header only?): {spec.name} needs at least one row")
    return Examples(text_a, text_b if spec.text_b else None, labels)


def _read_hub(spec: TaskSpec, split: str) -> Examples:  # pragma: no cover - needs network
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("--hub-data needs the datasets package: pip install 'sensimix[hub]'") from exc
    hub_split = "validation" if split == "dev" else split
    ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config, split=hub_split)
    cols = {"qnli": ("question", "sentence"), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "rte": ("sentence1", "sentence2"), "cola": ("sentence", None)}[spec.hub_config]
    return Examples(list(ds[cols[0]]), list(ds[cols[1]]) if cols[1] else None, [int(y) for y in ds["label"]])


def load_glue(task: str, split: str = "dev", glue_dir: str | os.PathLike | None = None, *,
              hub: bool = False, limit: int | None = None) -> Examples:
    """Examples of ``task``/``split``.

    Reads ``<glue_dir>/<TASK>/<split>.tsv`` (``glue_dir`` defaults to ``$GLUE_DIR``); with ``hub=True`` and no
    local folder, downloads GLUE from the hub (online users only). ``limit`` keeps the first ``limit`` rows.
    """
    spec = task_spec(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = resolve_glue_dir(glue_dir)
    if root is not None:
        examples = _read_local(spec, task_file(task, split, root))
    elif hub:
        examples = _read_hub(spec, split)
    else:
        raise FileNotFoundError(f"no GLUE data for {spec.name}: pass --glue-dir (or set ${GLUE_DIR_ENV}) to a "
                                f"glue_data folder, or allow the hub download when online (--hub-data)")
    if limit is not None:
        examples = examples.head(limit)
    log.info("%s %s: %d examples", spec.name, split, len(examples))
    return examples


def num_labels(task: str) -> int:
    return len(task_spec(task).labels)


def check_task_labels(model: str | os.PathLike, model_labels: int, task: str, fix: str) -> None:
    """A ``ValueError`` naming both label counts (and ``fix``) when ``model`` does not classify into ``task``'s
    labels: every figure it would give on that task's data would mean nothing."""
    wanted = num_labels(task)
    if model_labels != wanted:
        raise ValueError(f"{model} classifies into {model_labels} labels, but {task} has {wanted}: {fix}")


METRICS_FILE = "training_metrics.json"  # written by compress and finetune beside the weights


def trained_task(model: str | os.PathLike) -> str | None:
    """The GLUE task (its key, e.g. ``sst-2``) that ``model``'s training_metrics.json says it was trained on; None
    where the folder records none (another source, a hub id) or the file cannot be read (logged)."""
    from .io import read_json

    path = Path(model) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = read_json(path, what="training metrics")
    except (OSError, ValueError) as exc:
        log.warning("the task %s was trained on is unknown: %s", model, exc)
        return None
    return recorded_task(metrics)


def recorded_task(metrics: Any) -> str | None:
    """The task key (e.g. ``sst-2``) a parsed training_metrics.json names; None where it names none this version
    knows."""
    task = metrics.get("task") if isinstance(metrics, dict) else None
    if not isinstance(task, str):
        return None
    key = ALIASES.get(task.lower(), task.lower())
    return key if key in TASKS else None


def resolve_task(model: str | os.PathLike, task: str | None, default: str, fix: str) -> str:
    """The task to run ``model`` on: ``task``, or (None) the one it was trained on, else ``default``. A ``task``
    other than the one its training_metrics.json records is refused with ``fix``: every figure measured on it
    (an accuracy, a calibration verdict) would be about data the model does not classify."""
    trained = trained_task(model)
    if task is None:
        if trained is not None:
            log.info("--task %s: the task %s was trained on (its %s)", trained, model, METRICS_FILE)
        return trained or default
    if trained is not None and task_spec(task).name != TASKS[trained].name:
        raise ValueError(f"--task {task}, but {model} was trained on {trained} (its {METRICS_FILE}): {fix}")
    return task


class Features:
    """Tokenized examples: a map-style dataset of dicts (what transformers' Trainer and collators take)."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"feature columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


def tokenize(examples: Examples, tokenizer: Any, max_length: int = 128, pad_to_max: bool = False,
             batch_size: int = 2048) -> Features:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` and ``labels`` of every example.

    Without ``pad_to_max`` sequences keep their own length (a collator pads each batch dynamically).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    columns: dict[str, list[Any]] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
    for start in range(0, len(examples), batch_size):
        stop = start + batch_size
        enc = tokenizer(examples.text_a[start:stop], examples.text_b[start:stop] if examples.text_b else None,
                        truncation=True, max_length=max_length, padding="max_length" if pad_to_max else False,
                        return_token_type_ids=True)
        for key in columns:
            columns[key].extend(enc[key])
    columns["labels"] = list(examples.labels)
    return Features(columns)
