"""Command-line options shared by the ``sensimix`` commands, with validating types (light imports only): a bad
value is refused by argparse itself, before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high:,}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


SEED = int_at_least(0, 2**32 - 1)  # numpy's and torch's seed range


def finite_float(low: float = -math.inf, *, open_low: bool = False, high: float = math.inf) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or (open_low and value == low) or value > high:
            bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def add_glue_arguments(p: argparse.ArgumentParser, *,
                       folder: str = "folder in the glue_data/<TASK>/{train,dev}.tsv layout",
                       hub_reads: str = "GLUE") -> None:
    """``--glue-dir`` and ``--hub-data``: where GLUE data comes from (``folder``/``hub_reads`` tailor the help)."""
    p.add_argument("--glue-dir", default=None, help=f"{folder} (default: $GLUE_DIR)")
    p.add_argument("--hub-data", action="store_true",
                   help=f"when no local GLUE folder is given, read {hub_reads} from the hub (nyu-mll/glue; "
                        "online users only; needs `pip install 'sensimix[hub]'`)")


def add_data_arguments(p: argparse.ArgumentParser, *, default_task: str = "sst-2", model_task: bool = False) -> None:
    """``--task`` and the GLUE source options. ``model_task``: --task defaults to None, meaning the task the
    --model folder was trained on (:func:`sensimix.data.resolve_task`), else ``default_task``."""
    default = (f"the task --model was trained on (its training_metrics.json), else {default_task}" if model_task
               else default_task)
    p.add_argument("--task", default=None if model_task else default_task,
                   choices=["qnli", "sst-2", "sst2", "mrpc", "rte", "cola"], help=f"GLUE task (default: {default})")
    add_glue_arguments(p)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=finite_float(0, open_low=True), default=6.0,
                   help="training epochs (default: %(default)s, the SensiMix paper's)")
    g.add_argument("--max-steps", type=int_at_least(-1), default=-1,
                   help="stop after this many optimizer steps (overrides --epochs; -1, the default: none); "
                        "compress only: 0 = quantize and export without training")
    g.add_argument("--train-limit", type=int_at_least(1), default=None, metavar="K",
                   help="train on a seeded random subset of K training examples (default: all)")
    g.add_argument("--eval-limit", type=int_at_least(1), default=None, metavar="K",
                   help="evaluate on the first K dev examples (default: all)")
    g.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="per-device batch size (default: %(default)s)")
    g.add_argument("--lr", type=finite_float(0, open_low=True, high=1.0), default=2.5e-5,
                   help="AdamW learning rate, linear decay (default: %(default)s)")
    g.add_argument("--warmup-ratio", type=finite_float(0, high=0.999), default=0.0,
                   help="linear warm-up fraction (default: none)")
    g.add_argument("--max-seq-length", type=int_at_least(2), default=128,
                   help="tokens per example, at most the BERT's max_position_embeddings (default: %(default)s)")
    g.add_argument("--seed", type=SEED, default=42,
                   help="seed for init, data order and subsets (default: %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available; multi-GPU: launch with torchrun")


def settings_from_args(args: argparse.Namespace, **extra: Any):
    from ..train.recipe import TrainSettings

    return TrainSettings(
        epochs=args.epochs, max_steps=args.max_steps, train_limit=args.train_limit, eval_limit=args.eval_limit,
        batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=args.warmup_ratio,
        max_seq_length=args.max_seq_length, seed=args.seed, device=args.device, **extra,
    )
