#!/usr/bin/env python
"""Inference benchmark (not a test): SensiMix beside the certified baseline and beside what a CPU user deploys
instead, timed in one interleaved run. See docs/benchmark.md for how to read the table.

Rows (random weights; SensiMix compressed from the same BERT without training):

* BERT-base fp32, transformers, eager attention: the certified baseline (the V&V run's folder and loader);
* peers of BERT-base and of its first 3 layers (the geometry of SensiMix (2+1)): transformers fp32 (SDPA; the
  3-layer one only), PyTorch dynamic int8, ONNX Runtime fp32 and int8 (fused by ONNX Runtime's BERT optimizer,
  dynamic int8 quantization), each ONNX Runtime model fed padded batches and length-bucketed ones (4 buckets by
  attended length, each cut to its longest); on CUDA BERT fp16 + SDPA instead of the CPU-only runtimes;
* SensiMix (2+1) in every precision (fp32 exact, fast, fast with padding kept, bf16; fp16 on CUDA) and SensiMix
  (3+3) fp32 and fast, each with its logit gap and prediction agreement against its exact path.

Data: the first ``--examples`` QNLI dev pairs when $GLUE_DIR (or ``--glue-dir``) holds QNLI/dev.tsv, else
synthetic QNLI-shaped pairs; padded to ``--seq-len`` like the certified features.

Timing: ``sensimix.vv.timing.time_models``, the V&V's interleaved trials: every model runs over the same batches
once per round, models one after another within a round, and the median round is reported, so that load from
other processes hits all models alike; compare the ratios within one run, not absolute times. Weight memory: what
a fresh process holds more once it has loaded the model, one process per model
(``sensimix.bench.memory.weight_memory``).

This script parses the options, prints the table and writes the JSON; the rows (``sensimix.bench.rows``), the run
(``sensimix.bench.run``), the arithmetic (``sensimix.bench.results``) and the GEMM timing (``sensimix.bench.gemm``)
live in the package.

Usage::

    python scripts/benchmark.py --json benchmarks/benchmark-cpu-<machine>.json   # issue 10's table (CPU)
    python scripts/benchmark.py --quick --json /tmp/quick.json                   # every row, small model, ~1 min
    python scripts/benchmark.py --device cuda --json benchmark-h100.json         # + per-kernel GEMMs

On CPU, ``THP_MEM_ALLOC_ENABLE=1`` (a PyTorch setting: 2 MB transparent huge pages for large CPU tensors) removes
most page-fault cost of large temporaries for every torch model in the process; the JSON records whether it was
set. The ONNX Runtime rows need ``pip install 'sensimix[bench]'``; without it they are listed as skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sensimix import kernels
from sensimix.bench.gemm import run_gemms
from sensimix.bench.peers import BUCKETS, ort_missing
from sensimix.bench.results import SCHEMA
from sensimix.bench.rows import row_keys, unmatched_patterns
from sensimix.bench.run import BenchSettings, UsageError, run_models
from sensimix.cli.common import SEED, int_at_least
from sensimix.devices import resolve_device
from sensimix.io import check_json_target, write_json

log = logging.getLogger("benchmark")

QUICK_BERT = "random:bert-tiny6"  # --quick: a 6-layer BERT of bert-tiny's width
QUICK = {"batch_size": 8, "seq_len": 32, "rounds": 2}      # and one batch
DEFAULTS = {"batch_size": 64, "seq_len": 128, "rounds": 3}  # and one batch on CPU (issue 10: the first 64 QNLI
                                                             # dev pairs), 20 batches on CUDA


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--bert", default="random:bert-base",
                   help="the BERT every row starts from: random:<geometry> or a BERT folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a 6-layer BERT of bert-tiny's width, batch 8 x 32, 2 rounds: every row in seconds (tests)")
    p.add_argument("--examples", type=int_at_least(1), default=None,
                   help="examples per round (default: one batch on CPU, 20 batches on CUDA)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="default: 64 (quick: 8)")
    p.add_argument("--seq-len", type=int_at_least(5, 512), default=None,
                   help="padded sequence length (default: 128; quick: 32)")
    p.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="interleaved timing rounds; the median is reported (default: 3; quick: 2)")
    p.add_argument("--warmup", type=int_at_least(0, 1000), default=None,
                   help="untimed batches per model (default: 1 CPU, 3 CUDA)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch.set_num_threads, also ONNX Runtime's threads")
    p.add_argument("--glue-dir", default=None, help="glue_data folder with QNLI/dev.tsv (default: $GLUE_DIR)")
    p.add_argument("--buckets", type=int_at_least(1), default=BUCKETS,
                   help="length buckets of the bucketed rows (default: 4)")
    p.add_argument("--no-ort-fusion", action="store_true",
                   help="time the plain ONNX export (no ONNX Runtime BERT fusion) for the ORT rows")
    p.add_argument("--no-memory", action="store_true", help="skip the weight-memory measurement")
    p.add_argument("--keep-models", default=None, metavar="DIR",
                   help="build the folders and ONNX files here, keep them")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--gemm", action=argparse.BooleanOptionalAction, default=None,
                   help="also time each kernel's GEMM at the BERT shapes (default: on CUDA only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, also time SensiMix (2+1) fp16 under torch.compile (it compiles in its warm-up: "
                        "~100 s on an H200 machine)")
    p.add_argument("--gemm-m", type=int_at_least(1), default=16384,
                   help="rows of the GEMM benchmark (default: 128 x 128)")
    p.add_argument("--gemm-reps", type=int_at_least(1), default=None,
                   help="timed calls per GEMM (default: 2 CPU, 50 CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rows", default=None, metavar="PATTERNS",
                   help="time only the rows whose keys match these comma-separated shell patterns (the baseline "
                        "bert-fp32 always runs: every %% is relative to it; a row whose reference is left out gets "
                        "no logit gap), e.g. "
                        "'bert3-ort-int8-bucketed,sensimix-2+1-*' to repeat one comparison quickly")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row, the machine and the settings")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        cuda = resolve_device(args.device).startswith("cuda")
    except ValueError as exc:
        p.error(str(exc))
    if args.examples is None:  # on CUDA a batch takes milliseconds: 20 per round
        args.examples = args.batch_size * (20 if cuda and not args.quick else 1)
    if args.gemm is None:
        args.gemm = cuda and not args.quick
    if args.quick and args.bert != p.get_default("bert"):
        p.error("--quick times its own 6-layer BERT of bert-tiny's width: drop --bert, or --quick")
    if args.json is not None:  # before the run: a bad path must not cost the results
        try:
            check_json_target(args.json, "--json", reads={"--bert": args.bert, "--glue-dir": args.glue_dir,
                                                          "--keep-models": args.keep_models})
        except ValueError as exc:
            p.error(str(exc))
    if args.rows is not None:
        args.rows = [pattern.strip() for pattern in args.rows.split(",") if pattern.strip()]
        if not args.rows:
            p.error("--rows: give at least one pattern, e.g. --rows 'bert3-ort-int8-bucketed,sensimix-2+1-*'")
        unmatched = unmatched_patterns(args.rows)
        if unmatched:
            p.error(f"--rows: no row key matches {', '.join(map(repr, unmatched))}; "
                    f"the keys are: {', '.join(row_keys())}")
    return args


def settings_of(args: argparse.Namespace) -> BenchSettings:
    """The run's settings from the parsed options."""
    return BenchSettings(device=args.device, bert=QUICK_BERT if args.quick else args.bert, examples=args.examples,
                         batch_size=args.batch_size, seq_len=args.seq_len, rounds=args.rounds, warmup=args.warmup,
                         glue_dir=args.glue_dir, buckets=args.buckets, ort_fusion=not args.no_ort_fusion,
                         memory=not args.no_memory, keep_models=args.keep_models, seed=args.seed,
                         compile=args.compile, progress=not args.no_progress,
                         rows=None if args.rows is None else tuple(args.rows))


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------
def print_table(results: dict[str, Any]) -> None:
    rows = results["rows"]
    width = max(len(r["name"]) for r in rows) + 2
    rounds = {r["key"]: " / ".join(f"{100 * x:.1f}" for x in r.get("ratio_per_round", ())) for r in rows}
    rw = max(24, max(len(v) for v in rounds.values()) + 2)  # as wide as the most rounds need
    print(f"\n{results['data']}; {100 * results['attended_fraction']:.1f}% of tokens attended")
    print(f"{'model':<{width}}{'ms/batch':>10}{'% BERT fp32':>13}{'x best peer':>13}{'% per round':>{rw}}"
          f"{'memory MiB':>12}{'% mem':>8}{'logit gap':>11}{'agree':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['name']:<{width}}skipped: {r['skipped']}")
            continue
        mem = r.get("cuda_allocated_bytes", r.get("weight_memory_bytes"))
        mem_ratio = r.get("weight_memory_ratio_vs_bert_fp32")
        line = (f"{r['name']:<{width}}{r['ms_per_batch']:>10.1f}{100 * r['ratio_vs_bert_fp32']:>12.1f}%"
                f"{r.get('ratio_vs_best_peer', float('nan')):>13.2f}"
                f"{rounds[r['key']]:>{rw}}"
                f"{'' if mem is None else f'{mem / 2**20:.1f}':>12}"
                f"{'' if mem_ratio is None else f'{100 * mem_ratio:.1f}%':>8}")
        if "relative_logit_gap" in r:
            line += f"{r['relative_logit_gap']:>11.1e}{100 * r['prediction_agreement']:>7.1f}%"
        print(line)
    among = " (among the rows chosen with --rows)" if results.get("settings", {}).get("rows") else ""
    print(f"best peer{among}: {next((r['name'] for r in rows if r['key'] == results['best_peer']), 'none')}")
    like = next((r for r in rows if r["group"] == "like-for-like" and "ms_per_batch" in r), None)
    if like is not None:  # what the kernels buy beyond skipping padding (BERT's FLOPs, padding skipped too)
        print(f"like for like ({like['name']}: {100 * like['ratio_vs_bert_fp32']:.1f}% of BERT fp32): " + ", ".join(
            f"{r['name']} {r['ms_per_batch'] / like['ms_per_batch']:.3f}" for r in rows
            if r["group"] == "sensimix" and "ms_per_batch" in r and r["key"].endswith(("-fp32", "-fast", "-fp16"))))
    for g in results["goals"]:
        value = "n/a" if g["ratio"] is None else f"{g['ratio']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        print(f"goal {g['id']}: {g['model']} / {g['against']} = {value} (<= {g['max_ratio']}): {verdict}")


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="sensimix-benchmark-") as tmp:
        try:
            results: dict[str, Any] = {"schema": SCHEMA, **run_models(settings_of(args), Path(tmp))}
        except UsageError as exc:
            print(f"benchmark.py: error: {exc}", file=sys.stderr)
            return 2
    env = results["environment"]
    env.update(THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE"),
               quantized_engine=str(kernels.quantized_engine()), load_average_at_start=load_start)
    if not ort_missing():
        import onnx
        import onnxruntime

        env.update(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__)
    results["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    if not env["device"].startswith("cuda"):
        results["caveat"] = ("CPU timings on a shared machine: other processes may compete for the cores (see the "
                             "load averages); models are interleaved per round and ratios within one run are the "
                             "meaningful numbers")
    print_table(results)
    if args.gemm:
        results["gemm"] = run_gemms(env["device"], args.gemm_m, args.gemm_reps)
    env["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["wall_s"] = time.perf_counter() - start
    if args.json:
        write_json(args.json, results)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
