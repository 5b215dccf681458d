"""Command-line options shared by the ``sensimix`` commands (light imports only)."""

from __future__ import annotations

import argparse


def add_glue_arguments(p: argparse.ArgumentParser, *,
                       folder: str = "folder in the glue_data/<TASK>/{train,dev}.tsv layout",
                       hub_reads: str = "GLUE") -> None:
    """``--glue-dir`` and ``--hub-data``: where GLUE data comes from (``folder``/``hub_reads`` tailor the help)."""
    p.add_argument("--glue-dir", default=None, help=f"{folder} (default: $GLUE_DIR)")
    p.add_argument("--hub-data", action="store_true",
                   help=f"when no local GLUE folder is given, read {hub_reads} from the hub (nyu-mll/glue; "
                        "online users only)")


def add_data_arguments(p: argparse.ArgumentParser, *, default_task: str = "sst-2") -> None:
    """``--task`` and the GLUE source options."""
    p.add_argument("--task", default=default_task,
                   help="GLUE task: qnli, sst-2, mrpc, rte, cola (default: %(default)s)")
    add_glue_arguments(p)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=6.0, help="training epochs (default: %(default)s, the paper's)")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (overrides --epochs); 0 = no training at all")
    g.add_argument("--train-limit", type=int, default=None, metavar="K",
                   help="train on a seeded random subset of K training examples")
    g.add_argument("--eval-limit", type=int, default=None, metavar="K", help="evaluate on the first K dev examples")
    g.add_argument("--batch-size", type=int, default=16, help="per-device batch size (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2.5e-5, help="AdamW learning rate, linear decay (default: %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="linear warm-up fraction (default: none)")
    g.add_argument("--max-seq-length", type=int, default=128, help="tokens per example (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and subsets (default: %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available; multi-GPU: launch with torchrun")


def settings_from_args(args: argparse.Namespace, **extra):
    from .recipe import TrainSettings

    return TrainSettings(
        epochs=args.epochs, max_steps=args.max_steps, train_limit=args.train_limit, eval_limit=args.eval_limit,
        batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=args.warmup_ratio,
        max_seq_length=args.max_seq_length, seed=args.seed, device=args.device, **extra,
    )
