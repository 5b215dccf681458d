"""``sensimix verify``: the KOTCA KST-21-049 V&V, end to end, with a report like the certified one."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

from .cli_common import add_glue_arguments

log = logging.getLogger(__name__)

HELP = "run the KOTCA V&V end to end (size ratio, inference time ratio, accuracy) and write the report"
DESCRIPTION = """\
Reproduce the certified V&V of SensiMix (KOTCA KST-21-049) on this machine and judge each criterion:

 1. Compression ratio <= 10%: SensiMix (a+b) pytorch_model.bin / BERT pytorch_model.bin, bytes on disk.
    The BERT folder is BertForSequenceClassification with bert-base-uncased's geometry (random weights unless
    --bert), saved like the certified folder; the SensiMix folder is `sensimix compress --max-steps 0` of it
    (quantized and packed, not trained: the size does not depend on training). model.safetensors is reported too.
 2. Inference time ratio <= 20%: SensiMix time / BERT fp32 time over the same QNLI examples (batch 128,
    max_seq_length 128), 3 trials, mean of the per-trial ratios. What is timed: the models' forward passes
    over batches already on the device, device synchronized, warm-up batches excluded (tokenization and
    host-to-device copies are not timed). Models run interleaved within each trial so machine drift cancels.
    BERT runs in fp32 as certified; SensiMix in its inference precision (--sensimix-precision: fp16 on CUDA as
    in the paper, the runtime's bf16/int8 'fast' recipe on CPU; the accuracy criterion uses the same).
    On CUDA the default is the certified 104,743 examples and an fp16 BERT is timed too (criterion 3,
    beyond the certificate, <= 20%); on CPU a small default keeps the run to a few minutes: judge ratios,
    never absolute times.
 4. Accuracy (beyond the certificate, which measured untrained models): the packaged MiniLM-L6 (or
    --accuracy-pretrained) fine-tuned on SST-2 (fp32 reference) vs SensiMix (3+3) trained from it; the gap
    in points must be <= --accuracy-max-gap and SensiMix's accuracy >= --accuracy-min (far above chance). Needs SST-2 in the GLUE folder; skipped
    with the reason otherwise. The CPU defaults train on a small subset (a smoke-sized check, not the paper's).

Data: --glue-dir / $GLUE_DIR with QNLI/dev.tsv gives real QNLI dev pairs (cycled to --examples); without it
the timing uses synthetic QNLI-shaped batches (random token ids, lengths uniform up to 128, padded to 128;
cost follows shapes and padding, not ids), and the report says so. Online, --hub-data reads QNLI dev and
SST-2 from the hub (nyu-mll/glue) instead when no GLUE folder is given.

Writes <out>/report.json, report.md, report.png (sizes and times side by side, ratios across runs) and
appends to <out>/history.jsonl. Exit status: 0 when no criterion failed (skipped ones do not count),
1 when one failed, 2 on an error.

examples:
  sensimix verify                                          # bert-base geometry, random weights, synthetic data
  GLUE_DIR=glue_data sensimix verify --device cuda         # the certified count on a GPU, plus accuracy
  sensimix verify --bert my-bert --sensimix my-sensimix    # judge folders you already have
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .kotca import SENSIMIX_PRECISIONS, add_accuracy_options  # light: `import sensimix` loaded torch already

    p.add_argument("--out", default="verify-out", help="report folder (default: %(default)s)")
    add_glue_arguments(p, folder="glue_data folder with QNLI/dev.tsv (timing) and SST-2/ (accuracy)",
                       hub_reads="QNLI dev and SST-2")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default: auto)")
    g = p.add_argument_group("models")
    g.add_argument("--bert", default="random:bert-base",
                   help="the BERT baseline: a local BERT folder, or random:bert-base (default: %(default)s)")
    g.add_argument("--sensimix", default=None,
                   help="an existing compressed SensiMix folder to judge (default: compress --bert now, no training)")
    g.add_argument("--layers", type=int, default=3, help="N = a+b layers of the SensiMix built here (default: 3)")
    g.add_argument("--8bit-layers", dest="eightbit_layers", type=int, default=2,
                   help="a = fully 8-bit layers (default: 2, the certified (2+1))")
    g.add_argument("--keep-models", default=None, metavar="DIR",
                   help="write the BERT/SensiMix folders built here to DIR and keep them (default: a temp folder)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and synthetic data")
    g = p.add_argument_group("timing (criteria 2 and 3)")
    g.add_argument("--examples", type=int, default=None,
                   help="examples per trial (default: 104,743 on CUDA as certified, 256 on CPU)")
    g.add_argument("--batch-size", type=int, default=128, help="default: %(default)s (certified)")
    g.add_argument("--max-seq-length", type=int, default=128, help="default: %(default)s (certified)")
    g.add_argument("--trials", type=int, default=3, help="default: %(default)s (certified)")
    g.add_argument("--warmup-batches", type=int, default=None,
                   help="untimed batches per model before its first trial (default: 3 on CUDA, 1 on CPU)")
    g.add_argument("--no-fp16", action="store_true", help="on CUDA, do not time the fp16 BERT baseline")
    g.add_argument("--sensimix-precision", choices=["auto", *SENSIMIX_PRECISIONS], default="auto",
                   help="SensiMix's inference precision, for timing and accuracy (default: auto = fp16 on CUDA, "
                        "the paper's; on CPU 'fast', the runtime's bf16/int8 recipe with exact 1-bit FFNs; fp32 = "
                        "the exact path)")
    g = p.add_argument_group("accuracy (criterion 4; needs SST-2 data)")
    g.add_argument("--skip-accuracy", action="store_true", help="do not train/evaluate for the accuracy criterion")
    add_accuracy_options(g.add_argument)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from . import kotca
    from .data import load_tokenizer, resolve_glue_dir
    from .evaluate import load_for_inference, resolve_device

    device = resolve_device(args.device)
    examples = args.examples or kotca.default_examples(device)
    warmup = kotca.default_warmup_batches(device) if args.warmup_batches is None else args.warmup_batches
    sm_precision = kotca.sensimix_precision(args.sensimix_precision, device)
    for name, value in (("--examples", examples), ("--batch-size", args.batch_size), ("--trials", args.trials),
                        ("--max-seq-length", args.max_seq_length)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    glue_dir = resolve_glue_dir(args.glue_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = kotca.environment(device)
    log.info("verifying on %s (%s), torch %s, CUDA %s; report in %s", device, env["device_name"], env["torch"],
             env["cuda"], out)

    # The model folders are ~0.9 GB (BERT .bin + .safetensors): a temp folder unless asked to keep them.
    keep = Path(args.keep_models) if args.keep_models else None
    with tempfile.TemporaryDirectory(prefix=".verify-work-", dir=out) as tmp:
        work = keep or Path(tmp)
        bert_dir = kotca.build_bert_folder(work / "bert", args.bert, seed=args.seed, overwrite=True)
        if args.sensimix:
            sensimix_dir = Path(args.sensimix)
        else:
            log.info("compressing %s into SensiMix (%d+%d) (quantize and export; no training)", bert_dir,
                     args.eightbit_layers, args.layers - args.eightbit_layers)
            sensimix_dir = kotca.build_sensimix_folder(bert_dir, work / "sensimix", layers=args.layers,
                                                       eightbit_layers=args.eightbit_layers, seed=args.seed,
                                                       overwrite=True)

        # criterion 1
        sizes = kotca.measure_sizes(bert_dir, sensimix_dir)
        log.info("pytorch_model.bin: BERT %.1f MB, %s %.1f MB: %.2f%%", sizes.bert_bin / 1e6,
                 sizes.sensimix_model or "SensiMix", sizes.sensimix_bin / 1e6, 100 * sizes.ratio)

        # criteria 2 and 3
        log.info("preparing %d timing examples (batch %d, max_seq_length %d)", examples, args.batch_size,
                 args.max_seq_length)
        batches, data = kotca.timing_inputs(load_tokenizer(bert_dir), glue_dir=glue_dir, num_examples=examples,
                                            batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                                            device=device, seed=args.seed, hub=args.hub_data)
        log.info("timing data: %s", data)
        models = {kotca.BERT_FP32: load_for_inference(bert_dir, device=device, precision="fp32")}
        if device.startswith("cuda") and not args.no_fp16:
            models[kotca.BERT_FP16] = load_for_inference(bert_dir, device=device, precision="fp16")
        precisions = {kotca.BERT_FP32: "fp32", kotca.BERT_FP16: "fp16", kotca.SENSIMIX: sm_precision}
        models[kotca.SENSIMIX] = load_for_inference(sensimix_dir, device=device, precision=sm_precision)
        log.info("timing %s: %d trial(s) of %d examples each", ", ".join(f"{m} ({precisions[m]})" for m in models),
                 args.trials, examples)
        timing = kotca.time_models(models, batches, trials=args.trials, device=device, warmup_batches=warmup,
                                   data=data, max_seq_length=args.max_seq_length,
                                   precisions={m: precisions[m] for m in models}, progress=not args.no_progress)
        del models, batches
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # criterion 4
    acc_settings = dataclasses.replace(kotca.accuracy_settings_from(lambda dest: getattr(args, dest), device),
                                       sensimix_precision=sm_precision)
    accuracy = None
    acc_reason = ("skipped with --skip-accuracy" if args.skip_accuracy
                  else kotca.accuracy_data_missing(glue_dir, hub=args.hub_data))
    if acc_reason is None:
        with tempfile.TemporaryDirectory(prefix=".verify-accuracy-", dir=out) as tmp:
            accuracy = kotca.measure_accuracy(glue_dir, keep / "accuracy" if keep else tmp, acc_settings,
                                              hub=args.hub_data)

    fp16_reason = "--no-fp16 was given" if args.no_fp16 and device.startswith("cuda") else None
    criteria = [kotca.size_criterion(sizes), kotca.time_criterion(timing),
                kotca.fp16_time_criterion(timing, reason=fp16_reason),
                *kotca.accuracy_criteria(accuracy, max_gap=acc_settings.max_gap,
                                         min_accuracy=acc_settings.min_accuracy, reason=acc_reason)]
    settings = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in vars(args).items() if not k.startswith("_")}
    settings.update(examples=examples, warmup_batches=warmup, device=device,
                    glue_dir=str(glue_dir) if glue_dir else None)
    report = kotca.Report(criteria=criteria, environment=env, sizes=sizes, timing=timing, accuracy=accuracy,
                          settings=settings)
    files = kotca.write_report(report, out)
    sys.stdout.write("\n" + kotca.render_markdown(report) + "\n")
    print(f"wrote {files.json}, {files.markdown}" + (f", {files.chart}" if files.chart else "")
          + f" (history: {files.history})")
    if report.failed:
        log.error("FAIL: %s", "; ".join(f"{c.id} = {c.format_value()} (needs {c.comparison} "
                                         f"{c.format_value(c.threshold)})" for c in report.failed))
    return report.exit_code
