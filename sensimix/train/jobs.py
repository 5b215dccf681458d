"""The two training jobs as library functions: :func:`finetune` (an fp32 BERT classifier: the reference and the
distillation teacher, or a truncated BERT distilled from it) and :func:`compress` (BERT -> trained SensiMix (a+b) ->
packed checkpoint).

Both check everything they can before the first training step -- the output folder (and lock it for the job),
the BERT and teacher sources, the data files, the sequence length against the position table -- so a mistake
costs seconds, not hours. Both write on rank 0 only under ``torchrun`` and refuse to write tensors that hold
NaN/inf (a diverged run exits with an error and writes nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ACTIVATION_QUANT
from ..devices import resolve_device
from ..io import (
    atomic_dir,
    check_apart,
    check_output_dir,
    reserve_output,
    write_json,
)
from ..sources import SourceError, bert_config, load_bert_classifier, load_tokenizer, save_tokenizer
from ..measure import check_length_fits
from . import distributed
from ..data import METRICS_FILE, num_labels, resolve_glue_dir, task_file, task_spec, trained_task
from .provenance import FIELD as TRAIN_DATA, task_data
from .recipe import TrainSettings, train

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    path: Path
    metrics: dict = field(default_factory=dict)
    schedule: list = field(default_factory=list)
    model: Any = None  # the trained model (QAT SensiMix or fp32 BERT), for callers that keep using it


def _check_before_training(source: str | os.PathLike, task: str, out: str | os.PathLike, overwrite: bool,
                           settings: TrainSettings, glue_dir: str | os.PathLike | None, hub: bool,
                           teacher: str | os.PathLike | None = None) -> Path:
    """Everything that can be checked in seconds; returns the absolute output folder."""
    check_apart(out, {"--bert": source, "--teacher": teacher})
    out = check_output_dir(out, overwrite=overwrite)
    resolve_device(settings.device)  # --device cuda without CUDA is an error even when no step runs
    config = bert_config(source)
    if settings.max_steps != 0:  # without training no text is tokenized to that length
        check_length_fits(settings.max_seq_length, config, source)
    if teacher is not None:
        _check_teacher(teacher, config, source, settings, task)
    num_labels(task)  # an unknown task name fails here
    if settings.max_steps != 0:
        words = len(load_tokenizer(source))
        if words > config.vocab_size:
            raise ValueError(f"the tokenizer of {source} has {words:,} tokens but its vocab_size is "
                             f"{config.vocab_size:,}: ids past the embedding table would fail mid-training; use the "
                             f"tokenizer the model was trained with (or a config that matches it)")
        root = resolve_glue_dir(glue_dir)
        if root is None and not hub:
            raise FileNotFoundError("training needs GLUE data: pass --glue-dir (or set $GLUE_DIR), or --max-steps 0 "
                                    "to quantize and export without training")
        if root is not None:
            for split in ("train", "dev"):
                task_file(task, split, root)
    return out


def _check_teacher(teacher: str | os.PathLike, student: Any, source: str | os.PathLike,
                   settings: TrainSettings, task: str) -> None:
    """A teacher reads the student's batches (the same token ids and lengths); with ``--distill-hidden`` its hidden
    states are compared with the student's, so the widths must match too. Its logits must be this task's labels:
    a teacher whose training_metrics.json records another task is refused."""
    try:
        config = bert_config(teacher, allow_qat=False)
    except SourceError as exc:
        raise _teacher_error(exc, task) from None
    trained = trained_task(teacher)
    if trained is not None and task_spec(trained).name != task_spec(task).name:
        raise ValueError(f"--teacher {teacher} was fine-tuned on {trained} (its {METRICS_FILE}), but --task is "
                         f"{task}: its logits score another task's labels; use a teacher fine-tuned on {task}")
    if config.vocab_size != student.vocab_size:
        raise ValueError(f"--teacher {teacher} has vocab_size {config.vocab_size:,}, --bert {source} "
                         f"{student.vocab_size:,}: distillation feeds both the same token ids; use a teacher "
                         f"fine-tuned from the same vocabulary")
    if settings.max_steps != 0:
        check_length_fits(settings.max_seq_length, config, f"the --teacher {teacher}")
    if settings.distill_hidden > 0 and config.hidden_size != student.hidden_size:
        raise ValueError(f"--distill-hidden compares hidden states, but --teacher {teacher} has hidden_size "
                         f"{config.hidden_size} and --bert {source} {student.hidden_size}: use --distill-hidden 0 "
                         f"(logits only) or a teacher of the same width")


def _teacher_error(exc: SourceError, task: str) -> SourceError:
    """A teacher's load error, naming the option and what a teacher is."""
    return SourceError(f"--teacher: {exc} (the teacher is an fp32 BERT fine-tuned on {task}, e.g. by sensimix "
                       f"finetune)")


def _reserve(out: Path) -> contextlib.AbstractContextManager:
    """Rank 0 (the writer) locks the output folder for the whole job; other ranks write nothing."""
    return reserve_output(out) if distributed.is_main_process() else contextlib.nullcontext(out)


def save_bert_folder(model: Any, tokenizer: Any, out: str | os.PathLike, *, overwrite: bool = False,
                     extra_json: dict | None = None) -> Path:
    """Write a plain BERT folder like the certified one (pytorch_model.bin) plus model.safetensors, atomically;
    NaN/inf weights are refused before anything is written."""
    import torch

    from ..checkpoint import check_finite

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(state, f"the BERT folder {out}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(state, tmp / "pytorch_model.bin")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
    return Path(out)


def finetune(bert: str | os.PathLike, task: str, out: str | os.PathLike, *, glue_dir: str | os.PathLike | None = None,
             settings: TrainSettings | None = None, overwrite: bool = False, hub_data: bool = False,
             layers: int | None = None, teacher: str | os.PathLike | None = None) -> TrainResult:
    """Fine-tune ``bert`` on ``task`` and save the fp32 classifier to ``out``.

    ``layers``: keep only the first ``layers`` encoder layers of ``bert`` (and its classifier head, when it has one):
    the truncated BERT that a user deploys instead of SensiMix. ``teacher``: distil from that fine-tuned fp32 BERT
    (``settings.distill_alpha`` / ``distill_temperature``), as ``compress`` does."""
    from transformers import set_seed

    settings = settings or TrainSettings(epochs=3, learning_rate=5e-5, batch_size=32)
    if settings.max_steps == 0:
        raise ValueError("--max-steps 0 means no training: finetune has nothing to do")
    depth = bert_config(bert).num_hidden_layers
    if layers is not None and not 1 <= layers <= depth:
        raise ValueError(f"--layers {layers}: {bert} has {depth} encoder layers; keep 1 to {depth}")
    settings = dataclasses.replace(settings, distill=teacher is not None)
    out = _check_before_training(bert, task, out, overwrite, settings, glue_dir, hub_data, teacher)
    with _reserve(out):
        set_seed(settings.seed)
        tokenizer = load_tokenizer(bert)
        cut = layers is not None and layers < depth
        model = load_bert_classifier(bert, num_labels(task), layers=layers if cut else None)
        described = f"fp32 BERT, the first {layers} of {depth} layers of {bert}" if cut else "fp32 BERT"
        train_ds, dev_ds, train_data = task_data(task, tokenizer, glue_dir, max_seq_length=settings.max_seq_length,
                                                 train_limit=settings.train_limit, eval_limit=settings.eval_limit,
                                                 seed=settings.seed, hub=hub_data)
        try:
            teacher_model = (load_bert_classifier(teacher, num_labels(task), trained_head=True)
                             if teacher is not None else None)
        except SourceError as exc:
            raise _teacher_error(exc, task) from None
        with tempfile.TemporaryDirectory(prefix="sensimix-finetune-") as work:
            metrics, _ = train(model, tokenizer, train_ds, dev_ds, settings, work, teacher=teacher_model)
        metrics.update(settings=settings.as_dict(), bert=str(bert), task=task, model=described,
                       **({"teacher": str(teacher)} if teacher is not None else {}), **{TRAIN_DATA: train_data})
        log.info("dev accuracy of the %s: %.4f", described, metrics.get("eval_accuracy", float("nan")))
        metrics["world_size"] = distributed.world_size()
        with distributed.main_process_writes() as writer:  # under torchrun every rank holds the same weights
            if writer:
                save_bert_folder(model, tokenizer, out, overwrite=overwrite,
                                 extra_json={"training_metrics.json": metrics})
    return TrainResult(path=Path(out), metrics=metrics, model=model)


def compress(bert: str | os.PathLike, task: str, out: str | os.PathLike, *, glue_dir: str | os.PathLike | None = None,
             layers: int = 3, eightbit_layers: int = 2, settings: TrainSettings | None = None,
             teacher: str | os.PathLike | None = None, overwrite: bool = False,
             hub_data: bool = False, activations: str = "fp32") -> TrainResult:
    """Build SensiMix (eightbit_layers + layers - eightbit_layers) from ``bert``, train it, export it to ``out``.
    ``activations="a8"``: an A8 model (:mod:`sensimix.a8`; its kernels are exact, so no fast calibration runs)."""
    from transformers import set_seed

    from ..checkpoint import check_finite
    from ..export import export_checkpoint
    from ..qat import from_bert

    settings = settings or TrainSettings()
    if settings.distill and teacher is None:
        raise ValueError("--distill needs --teacher <fine-tuned BERT folder>")
    defaults = TrainSettings()
    shaping = [f"--{name.replace('_', '-')}" for name in ("distill_alpha", "distill_temperature", "distill_hidden")
               if getattr(settings, name) != getattr(defaults, name)]
    if shaping and teacher is None:  # accepted and ignored would be worse than refused
        raise ValueError(f"{', '.join(shaping)} shape the distillation from --teacher, and there is none: pass "
                         f"--teacher <fine-tuned BERT folder>, or drop them")
    if activations not in ("fp32", ACTIVATION_QUANT):
        raise ValueError(f"--activations must be fp32 or {ACTIVATION_QUANT}, got {activations!r}")
    trains = settings.max_steps != 0  # the metrics record what ran: without training, no distillation or calibration
    settings = dataclasses.replace(settings, distill=teacher is not None and trains,
                                   fast_calibration=settings.fast_calibration and trains and activations == "fp32")
    out = _check_before_training(bert, task, out, overwrite, settings, glue_dir, hub_data, teacher)
    with _reserve(out):
        set_seed(settings.seed)
        tokenizer = load_tokenizer(bert)
        model = from_bert(bert, num_hidden_layers=layers, num_8bit_layers=eightbit_layers, num_labels=num_labels(task),
                          activation_quant=None if activations == "fp32" else activations)
        log.info("%s: %d mixed layer(s) %s, recipe ABWR=%s PT=%s ILF=%s distill=%s", model.config.describe(),
                 model.config.num_mixed_layers, model.config.mixed_layers, settings.abwr, settings.pt, settings.ilf,
                 settings.distill)
        metrics: dict = {"settings": settings.as_dict(), "bert": str(bert), "task": task,
                         "model": model.config.describe(), "activations": activations}
        schedule: list = []
        if settings.max_steps != 0:
            train_ds, dev_ds, metrics[TRAIN_DATA] = task_data(  # what identifies the examples trained on
                task, tokenizer, glue_dir, max_seq_length=settings.max_seq_length, train_limit=settings.train_limit,
                eval_limit=settings.eval_limit, seed=settings.seed, hub=hub_data)
            try:
                teacher_model = (load_bert_classifier(teacher, num_labels(task), trained_head=True)
                                 if teacher is not None else None)
            except SourceError as exc:  # e.g. a pre-trained BERT without a classifier
                raise _teacher_error(exc, task) from None
            with tempfile.TemporaryDirectory(prefix="sensimix-train-") as work:
                run_metrics, schedule = train(model, tokenizer, train_ds, dev_ds, settings, work,
                                              teacher=teacher_model)
            metrics.update(run_metrics)
            log.info("dev accuracy of %s (QAT model, all 1-bit FFNs binarized): %.4f", model.config.describe(),
                     metrics.get("eval_accuracy", float("nan")))
        else:
            log.info("--max-steps 0: quantizing and exporting without training")
            model.set_binarized_layers(model.config.mixed_layers)
        check_finite(dict(model.state_dict()), f"the trained {model.config.describe()}")
        metrics["schedule"] = [{"epoch": e, "binarized_layers": ls} for e, ls in schedule]
        metrics["world_size"] = distributed.world_size()
        with distributed.main_process_writes() as writer:  # under torchrun every rank holds the same weights
            if writer:
                export_checkpoint(model, out, tokenizer, overwrite=overwrite,
                                  extra_json={"training_metrics.json": metrics})
                if settings.fast_calibration:
                    _calibrate_fast(Path(out), task, tokenizer, glue_dir, settings, hub_data)
    return TrainResult(path=Path(out), metrics=metrics, schedule=schedule, model=model)


def _calibrate_fast(out: Path, task: str, tokenizer: Any, glue_dir: str | os.PathLike | None,
                    settings: TrainSettings, hub: bool) -> None:
    """Measure fast's approximate 8-bit kernel on the exported folder (still under the job's lock), over train
    examples this run did not train on, else the dev split (:func:`sensimix.train.calibrate.calibration_examples`).
    The folder is complete without it: a failure is logged and ``fast`` stays exact."""
    from ..calibration_record import RECORD
    from ..measure import examples_inputs
    from .calibrate import calibrate, calibration_examples, trained_on

    try:
        examples, data, _ = calibration_examples(task, glue_dir, trained=trained_on(out, task), hub=hub, model=out)
        calibrate(out, examples_inputs(examples, tokenizer, settings.max_seq_length), data=data)
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        (out / RECORD).unlink(missing_ok=True)
        log.warning("fast calibration of %s failed (%s: %s): precision fast runs the exact path", out,
                    type(exc).__name__, exc)
    except KeyboardInterrupt as exc:  # the folder is already in place: the command must not say "nothing written"
        exc.written = (f"{out} was written, without a fast calibration record (precision fast runs the exact "
                       f"path); `sensimix calibrate --model {out}` measures it")
        raise
