"""``sensimix evaluate``: inference time and accuracy of a BERT or SensiMix folder, with the certified log lines."""

from __future__ import annotations

import argparse
import logging
import os

from .common import add_data_arguments, int_at_least

HELP = "time inference and score accuracy of a BERT or SensiMix folder on a GLUE task"
DESCRIPTION = """\
Run a model folder over a GLUE task and print the certified log lines (KOTCA KST-21-049):

    Num examples = N
    Batch size = B
    duration: <ms> ms
    acc = <value>

--model is a plain BERT folder (the baseline: transformers' BertForSequenceClassification) or a packed
SensiMix folder (config.json has "sensimix_format"). Examples are tokenized as the certified cached features
were: padded to --max-seq-length. --examples N larger than the split cycles through it (the certified run used
104,743 QNLI examples).

What is timed ("duration"): only the model's forward passes over all batches, plus the argmax of the logits on
the device. Tokenization and host-to-device copies happen before the clock starts (inputs are staged on the
device); --warmup-batches untimed batches run first; on CUDA the device is synchronized before starting and
after stopping the clock. Everything runs under torch.inference_mode. A model that produces NaN/inf logits is
an error (exit 2), never a score; so is a --batch-size whose forward cannot fit in the device's free memory (one
line, before the run when its smallest need is already too much, else when the allocator gives up).

Precision: fp32 is the certified baseline math (BERT: eager attention; CUDA: TF32 disabled) and, for SensiMix,
the quantization-aware model's arithmetic (exact). fp16 uses SDPA attention for BERT and fp16 GEMMs for
SensiMix. bf16 runs all activations in bf16 (approximate). fast (SensiMix only) is the fastest recipe whose
predictions agree with fp32 on trained models (a V&V criterion): the exact path itself, except on CPUs with
AVX2 for a folder whose fast_calibration.json shows that the approximate int16 8-bit kernel kept its predictions
(`sensimix calibrate`; compress writes it). SensiMix skips padded tokens in every precision (they cannot change
the logits). The BERT baseline has no fast mode: time it in fp32, as certified.

examples:
  sensimix evaluate --model out/sst2-3+3 --task sst-2 --glue-dir glue_data            # accuracy + time, SST-2 dev
  sensimix evaluate --model out/size-2+1 --synthetic --examples 256 --precision fast  # time only, no data needed
  sensimix evaluate --model bert-folder --task qnli --glue-dir glue_data --examples 104743   # the certified count
"""

PRECISIONS = ("fp32", "fp16", "bf16", "fast")  # sensimix.inference.PRECISIONS (not imported: --help stays light)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="BERT folder or packed SensiMix folder")
    add_data_arguments(p, default_task="qnli", model_task=True)
    p.add_argument("--split", default="dev", choices=["dev", "train"], help="default: %(default)s")
    p.add_argument("--examples", type=int_at_least(1), default=None, metavar="N",
                   help="examples to run (default: the whole split; with --synthetic 5,463, QNLI dev's size); "
                        "more than the split cycles through it (certified: 104743)")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="default: %(default)s (certified)")
    p.add_argument("--max-seq-length", type=int_at_least(5), default=128,
                   help="pad/truncate to this many tokens (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="activation precision (default: %(default)s, the certified math; 'fast': SensiMix's "
                        "fastest recipe within the agreement bar; see above)")
    p.add_argument("--warmup-batches", type=int_at_least(0, 1000), default=2,
                   help="untimed batches before timing, cycling through the run's (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the --model folder)")
    p.add_argument("--synthetic", action="store_true",
                   help="random QNLI-shaped inputs instead of GLUE data (times only: acc = n/a; "
                        "default: GLUE data)")
    p.add_argument("--binary-kernel", default=None,
                   help="SensiMix 1-bit kernel (default: the device's fastest exact one)")
    p.add_argument("--index8-kernel", default=None,
                   help="SensiMix 8-bit kernel (default: exact, or the fast recipe's with --precision fast; "
                        "'int16', 'int8', 'fbgemm' and 'bf16' round activations: approximate)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON (a new file, or an earlier JSON result to replace; not "
                        "inside --model)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..devices import device_name, resolve_device
    from ..io import check_json_target
    from ..sources import load_tokenizer
    from ..data import check_task_labels, resolve_task
    from ..measure import (
        check_batch_fits,
        check_examples_fit,
        check_inputs_fit,
        check_length_fits,
        is_out_of_memory,
        is_sensimix_folder,
        load_for_inference,
        make_batches,
        run_inference,
        synthetic_inputs,
        task_inputs,
    )

    if args.json is not None:  # before the run, not after it (an empty name included)
        check_json_target(args.json, "--json", reads={"--model": args.model, "--tokenizer": args.tokenizer,
                                                      "--glue-dir": args.glue_dir})
    if not args.synthetic:
        args.task = resolve_task(args.model, args.task, "qnli", "an accuracy there would mean nothing; pass its own "
                                 "task, or time it with --synthetic")
    if args.examples is not None:
        check_examples_fit(args.examples, args.max_seq_length)
    device = resolve_device(args.device)
    kind = "sensimix" if is_sensimix_folder(args.model) else "bert"
    model = load_for_inference(args.model, device=device, precision=args.precision,
                               binary_kernel=args.binary_kernel, index8_kernel=args.index8_kernel)
    check_length_fits(args.max_seq_length, model.config, args.model)
    if args.synthetic:
        count = 5463 if args.examples is None else args.examples  # QNLI dev's size
        inputs = synthetic_inputs(count, max_seq_length=args.max_seq_length, vocab_size=model.config.vocab_size)
        inputs.pop("labels", None)  # random labels: an accuracy on them would mean nothing ("acc = n/a")
        data = "synthetic"
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        inputs = task_inputs(args.task, tokenizer, glue_dir=args.glue_dir, split=args.split,
                             max_seq_length=args.max_seq_length, hub=args.hub_data)
        data = f"{args.task} {args.split}"
        check_task_labels(args.model, model.config.num_labels, args.task, "its accuracy would mean nothing; "
                          "evaluate it on its own task (or time it with --synthetic)")
    check_inputs_fit(inputs, model.config, f"{data} tokenized for {args.model}")
    available = len(inputs["input_ids"])
    if args.examples is not None and args.examples > available:
        logging.getLogger("sensimix.evaluate").info(
            "%s holds %s examples: cycling through it to run %s (the accuracy counts each repeat)", data,
            f"{available:,}", f"{args.examples:,}")
    check_batch_fits(args.batch_size, inputs, model, device, args.examples)
    batches = make_batches(inputs, batch_size=args.batch_size, num_examples=args.examples, device=device,
                           packing=kind == "sensimix" and device.startswith("cuda"))
    try:
        result = run_inference(model, batches, warmup_batches=args.warmup_batches, device=device)
    except RuntimeError as exc:  # the bound above is a lower one: the allocator may still give up
        if not is_out_of_memory(exc):
            raise
        raise ValueError(f"--batch-size {args.batch_size:,}: the forward ran out of memory on {device} "
                         f"({' '.join(str(exc).split())[:160]}); use a smaller --batch-size (certified: 128)") from None
    lines = result.log_lines()
    for line in lines:
        print(line, flush=True)
    if args.json:
        from ..io import write_json

        plan = getattr(model, "plan", None)
        write_json(args.json, {
            "num_examples": result.num_examples, "batch_size": result.batch_size,
            "duration_ms": result.duration_ms, "acc": result.accuracy, "log": lines,
            "model": os.fspath(args.model), "kind": kind, "data": data, "max_seq_length": args.max_seq_length,
            "device": device, "device_name": device_name(device), "precision": args.precision,
            "warmup_batches": args.warmup_batches, "torch": torch.__version__,
            "kernels": {"binary": plan.binary_kernel if plan else None, "index8": plan.index8_kernel if plan else None},
            "skip_padding": bool(plan and plan.skip_padding),
            "timed": "model forward passes + on-device argmax; inputs pre-staged; warm-up excluded; "
                     "device synchronized",
        })
    return 0
