"""The SensiMix training recipe on transformers' ``Trainer``: ABWR, Prioritized Training, Inverse Layer-wise
Fine-tuning and optional knowledge distillation.

The same code runs on one CPU, one GPU, or several GPUs under ``torchrun`` (``Trainer`` sets up DDP).

Schedule (SENSIMIX.md section 4), for mixed layers ``a..N-1``:

* PT on: epoch 0 trains with every 1-bit FFN in full precision (inputs already binarized).
* ILF on: each following epoch binarizes one more FFN, from the top layer down; once all are binarized,
  training goes on with all binarized. ILF off: all are binarized together right after PT.
* With both off every FFN is binarized from the first step.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..qat import SensiMixQATForSequenceClassification

log = logging.getLogger(__name__)


def _finite_number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _int_at_least(name: str, value: object, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class TrainSettings:
    """Hyper-parameters of a run. Defaults are the reference code's (AdamW, lr 2.5e-5, batch 16, 6 epochs,
    linear decay, no warm-up, grad-norm clip 1.0, max_seq_length 128)."""

    epochs: float = 6.0
    max_steps: int = -1          # > 0 overrides epochs; 0 = no training (quantize and export only)
    batch_size: int = 16
    learning_rate: float = 2.5e-5
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    seed: int = 42
    train_limit: int | None = None   # keep the first K training examples (after a seeded shuffle)
    eval_limit: int | None = None
    abwr: bool = True
    abwr_coef: float = 1.0
    pt: bool = True
    ilf: bool = True
    distill: bool = False
    distill_alpha: float = 0.5       # weight of the distillation term (1 - alpha for the labels)
    distill_temperature: float = 1.0
    distill_hidden: float = 0.0      # weight of the hidden-state MSE term (0 = logits only)
    device: str = "auto"             # auto | cpu | cuda
    logging_steps: int = 50
    dataloader_workers: int = 0
    fast_calibration: bool = True    # compress: measure fast's approximate kernel (train/calibrate.py)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every value checked now, with the command-line flag's name, not after hours of training."""
        _finite_number("--epochs", self.epochs, low=0, low_open=True)
        _int_at_least("--max-steps", self.max_steps, -1)
        _int_at_least("--batch-size", self.batch_size, 1)
        _finite_number("--lr", self.learning_rate, low=0, high=1.0, low_open=True)
        _finite_number("--warmup-ratio", self.warmup_ratio, low=0, high=0.999)
        _finite_number("weight_decay", self.weight_decay, low=0)
        _finite_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        _int_at_least("--max-seq-length", self.max_seq_length, 2)
        _int_at_least("--seed", self.seed, 0)
        _int_at_least("--train-limit", self.train_limit, 1, allow_none=True)
        _int_at_least("--eval-limit", self.eval_limit, 1, allow_none=True)
        _finite_number("abwr_coef", self.abwr_coef, low=0)
        _finite_number("--distill-alpha", self.distill_alpha, low=0, high=1)
        _finite_number("--distill-temperature", self.distill_temperature, low=0, low_open=True)
        _finite_number("--distill-hidden", self.distill_hidden, low=0)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------------
def binarized_layers_at(epoch: int, mixed_layers: list[int], *, pt: bool = True, ilf: bool = True) -> list[int]:
    """Which mixed layers have binarized FFN weights during ``epoch`` (0-based)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    phase = epoch - 1 if pt else epoch  # epochs since binarization started; < 0 means still in PT
    if phase < 0:
        return []
    if not ilf:
        return list(mixed_layers)
    top_down = sorted(mixed_layers, reverse=True)
    return sorted(top_down[: phase + 1])


def epochs_to_binarize_all(num_mixed: int, *, pt: bool = True, ilf: bool = True) -> int:
    """Smallest epoch count after which every 1-bit FFN has trained binarized for at least one epoch."""
    if num_mixed == 0:
        return 1
    return (1 if pt else 0) + (num_mixed if ilf else 1)


class ILFCallback(TrainerCallback):
    """Applies the PT/ILF schedule at the start of every epoch and logs which layers are binarized."""

    def __init__(self, model, settings: TrainSettings) -> None:
        self.model = model
        self.settings = settings
        self.history: list[tuple[int, list[int]]] = []

    def apply(self, epoch: int) -> list[int]:
        layers = binarized_layers_at(epoch, self.model.config.mixed_layers, pt=self.settings.pt, ilf=self.settings.ilf)
        self.model.set_binarized_layers(layers)
        self.history.append((epoch, layers))
        fp = [i for i in self.model.config.mixed_layers if i not in layers]
        log.info("epoch %d: 1-bit FFN binarized in layers %s; full-precision FFN weights in %s", epoch,
                 layers or "none", fp or "none")
        return layers

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply(0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0
        if not self.history or self.history[-1][0] != epoch:
            self.apply(epoch)


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------
class SensiMixTrainer(Trainer):
    """``Trainer`` whose loss is task CE + ABWR (+ distillation from an optional fine-tuned teacher)."""

    def __init__(self, *args, settings: TrainSettings, teacher: torch.nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.args.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        want_hidden = self.teacher is not None and self.settings.distill_hidden > 0
        outputs = model(**inputs, output_hidden_states=want_hidden)
        loss = outputs.loss
        core = model.module if hasattr(model, "module") else model
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"},
                                     output_hidden_states=want_hidden)
            loss = (1 - self.settings.distill_alpha) * loss + self.settings.distill_alpha * distillation_loss(
                outputs.logits, t_out.logits, self.settings.distill_temperature)
            if want_hidden:
                loss = loss + self.settings.distill_hidden * hidden_state_loss(
                    outputs.hidden_states, t_out.hidden_states, inputs.get("attention_mask"))
        if self.settings.abwr and isinstance(core, SensiMixQATForSequenceClassification):
            loss = loss + self.settings.abwr_coef * core.abwr_loss()
        return (loss, outputs) if return_outputs else loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-label KL(teacher || student) at ``temperature``, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1),
                    reduction="batchmean") * t * t


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between student layer i and teacher layer i * L_t / L_s (embeddings excluded), over real tokens."""
    n_s, n_t = len(student) - 1, len(teacher) - 1
    terms = []
    for i in range(1, n_s + 1):
        j = i * n_t // n_s
        diff = (student[i] - teacher[j]).pow(2).mean(-1)
        terms.append((diff * mask).sum() / mask.sum() if mask is not None else diff.mean())
    return torch.stack(terms).mean()


def training_arguments(settings: TrainSettings, output_dir: str | os.PathLike, *, has_eval: bool) -> TrainingArguments:
    use_cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio); 4.x has both.
    fields = inspect.signature(TrainingArguments.__init__).parameters
    # transformers 5 dropped warmup_ratio: there a float in [0, 1) as warmup_steps is the ratio
    warmup = ({"warmup_ratio": settings.warmup_ratio} if "warmup_ratio" in fields
              else {"warmup_steps": settings.warmup_ratio})
    return TrainingArguments(
        **warmup,
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(64, settings.batch_size),
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=use_cpu,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
        logging_steps=settings.logging_steps,
        report_to=[],
        dataloader_num_workers=settings.dataloader_workers,
        disable_tqdm=False,
    )


def accuracy_metric(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def train(model, tokenizer, train_ds, eval_ds, settings: TrainSettings, output_dir: str | os.PathLike,
          *, teacher: torch.nn.Module | None = None) -> tuple[dict, list]:
    """Train ``model`` -- a SensiMix QAT model (with the PT/ILF schedule and ABWR), or a plain BERT classifier
    (fine-tuning) -- and return (metrics, schedule).

    ``metrics`` holds the final ``eval_accuracy`` (when ``eval_ds`` is given) and ``train_loss``; ``schedule``
    the (epoch, binarized layers) pairs applied (empty for a plain BERT).
    """
    from transformers import DataCollatorWithPadding

    if len(train_ds) == 0:
        raise ValueError("no training examples: check the data folder and --train-limit")
    qat = isinstance(model, SensiMixQATForSequenceClassification)
    args = training_arguments(settings, output_dir, has_eval=eval_ds is not None)
    callbacks = []
    ilf = None
    if qat:
        ilf = ILFCallback(model, settings)
        callbacks.append(ilf)
        if settings.max_steps < 0:
            need = epochs_to_binarize_all(model.config.num_mixed_layers, pt=settings.pt, ilf=settings.ilf)
            if settings.epochs < need:
                log.warning("%g epochs is fewer than the %d the PT/ILF schedule needs to binarize every 1-bit FFN; "
                            "the export binarizes the rest untrained", settings.epochs, need)
    trainer = SensiMixTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy_metric,
        callbacks=callbacks, settings=settings, teacher=teacher,
    )
    result = trainer.train()
    metrics = {"train_loss": result.training_loss, "train_steps": result.global_step,
               "train_examples": len(train_ds)}
    if qat:
        model.set_binarized_layers(model.config.mixed_layers)  # evaluate what the checkpoint will hold
        n = model.round_float_tensors_to_fp16_()
        log.info("rounded %d float tensors to fp16 as the checkpoint stores them: the final evaluation is the "
                 "exported checkpoint's", n)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return metrics, (ilf.history if ilf else [])
