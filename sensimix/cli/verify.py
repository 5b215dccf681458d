"""``sensimix verify``: the KOTCA KST-21-049 V&V, end to end, with a report like the certified one."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .common import SEED, add_glue_arguments, finite_float, int_at_least

HELP = "run the KOTCA V&V end to end (size ratio, inference time ratio, accuracy) and write the report"
DESCRIPTION = """\
Reproduce the certified V&V of SensiMix (KOTCA KST-21-049) on this machine and judge each criterion:

 1. Compression ratio <= 10%: SensiMix (a+b) pytorch_model.bin / BERT pytorch_model.bin, bytes on disk.
    The BERT folder is BertForSequenceClassification with bert-base-uncased's geometry (random weights unless
    --bert names a folder, which is measured as it is); the SensiMix folder is `sensimix compress --max-steps 0`
    of it (quantized and packed, not trained: the size does not depend on training), unless --sensimix names
    one. First proven: the BERT's pytorch_model.bin holds exactly the fp32 model of its config.json, the
    SensiMix was made from that BERT (same vocabulary, widths, heads, positions; no more layers), and
    each folder's pytorch_model.bin holds the same tensors as its model.safetensors (whose ratio is reported too).
 2. Inference time ratio <= 20%: SensiMix time / BERT fp32 time over the same QNLI examples (batch 128,
    max_seq_length 128), 3 trials, mean of the per-trial ratios. What is timed: the models' forward passes
    over batches already on the device, device synchronized, warm-up batches excluded (tokenization and
    host-to-device copies are not timed); both models are loaded from the pytorch_model.bin that criterion 1
    sizes. Models run interleaved within each trial so machine drift cancels. BERT runs in fp32 as certified;
    SensiMix in its inference precision (--sensimix-precision: the runtime's 'fast' recipe, the exact path's
    fastest kernels unless a folder's calibration passed, which an untrained one never has; fp16, the paper's GPU
    inference, by name; the accuracy criterion uses the same). On
    CUDA the default is the certified 104,743 examples; on CPU a small default keeps the run to minutes: judge
    ratios, never absolute times.
 3. fp16 time ratio (CUDA only, beyond the certificate): SensiMix / an fp16 BERT (transformers SDPA, padded, as
    users run it), timed in the same trials; a goal of <= --fp16-max-ratio, reported; it fails the run only with
    --gate-fp16.
 4-5. Accuracy (beyond the certificate, which measured untrained models): the packaged MiniLM-L6 (or
    --accuracy-pretrained) fine-tuned on SST-2 (fp32 reference) vs SensiMix (3+3) trained from it; the gap in
    points (criterion 4) must be <= --accuracy-max-gap and SensiMix's accuracy (criterion 5) >= --accuracy-min,
    far above chance (defaults below).
 6. fast vs exact: on the trained (3+3) and (2+1), the fast recipe's SST-2 dev predictions must equal the
    exact path's on >= 99.5% of the sentences, accuracies within 0.3 points. Criteria 4-6 need SST-2 in the
    GLUE folder and are skipped with the reason otherwise; the CPU defaults train on a small subset.

Data: --glue-dir / $GLUE_DIR with QNLI/dev.tsv gives real QNLI dev pairs (cycled to --examples); without it
the timing uses synthetic QNLI-shaped batches (random token ids, lengths uniform up to 128, padded to 128;
cost follows shapes and padding, not ids), and the report says so. Online, --hub-data reads QNLI dev and
SST-2 from the hub (nyu-mll/glue) instead when no GLUE folder is given.

Writes <out>/report.json, report.md, report.png (sizes and times side by side, ratios across runs) and
appends to <out>/history.jsonl. Nothing else is written unless --keep-models DIR, whose DIR/bert and
DIR/sensimix are never replaced without --overwrite. Exit status: 0 when no criterion failed (skipped ones do
not count), 1 when one failed, 2 on an error.

examples:
  sensimix verify                                          # bert-base geometry, random weights, synthetic data
  GLUE_DIR=glue_data sensimix verify --device cuda         # the certified count on a GPU, plus accuracy
  sensimix verify --bert my-bert --sensimix my-sensimix    # judge folders you already have
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..vv.accuracy import add_accuracy_options
    from ..vv.procedure import SENSIMIX_PRECISIONS

    p.add_argument("--out", default="verify-out", help="report folder (default: %(default)s)")
    add_glue_arguments(p, folder="glue_data folder with QNLI/dev.tsv (timing) and SST-2/ (accuracy)",
                       hub_reads="QNLI dev and SST-2")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default: auto)")
    g = p.add_argument_group("models")
    g.add_argument("--bert", default="random:bert-base",
                   help="the BERT baseline: a local BERT folder with pytorch_model.bin (measured as it is), or "
                        "random weights of a geometry: random:bert-base (certified) | bert-large | bert-tiny | "
                        "bert-tiny6 (default: %(default)s)")
    g.add_argument("--sensimix", default=None,
                   help="an existing compressed SensiMix folder to judge (default: compress --bert now, no training)")
    g.add_argument("--layers", type=int_at_least(1), default=None,
                   help="N = a+b layers of the SensiMix built here (default: 3; not with --sensimix)")
    g.add_argument("--8bit-layers", dest="eightbit_layers", type=int_at_least(0), default=None,
                   help="a = fully 8-bit layers (default: 2, the certified (2+1); not with --sensimix)")
    g.add_argument("--activations", choices=["fp32", "a8"], default=None,
                   help="what the 8-bit linears of the SensiMix built here read, and of the accuracy models: fp32 "
                        "activations, or a8 (8-bit activations trained in, exact integer kernels; sensimix/a8.py) "
                        "(default: fp32; not with --sensimix, whose config.json says)")
    g.add_argument("--keep-models", default=None, metavar="DIR",
                   help="write the folders built here to DIR/bert and DIR/sensimix and keep them (default: a temp "
                        "folder); existing ones are refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help="allow --keep-models to replace DIR/bert, DIR/sensimix")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the random weights and synthetic data")
    g = p.add_argument_group("timing (criteria 2 and 3)")
    g.add_argument("--examples", type=int_at_least(1), default=None,
                   help="examples per trial (default: 104,743 on CUDA as certified, 256 on CPU)")
    g.add_argument("--batch-size", type=int_at_least(1), default=128, help="default: %(default)s (certified)")
    g.add_argument("--max-seq-length", type=int_at_least(5), default=128, help="default: %(default)s (certified)")
    g.add_argument("--trials", type=int_at_least(1), default=3, help="default: %(default)s (certified)")
    g.add_argument("--warmup-batches", type=int_at_least(0), default=None,
                   help="untimed batches per model before its first trial (default: 3 on CUDA, 1 on CPU)")
    g.add_argument("--no-fp16", action="store_true", help="on CUDA, do not time the fp16 BERT baseline")
    g.add_argument("--fp16-max-ratio", type=finite_float(0, open_low=True), default=0.20,
                   help="goal of SensiMix / BERT fp16 SDPA on CUDA (default: %(default)s); reported, not gated")
    g.add_argument("--gate-fp16", action="store_true",
                   help="fail the run when SensiMix / BERT fp16 misses --fp16-max-ratio (default: report only)")
    g.add_argument("--sensimix-precision", choices=["auto", *SENSIMIX_PRECISIONS], default="auto",
                   help="SensiMix's inference precision, for timing and accuracy (default: auto = 'fast', the "
                        "exact path's fastest kernels, or int16 for a trained folder whose fast calibration "
                        "passed; fp16 = the paper's GPU inference, approximate)")
    g = p.add_argument_group("accuracy (criteria 4-6; need SST-2 data)")
    g.add_argument("--skip-accuracy", action="store_true", help="do not train/evaluate for the accuracy criteria")
    add_accuracy_options(g.add_argument)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def run(args: argparse.Namespace) -> int:
    import logging

    from ..io import check_apart, check_file_target, check_output_dir, reserve_output
    from ..vv import VVRun, VVSettings, render_markdown, write_report
    from ..vv.accuracy import accuracy_settings_from, changed_accuracy_flags
    from ..vv.report import REPORT_FILES

    log = logging.getLogger("sensimix.verify")
    if not args.out.strip():
        raise ValueError("--out is empty; name the report folder, e.g. --out verify-out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / "config.json").exists():
        raise ValueError(f"--out {out} is a model folder (it holds config.json); the report goes in a folder of its "
                         f"own, e.g. --out verify-out")
    check_apart(out, {"--bert": args.bert, "--sensimix": args.sensimix}, replaces=False)  # it only adds files
    if out.exists():
        for name in REPORT_FILES:  # found now rather than after the run
            check_file_target(out / name, "--out")
    else:
        check_output_dir(out, what="--out")  # a writable location, found now rather than after the run
    if args.sensimix and (args.layers is not None or args.eightbit_layers is not None or args.activations):
        raise ValueError(f"--layers, --8bit-layers and --activations shape the SensiMix verify builds; --sensimix "
                         f"{args.sensimix} is judged as it is (its config.json fixes its (a+b) and activations): drop "
                         f"them")
    accuracy = accuracy_settings_from(lambda dest: getattr(args, dest), args.device)  # checked even when skipped
    if args.skip_accuracy:
        moot = changed_accuracy_flags(lambda dest: getattr(args, dest))
        if moot:
            raise ValueError(f"{', '.join(moot)} set the accuracy criteria, which --skip-accuracy skips: drop "
                             f"{'them' if len(moot) > 1 else 'it'}, or --skip-accuracy")
        accuracy = None
    settings = VVSettings(
        device=args.device, examples=args.examples, trials=args.trials, warmup_batches=args.warmup_batches,
        batch_size=args.batch_size, max_seq_length=args.max_seq_length, sensimix_precision=args.sensimix_precision,
        fp16_baseline=not args.no_fp16, fp16_max_ratio=args.fp16_max_ratio, gate_fp16=args.gate_fp16,
        glue_dir=args.glue_dir,
        hub=args.hub_data, bert=args.bert, sensimix=args.sensimix,
        layers=3 if args.layers is None else args.layers,
        eightbit_layers=2 if args.eightbit_layers is None else args.eightbit_layers,
        activations=args.activations or VVSettings.activations,
        seed=args.seed, keep_models=args.keep_models, overwrite=args.overwrite,
        accuracy=accuracy, accuracy_skip_reason="skipped with --skip-accuracy" if args.skip_accuracy else None,
        progress=not args.no_progress)
    run = VVRun(settings, out)  # checks every option and folder: a refused run creates nothing
    created = not out.exists()
    # one verify per report folder at a time (two would also time each other on the same cores)
    with reserve_output(out):
        out.mkdir(parents=True, exist_ok=True)
        try:
            # The model folders are ~0.9 GB (BERT .bin + .safetensors): a temp folder unless asked to keep them.
            with tempfile.TemporaryDirectory(prefix=".verify-work-", dir=out) as tmp:
                run.workdir = Path(tmp)
                env = run.environment
                log.info("verifying on %s (%s), torch %s, CUDA %s; report in %s", run.s.device, env["device_name"],
                         env["torch"], env["cuda"], out)
                run.sizes()
                run.time_all()
                run.release_models()
                run.measure_accuracy()
                report = run.report()
            files = write_report(report, out)
        except BaseException:
            if created and not any(out.iterdir()):
                out.rmdir()  # a run that failed leaves no empty report folder behind
            raise
    sys.stdout.write("\n" + render_markdown(report) + "\n")
    print(f"wrote {files.json}, {files.markdown}" + (f", {files.chart}" if files.chart else "")
          + f" (history: {files.history})")
    if report.failed:
        log.error("FAIL: %s", "; ".join(f"{c.id} = {c.format_value()} (needs {c.comparison} "
                                         f"{c.format_value(c.threshold)})" for c in report.failed))
    return report.exit_code
