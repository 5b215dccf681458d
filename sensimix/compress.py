"""``sensimix compress``: BERT checkpoint -> trained SensiMix (a+b) -> compressed checkpoint folder."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .cli_common import add_data_arguments, add_training_arguments, settings_from_args

log = logging.getLogger(__name__)

HELP = "compress a BERT checkpoint into a SensiMix (a+b) model (train with ABWR/PT/ILF, then export)"
DESCRIPTION = """\
Compress a BERT into SensiMix (a+b): keep its first N = a+b encoder layers, quantize embeddings and the
first a layers to 8-bit indices, give the top b layers a 1-bit FFN, fine-tune on a GLUE task with ABWR,
Prioritized Training and Inverse Layer-wise Fine-tuning, and write the compressed folder (config.json,
pytorch_model.bin, model.safetensors, tokenizer files, training_metrics.json).

examples:
  sensimix compress --bert ./minilm-sst2 --task sst-2 --glue-dir glue_data --out out/sst2-3+3 --layers 6 --8bit-layers 3
  sensimix compress --bert random:bert-base --max-steps 0 --out out/size-2+1      # size check, no data needed
  torchrun --nproc_per_node 4 -m sensimix compress ...                            # multi-GPU (DDP)
"""


@dataclass
class TrainResult:
    path: Path
    metrics: dict = field(default_factory=dict)
    schedule: list = field(default_factory=list)
    model: object = None  # the trained model (QAT SensiMix or fp32 BERT), for callers that keep using it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bert", required=True,
                   help="BERT to compress: a local folder, a hub id (online), or random:bert-base (random weights)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--layers", type=int, default=3, help="N = a+b encoder layers to keep (default: %(default)s)")
    p.add_argument("--8bit-layers", dest="eightbit_layers", type=int, default=2,
                   help="a = leading layers fully 8-bit; the other N-a get a 1-bit FFN (default: %(default)s)")
    add_data_arguments(p)
    add_training_arguments(p)
    g = p.add_argument_group("recipe")
    g.add_argument("--no-abwr", action="store_true", help="ablation: no Absolute Binary Weight Regularization")
    g.add_argument("--no-pt", action="store_true", help="ablation: no Prioritized Training epoch")
    g.add_argument("--no-ilf", action="store_true", help="ablation: binarize all 1-bit FFNs at once, not top-down")
    g.add_argument("--teacher", default=None, help="fine-tuned fp32 BERT folder to distill from (implies --distill)")
    g.add_argument("--distill", action="store_true", help="knowledge distillation from --teacher (logits)")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation loss (default: %(default)s)")
    g.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature (default: %(default)s)")
    g.add_argument("--distill-hidden", type=float, default=0.0,
                   help="weight of a hidden-state MSE term against the teacher (default: 0 = logits only)")


def compress(bert: str | os.PathLike, task: str, out: str | os.PathLike, *, glue_dir: str | os.PathLike | None = None,
             layers: int = 3, eightbit_layers: int = 2, settings=None, teacher: str | os.PathLike | None = None,
             overwrite: bool = False, hub_data: bool = False) -> TrainResult:
    """Build SensiMix (eightbit_layers + layers - eightbit_layers) from ``bert``, train it, export it to ``out``."""
    import tempfile

    from transformers import BertForSequenceClassification, set_seed

    from . import distributed
    from .data import load_tokenizer, num_labels, prepare_task_data, resolve_glue_dir
    from .export import export_checkpoint
    from .modeling import from_bert
    from .recipe import TrainSettings, train

    settings = settings or TrainSettings()
    if settings.distill and teacher is None:
        raise ValueError("--distill needs --teacher <fine-tuned BERT folder>")
    settings = dataclasses.replace(settings, distill=teacher is not None)  # the metrics record what ran
    if Path(out).exists() and not overwrite:  # fail before hours of training, not after
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    set_seed(settings.seed)
    tokenizer = load_tokenizer(bert)
    model = from_bert(bert, num_hidden_layers=layers, num_8bit_layers=eightbit_layers, num_labels=num_labels(task))
    log.info("%s: %d mixed layer(s) %s, recipe ABWR=%s PT=%s ILF=%s distill=%s", model.config.describe(),
             model.config.num_mixed_layers, model.config.mixed_layers, settings.abwr, settings.pt, settings.ilf,
             teacher is not None)
    metrics: dict = {"settings": settings.as_dict(), "bert": str(bert), "task": task,
                     "model": model.config.describe()}
    schedule: list = []
    if settings.max_steps != 0:
        if resolve_glue_dir(glue_dir) is None and not hub_data:
            raise FileNotFoundError("training needs GLUE data: pass --glue-dir (or set $GLUE_DIR), "
                                    "or --max-steps 0 to quantize and export without training")
        train_ds, dev_ds = prepare_task_data(task, tokenizer, glue_dir, max_seq_length=settings.max_seq_length,
                                             train_limit=settings.train_limit, eval_limit=settings.eval_limit,
                                             seed=settings.seed, hub=hub_data)
        teacher_model = None
        if teacher is not None:
            teacher_model = BertForSequenceClassification.from_pretrained(os.fspath(teacher))
        with tempfile.TemporaryDirectory(prefix="sensimix-train-") as work:
            run_metrics, schedule = train(model, tokenizer, train_ds, dev_ds, settings, work, teacher=teacher_model)
        metrics.update(run_metrics)
        log.info("dev accuracy of %s (QAT model, all 1-bit FFNs binarized): %.4f", model.config.describe(),
                 metrics.get("eval_accuracy", float("nan")))
    else:
        log.info("--max-steps 0: quantizing and exporting without training")
        model.set_binarized_layers(model.config.mixed_layers)
    metrics["schedule"] = [{"epoch": e, "binarized_layers": ls} for e, ls in schedule]
    metrics["world_size"] = distributed.world_size()
    with distributed.main_process_writes() as writer:  # under torchrun every rank holds the same weights
        if writer:
            export_checkpoint(model, out, tokenizer, overwrite=overwrite,
                              extra_json={"training_metrics.json": metrics})
    return TrainResult(path=Path(out), metrics=metrics, schedule=schedule, model=model)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(
        args, abwr=not args.no_abwr, pt=not args.no_pt, ilf=not args.no_ilf, distill=args.distill,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
        distill_hidden=args.distill_hidden,
    )
    result = compress(args.bert, args.task, args.out, glue_dir=args.glue_dir, layers=args.layers,
                      eightbit_layers=args.eightbit_layers, settings=settings, teacher=args.teacher,
                      overwrite=args.overwrite, hub_data=args.hub_data)
    size = (result.path / "pytorch_model.bin").stat().st_size
    print(f"wrote {result.path}: pytorch_model.bin {size / 1e6:.1f} MB")
    if "eval_accuracy" in result.metrics:
        print(f"dev accuracy = {result.metrics['eval_accuracy']:.4f}")
    return 0
