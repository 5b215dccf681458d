"""``sensimix calibrate``: measure whether precision "fast" may round this checkpoint's 8-bit activations."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_data_arguments, int_at_least

HELP = "measure whether precision fast may use the approximate int16 8-bit kernel for a SensiMix folder"
DESCRIPTION = """\
Run a packed SensiMix folder over a GLUE split twice on this CPU -- the exact path, and the approximate int16
8-bit kernel (activations of the 8-bit linears rounded per row to 15-bit integers) -- and write the verdict into
the folder as fast_calibration.json. It passes with at least 200 examples, >= 99.5% of the predictions equal and
the accuracy within 0.3 points (the bar of the acceptance suite's fast_agreement). From then on
from_pretrained(folder, precision="fast") uses int16 on CPUs with AVX2; with no record, a failed one or a record
of other weights, fast runs the exact path.

Which examples (--split): "auto" (the default) takes the N longest train examples the model never saw when its
training_metrics.json says compress trained it on a seeded subset of this task's train split (--train-limit)
leaving at least 200 out, else the dev split; "held-out" insists on the former, "dev" and "train" take the first N
examples of that split. Held out means held out of the very data it was trained on: the train split given must
hold the examples training_metrics.json records (same examples, same order: its train_data digests), and examples
whose text was trained on under another row are left out. A folder written before that record, or given another
train file (a copy in another order, rows added), is calibrated on dev with a warning ("held-out" is refused). Held-out examples keep the dev split independent evidence: pytest acceptance and sensimix
verify judge fast against the exact path there. The longest, because rounding acts on every token: a split of short
phrases (SST-2's train) would understate the changes longer inputs see. --task defaults to the task the folder was
trained on (its training_metrics.json); another is refused.

`sensimix compress` does this after training, choosing as "auto" does (--no-fast-calibration skips it); run this
command for folders written without it, or to measure on other data. The record is tied to the weights by
config.json's checksum; the folder is locked while it is measured, and only that one file is written.

examples:
  sensimix calibrate --model out/sst2-2+1 --glue-dir glue_data
  sensimix calibrate --model out/qnli-2+1 --task qnli --glue-dir glue_data --split dev --examples 2000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packed SensiMix folder (written by compress or export)")
    add_data_arguments(p, model_task=True)
    p.add_argument("--split", default="auto", choices=["auto", "held-out", "dev", "train"],
                   help="which examples (above; default: %(default)s)")
    p.add_argument("--examples", type=int_at_least(200), default=4096, metavar="N",
                   help="measure on at most N examples of the split (default: %(default)s; at least 200, the fewest "
                        "a verdict takes)")
    p.add_argument("--max-seq-length", type=int_at_least(5), default=128,
                   help="pad/truncate to this many tokens, as in training (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..calibration_record import RECORD
    from ..train.calibrate import calibrate, calibration_examples, trained_on
    from ..checkpoint import read_config
    from ..io import check_file_target
    from ..sources import load_tokenizer
    from ..data import check_task_labels, load_glue, resolve_task
    from ..measure import check_inputs_fit, check_length_fits, examples_inputs

    config = read_config(args.model)  # a packed folder, before any data is read
    if config.a8:
        raise ValueError(f"{args.model} is an A8 checkpoint (8-bit activations trained in): its fast plan is its "
                         f"exact integer kernels already, so there is nothing to calibrate")
    args.task = resolve_task(args.model, args.task, "sst-2", "a verdict there would say nothing of the predictions "
                             "it makes: pass its own task")
    check_task_labels(args.model, config.num_labels, args.task, "calibrate it on its own task")
    check_length_fits(args.max_seq_length, config, args.model)
    if args.split in ("auto", "held-out"):  # held out only of the very train split it was trained on
        examples, data, _ = calibration_examples(args.task, args.glue_dir, trained=trained_on(args.model, args.task),
                                                 hub=args.hub_data, count=args.examples,
                                                 held_out_only=args.split == "held-out", model=args.model)
    else:
        examples = load_glue(args.task, args.split, args.glue_dir, hub=args.hub_data)
        data = f"{args.task} {args.split}"
    inputs = examples_inputs(examples, load_tokenizer(args.model), args.max_seq_length)
    check_inputs_fit(inputs, config, f"{data} tokenized for {args.model}")
    check_file_target(Path(args.model) / RECORD, "the calibration record")  # before the measuring
    record = calibrate(args.model, inputs, data=data, max_examples=args.examples)
    if record is None:
        print("not calibrated: this CPU cannot run the int16 kernel (see the log); precision fast stays exact")
        return 0
    verdict = "PASSED: precision fast uses int16" if record["passed"] else f"FAILED ({record['reason']}): " \
                                                                           f"precision fast stays exact"
    print(f"{record['equal']} of {record['examples']} {data} predictions equal on int16; {verdict}")
    return 0
