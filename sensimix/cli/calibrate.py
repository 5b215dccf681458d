"""``sensimix calibrate``: measure whether precision "fast" may round this checkpoint's 8-bit activations."""

from __future__ import annotations

import argparse

from .common import add_data_arguments, int_at_least

HELP = "measure whether precision fast may use the approximate int16 8-bit kernel for a SensiMix folder"
DESCRIPTION = """\
Run a packed SensiMix folder over a GLUE split twice on this CPU -- the exact path, and the approximate int16
8-bit kernel (activations of the 8-bit linears rounded per row to 15-bit integers) -- and write the verdict into
the folder as fast_calibration.json. It passes with at least 200 examples, >= 99.5% of the predictions equal and
the accuracy within 0.3 points (the bar of the acceptance suite's fast_agreement). From then on
from_pretrained(folder, precision="fast") uses int16 on CPUs with AVX2; with no record, a failed one or a record
of other weights, fast runs the exact path.

`sensimix compress` does this after training, on its task's dev split (--no-fast-calibration skips it); run this
command for folders written without it, or to measure on other data. The record is tied to the weights by
config.json's checksum; the folder is locked while it is measured, and only that one file is written.

examples:
  sensimix calibrate --model out/sst2-2+1 --task sst-2 --glue-dir glue_data
  sensimix calibrate --model out/qnli-2+1 --task qnli --glue-dir glue_data --examples 2000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packed SensiMix folder (written by compress or export)")
    add_data_arguments(p)
    p.add_argument("--split", default="dev", choices=["dev", "train"], help="default: %(default)s")
    p.add_argument("--examples", type=int_at_least(1), default=4096, metavar="N",
                   help="measure on the first N examples of the split (default: %(default)s; 200 at least to pass)")
    p.add_argument("--max-seq-length", type=int_at_least(5), default=128,
                   help="pad/truncate to this many tokens, as in training (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..calibration import calibrate
    from ..checkpoint import read_config
    from ..sources import load_tokenizer
    from ..train.data import check_task_labels
    from ..vv.measure import check_inputs_fit, task_inputs

    config = read_config(args.model)  # a packed folder, before any data is read
    check_task_labels(args.model, config.num_labels, args.task, "calibrate it on its own task")
    inputs = task_inputs(args.task, load_tokenizer(args.model), glue_dir=args.glue_dir, split=args.split,
                         max_seq_length=args.max_seq_length, hub=args.hub_data)
    data = f"{args.task} {args.split}"
    check_inputs_fit(inputs, config, f"{data} tokenized for {args.model}")
    record = calibrate(args.model, inputs, data=data, max_examples=args.examples)
    if record is None:
        print("not calibrated: this CPU cannot run the int16 kernel (see the log); precision fast stays exact")
        return 0
    verdict = "PASSED: precision fast uses int16" if record["passed"] else f"FAILED ({record['reason']}): " \
                                                                           f"precision fast stays exact"
    print(f"{record['equal']} of {record['examples']} {data} predictions equal on int16; {verdict}")
    return 0
