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
a fresh process holds more once it has loaded the model, one process per model (``sensimix.vv.memory.weight_memory``).

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
import fnmatch
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sensimix import kernels
from sensimix.cli.common import SEED, int_at_least
from sensimix.devices import resolve_device
from sensimix.io import check_json_target
from sensimix.quant import index8_quantize, pack_signs
from sensimix.sources import bert_config
from sensimix.vv import BERT_FP16, BERT_FP32, ModelTimer, VVRun, VVSettings
from sensimix.vv.memory import start_memory_server, weight_memory
from sensimix.vv.peers import BUCKETS, ModelSpec, export_onnx, load_model, ort_missing, quiet
from sensimix.vv.sizes import build_sensimix_folder
from sensimix.vv.timing import time_models

log = logging.getLogger("benchmark")

SCHEMA = "sensimix-benchmark/2"
SMALL_LAYERS = 3           # the peers' small geometry: the first 3 layers, as many as SensiMix (2+1) keeps
SENSIMIX_MODELS = ((3, 2), (6, 3))  # (layers, 8-bit layers): (2+1) in every precision, (3+3) exact and fast
# the like-for-like reference: every layer of the BERT, all 8-bit, exact: BERT-base's FLOPs in the packed runtime
# with padded tokens skipped, so "vs BERT with padding skipped" shows what the kernels alone buy
LIKE_FOR_LIKE = ("all", "all")
GAP_EXAMPLES = 8           # logit gaps on the first examples of the first batch (predictions: every example)
QUICK = {"batch_size": 8, "seq_len": 32, "rounds": 2}      # and one batch
DEFAULTS = {"batch_size": 64, "seq_len": 128, "rounds": 3}  # and one batch on CPU (issue 10: the first 64 QNLI
                                                             # dev pairs), 20 batches on CUDA
# issue 10's goals, computed from this run's rows: (id, model, against, at most, what)
# the benchmark's models are untrained, so their fast is exact; a trained checkpoint whose calibration passed
# (sensimix.calibration_record) runs fast on the int16 row's kernel: its goal is reported beside (CPU with AVX2 only)
GOALS = (("fast_time_vs_best_peer", "sensimix-2+1-fast", "best peer", 0.75, "time"),
         ("calibrated_fast_time_vs_best_peer", "sensimix-2+1-fp32-8bit-int16", "best peer", 0.75, "time"),
         ("exact_time_vs_bert_fp32", "sensimix-2+1-fp32", BERT_FP32, 0.12, "time"),
         ("fast_weight_memory_vs_bert_fp32", "sensimix-2+1-fast", BERT_FP32, 0.15, "memory"),
         ("exact_weight_memory_vs_bert_fp32", "sensimix-2+1-fp32", BERT_FP32, 0.15, "memory"))


class UsageError(ValueError):
    """A setting or given folder the run cannot use, found before any work: one line, exit 2."""


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
    p.add_argument("--keep-models", default=None, metavar="DIR", help="build the folders and ONNX files here, keep them")
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
        keys = row_keys()
        unmatched = [pattern for pattern in args.rows if not any(fnmatch.fnmatchcase(k, pattern) for k in keys)]
        if not args.rows:
            p.error("--rows: give at least one pattern, e.g. --rows 'bert3-ort-int8-bucketed,sensimix-2+1-*'")
        if unmatched:
            p.error(f"--rows: no row key matches {', '.join(map(repr, unmatched))}; the keys are: {', '.join(keys)}")
    return args


# ---------------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------------
def geometry_label(config: Any) -> str:
    if (config.num_hidden_layers, config.hidden_size) == (12, 768):
        return "BERT-base"
    return f"BERT {config.num_hidden_layers}L/{config.hidden_size}H"


def model_specs(bert: Path, label: str, sensimix: dict[tuple[int, int], Path], onnx: dict[str, Any],
                ort_reason: str | None, device: str, buckets: int, compiled: bool = True) -> list[ModelSpec]:
    """Every row, baseline first, then the peers (full geometry, then 3 layers), then SensiMix."""
    cuda = device.startswith("cuda")
    cpu_only = "a CPU runtime: timed in CPU runs" if cuda else None
    specs = [ModelSpec(BERT_FP32, f"{label} fp32 (certified baseline)", "baseline", "certified", str(bert),
                       attention="eager")]
    if cuda:
        specs.append(ModelSpec(BERT_FP16, f"{label} fp16 + SDPA", "peer", "certified", str(bert), "fp16",
                               reference=BERT_FP32))
    for prefix, name, layers in (("bert", label, None), (f"bert{SMALL_LAYERS}", f"{SMALL_LAYERS}-layer BERT",
                                                         SMALL_LAYERS)):
        ref = BERT_FP32 if layers is None else f"{prefix}-fp32"
        if layers is not None:
            specs.append(ModelSpec(ref, f"{name} fp32 (transformers)", "peer", "transformers", str(bert),
                                   layers=layers))
            if cuda:
                specs.append(ModelSpec(f"{prefix}-fp16", f"{name} fp16 (transformers)", "peer", "transformers",
                                       str(bert), "fp16", layers=layers, reference=ref))
        specs.append(ModelSpec(f"{prefix}-torch-int8", f"{name} torch dynamic int8", "peer", "torch-int8", str(bert),
                               "int8", layers=layers, reference=ref, skipped=cpu_only))
        for precision in ("fp32", "int8"):
            path = getattr(onnx[prefix], precision) if prefix in onnx else ""
            for bucketed in (False, True):
                specs.append(ModelSpec(
                    f"{prefix}-ort-{precision}" + ("-bucketed" if bucketed else ""),
                    f"{name} ORT {precision}, " + (f"{buckets} length buckets" if bucketed else "padded"), "peer",
                    "ort", path, precision, layers=layers, buckets=buckets if bucketed else None, reference=ref,
                    skipped=cpu_only or ort_reason))
    if LIKE_FOR_LIKE in sensimix:  # BERT's geometry and FLOPs through the packed runtime, padding skipped
        precision = "fp16" if cuda else "fp32"
        specs.append(ModelSpec(f"bert-runtime-{precision}-skip", f"{label} {precision}, padding skipped (runtime)",
                               "like-for-like", "sensimix", str(sensimix[LIKE_FOR_LIKE]), precision))
    for (layers, eightbit), folder in sensimix.items():
        if (layers, eightbit) == LIKE_FOR_LIKE:
            continue
        prefix, name = f"sensimix-{eightbit}+{layers - eightbit}", f"SensiMix ({eightbit}+{layers - eightbit})"
        variants = [("fp32", "fp32 (exact)", "fp32", None, (None, None)), ("fast", "fast", "fast", None, (None, None))]
        if (layers, eightbit) == SENSIMIX_MODELS[0]:
            variants += [("fast-padded", "fast, padding kept", "fast", False, (None, None)),
                         ("bf16", "bf16", "bf16", None, (None, None))]
            variants += kernel_variants(device)
        for key, what, precision, skip, chosen in variants:
            specs.append(ModelSpec(f"{prefix}-{key}", f"{name} {what}", "sensimix", "sensimix", str(folder),
                                   precision, skip_padding=skip, kernels=chosen,
                                   reference=None if key == "fp32" else f"{prefix}-fp32"))
        if cuda and compiled and (layers, eightbit) == SENSIMIX_MODELS[0]:  # torch.compile: compiles in its warm-up
            specs.append(ModelSpec(f"{prefix}-fp16-compiled", f"{name} fp16, torch.compile", "sensimix", "sensimix",
                                   str(folder), "fp16", compiled=True, reference=f"{prefix}-fp32"))
    return specs


def kernel_variants(device: str) -> list[tuple[str, str, str, bool | None, tuple[str | None, str | None]]]:
    """SensiMix (2+1) on each other kernel the device can run (the default plan's are timed already): on CUDA
    fp16 with every 1-bit kernel and both exact 8-bit kernels, and fp32 on ``bf16x3`` (the exact path's GEMMs on
    bf16 tensor cores); on CPU the exact path's alternatives and the approximate ``int16`` 8-bit kernel (15-bit
    activations)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():  # listing the rows of a CUDA run (tests)
        runnable, default_binary = ["fp8", "int8", "float", "xnor"], "fp8"
    else:
        runnable = [n for n, k in kernels.BINARY_KERNELS.items() if n != "reference" and k.unavailable(dev) is None
                    and (k.fast_on(dev) or n == "float")]
        default_binary = kernels.default_binary_kernel(dev)
    default_index8 = kernels.default_index8_kernel(dev)
    precision = "fp16" if dev.type == "cuda" else "fp32"
    out = [("fp16", "fp16", "fp16", None, (None, None))] if dev.type == "cuda" else []
    out += [(f"{precision}-1bit-{n}", f"{precision}, 1-bit {n}", precision, None, (n, None))
            for n in runnable if n != default_binary]
    other = "dequant" if default_index8 == "dense" else "dense"
    out.append((f"{precision}-8bit-{other}", f"{precision}, 8-bit {other}", precision, None, (None, other)))
    if kernels.INDEX8_KERNELS["int16"].unavailable(dev) is None:  # approximate: fast only when calibrated (plan.py)
        out.append((f"{precision}-8bit-int16", f"{precision}, 8-bit int16 (approximate)", precision, None,
                    (None, "int16")))
    if dev.type == "cuda" and (not torch.cuda.is_available() or kernels.INDEX8_KERNELS["bf16x3"].unavailable(dev)
                               is None):  # the exact path's fp32 GEMMs on bf16 tensor cores, fp32-grade
        out.append(("fp32-8bit-bf16x3", "fp32, 8-bit bf16x3 (bf16 tensor cores, fp32-grade)", "fp32", None,
                    (None, "bf16x3")))
    return out


def export_peers(bert: Path, root: Path, seq_len: int, fuse: bool) -> dict[str, Any]:
    """The ONNX files of the full and the 3-layer geometry (fp32, int8)."""
    exports = {}
    for prefix, layers in (("bert", None), (f"bert{SMALL_LAYERS}", SMALL_LAYERS)):
        start = time.perf_counter()
        exports[prefix] = export_onnx(bert, root / "onnx", prefix, layers=layers, seq_len=seq_len, fuse=fuse)
        log.info("ONNX %s: %s; int8 operators %s (%.0f s)", prefix, exports[prefix].note, exports[prefix].int8_ops,
                 time.perf_counter() - start)
    return exports


def first_examples(batch: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
    return {k: batch[k][:n] for k in ("input_ids", "attention_mask", "token_type_ids")}


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out).float().cpu()


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def row_keys() -> list[str]:
    """Every row key the benchmark can time, on CPU or CUDA (what ``--rows`` patterns are matched against)."""
    folders = {m: Path("-") for m in (*SENSIMIX_MODELS, LIKE_FOR_LIKE)}
    keys = [sp.key for device in ("cpu", "cuda") for sp in model_specs(Path("-"), "-", folders, {}, None, device, 1)]
    return list(dict.fromkeys(keys))


def select_rows(specs: list[ModelSpec], patterns: list[str] | None) -> list[ModelSpec]:
    """The baseline and the rows matching one of ``patterns`` (all rows without patterns)."""
    if not patterns:
        return specs
    return [sp for sp in specs if sp.key == BERT_FP32 or any(fnmatch.fnmatchcase(sp.key, p) for p in patterns)]


def build(args: argparse.Namespace, root: Path) -> tuple[VVRun, dict[tuple[int, int], Path], dict[str, Any]]:
    """The V&V run (its BERT and SensiMix (2+1) folders, batches and environment record), the SensiMix (3+3)
    folder made from the same BERT, and the ONNX files of the peers."""
    bert_source = "random:bert-tiny6" if args.quick else args.bert
    settings = VVSettings(device=args.device, examples=args.examples, trials=args.rounds,
                          warmup_batches=args.warmup, batch_size=args.batch_size, max_seq_length=args.seq_len,
                          glue_dir=args.glue_dir, bert=bert_source, layers=SENSIMIX_MODELS[0][0],
                          eightbit_layers=SENSIMIX_MODELS[0][1], seed=args.seed, keep_models=args.keep_models,
                          overwrite=True, accuracy=None, progress=not args.no_progress)
    try:  # the settings and the given folders, checked before any work
        run = VVRun(settings, root)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    s, out = run.s, Path(run.s.keep_models or root)
    bert, sensimix21 = run.folders
    sensimix = {SENSIMIX_MODELS[0]: sensimix21}
    for layers, eightbit in SENSIMIX_MODELS[1:]:
        sensimix[(layers, eightbit)] = build_sensimix_folder(
            bert, out / f"sensimix-{eightbit}+{layers - eightbit}", layers=layers, eightbit_layers=eightbit,
            seed=s.seed, overwrite=True)
    depth = bert_config(bert, allow_qat=False).num_hidden_layers
    sensimix[LIKE_FOR_LIKE] = build_sensimix_folder(bert, out / "bert-runtime", layers=depth, eightbit_layers=depth,
                                                    seed=s.seed, overwrite=True)
    _ = run.batches  # staged and checked against the model before the slow exports
    onnx = {}
    if ort_missing():
        log.warning("ONNX Runtime rows skipped: %s", ort_missing())
    elif not s.device.startswith("cuda"):
        onnx = export_peers(bert, out, s.max_seq_length, fuse=not args.no_ort_fusion)
    return run, sensimix, onnx


def run_models(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if not args.no_memory:
        start_memory_server()  # its imports overlap the building below
    run, sensimix, onnx = build(args, root)
    s, device = run.s, run.s.device
    bert = run.folders[0]
    batches, data = run.batches
    specs = select_rows(model_specs(bert, geometry_label(bert_config(bert, allow_qat=False)), sensimix, onnx,
                                    ort_missing(), device, args.buckets, compiled=args.compile), args.rows)
    runnable = [sp for sp in specs if not sp.skipped]
    memory = {}
    if not args.no_memory:
        log.info("weight memory: each model loaded in a fresh process")
        memory = weight_memory(runnable, first_examples(batches[0], 1), device=device)

    shared: dict[str, torch.nn.Module] = {}  # ONNX Runtime sessions, one per file
    timers = []
    for spec in runnable:
        try:
            with quiet():
                if spec.key in (BERT_FP32, BERT_FP16):
                    timer = run.timer(spec.key)  # the V&V run's own model, loaded as `sensimix verify` loads it
                else:
                    timer = ModelTimer(spec.key, load_model(spec, device, shared=shared), batches, device=device,
                                       warmup_batches=s.warmup_batches, precision=spec.precision)
                timer.warm_up()  # compiles, autotunes: before any round
        except Exception as exc:  # noqa: BLE001 - one row that cannot run (e.g. torch.compile here) is reported
            if spec.key == BERT_FP32:
                raise
            spec.skipped = f"failed to load or warm up: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log.warning("%s: %s", spec.name, spec.skipped)
            continue
        timers.append(timer)
        log.info("loaded %s", spec.name)
    gap_inputs = first_examples(batches[0], GAP_EXAMPLES)
    logits = {t.name: logits_of(t.model, gap_inputs) for t in timers}
    fill = float(torch.cat([b["attention_mask"].float().flatten() for b in batches]).mean())
    log.info("timing %d models: %d round(s) of %d batch(es) of %d x %d (%s; %.1f%% of tokens attended)",
             len(timers), s.trials, len(batches), s.batch_size, s.max_seq_length, data, 100 * fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        report = time_models({}, batches, trials=s.trials, device=device, timers=timers, data=data,
                             warmup_batches=s.warmup_batches, max_seq_length=s.max_seq_length,
                             progress=s.progress)
    by_key = {t.name: t for t in timers}
    rows = make_rows(specs, by_key, report.trials, len(batches), logits, memory, device)
    for row, spec in zip(rows, specs):
        if spec.runtime == "ort" and not spec.skipped:
            export = onnx[spec.key.split("-ort-")[0]]
            row.update(model_file=spec.path, onnx_fused=export.fused, onnx_note=export.note,
                       int8_ops=export.int8_ops if spec.precision == "int8" else {})
        elif spec.runtime == "sensimix" and not spec.skipped:
            model = by_key[spec.key].model
            row.update(plan=model.plan.describe(), kernels={"binary": model.binary_kernel,
                                                            "index8": model.index8_kernel})
    run.release_models()
    best = best_peer(rows)
    return {"environment": run.environment, "data": data, "attended_fraction": fill, "rows": rows,
            "best_peer": best, "goals": goals(rows, best), "timing_trials_ms": report.trials,
            "onnx": {k: v.to_dict() for k, v in onnx.items()}, "vv_settings": _plain(vars(s))}


def make_rows(specs: list[ModelSpec], timers: dict[str, ModelTimer], trials: list[dict[str, float]], n_batches: int,
              logits: dict[str, torch.Tensor], memory: dict[str, dict], device: str) -> list[dict[str, Any]]:
    base = [t[BERT_FP32] for t in trials]
    mem_key = "cuda_allocated_bytes" if device.startswith("cuda") else "weight_memory_bytes"
    base_mem = memory.get(BERT_FP32, {}).get(mem_key)
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"key": spec.key, "name": spec.name, "group": spec.group, "runtime": spec.runtime,
                               "precision": spec.precision, "layers": spec.layers, "buckets": spec.buckets,
                               "reference": spec.reference}
        if spec.skip_padding is not None:
            row["skip_padding"] = spec.skip_padding
        if spec.skipped:
            rows.append({**row, "skipped": spec.skipped})
            continue
        per_round = [t[spec.key] / n_batches for t in trials]
        row.update(ms_per_batch=statistics.median(per_round), ms_per_round=per_round,
                   ratio_vs_bert_fp32=statistics.median(t[spec.key] for t in trials) / statistics.median(base),
                   ratio_per_round=[t[spec.key] / b for t, b in zip(trials, base)],
                   accuracy=timers[spec.key].accuracy)
        mem = memory.get(spec.key, {})
        row.update(mem)
        if base_mem and isinstance(mem.get(mem_key), int):
            row["weight_memory_ratio_vs_bert_fp32"] = mem[mem_key] / base_mem
        if spec.reference in logits:  # not when --rows left the reference out
            got, want = logits[spec.key], logits[spec.reference]
            preds, ref_preds = (timers[k].results[-1].predictions for k in (spec.key, spec.reference))
            gap = (got - want).abs().max().item()
            row.update(max_abs_logit_gap=gap, relative_logit_gap=gap / max(want.abs().max().item(), 1e-12),
                       prediction_agreement=(preds == ref_preds).double().mean().item())
        rows.append(row)
    return rows


def best_peer(rows: list[dict[str, Any]]) -> str | None:
    """The fastest peer row (what a user deploys instead); every timed row gets its ratio to it."""
    peers = [r for r in rows if r["group"] in ("baseline", "peer") and "ms_per_batch" in r]
    if not peers:
        return None
    best = min(peers, key=lambda r: r["ms_per_batch"])
    for r in rows:
        if "ms_per_batch" in r:
            r["ratio_vs_best_peer"] = r["ms_per_batch"] / best["ms_per_batch"]
            r["ratio_vs_best_peer_per_round"] = [a / b for a, b in zip(r["ms_per_round"], best["ms_per_round"])]
    return best["key"]


def goals(rows: list[dict[str, Any]], best: str | None) -> list[dict[str, Any]]:
    """Issue 10's goals, from this run (informative: the V&V criteria are judged by `sensimix verify`)."""
    by_key = {r["key"]: r for r in rows}
    out = []
    for goal, model, against, limit, what in GOALS:
        row, ref = by_key.get(model, {}), by_key.get(best if against == "best peer" else against, {})
        field = "ms_per_batch" if what == "time" else next(
            (k for k in ("cuda_allocated_bytes", "weight_memory_bytes") if k in row and k in ref), None)
        value = row[field] / ref[field] if field and field in row and ref.get(field) else None
        out.append({"id": goal, "model": model, "against": ref.get("key", against), "what": what,
                    "max_ratio": limit, "ratio": value, "met": None if value is None else value <= limit})
    return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in d.items() if k != "accuracy"}


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
# GEMMs (--gemm)
# ---------------------------------------------------------------------------------------------------
def time_call(fn, reps: int, device: str) -> float:
    """Seconds per call (one warm-up call, device synchronized)."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def run_gemms(args: argparse.Namespace, device: str) -> list[dict]:
    """Per-kernel GEMM throughput for M tokens and the BERT shapes (K, N), against fp32 GEMM (CPU) or fp16 cuBLAS."""
    cuda = device.startswith("cuda")
    reps = args.gemm_reps or (50 if cuda else 2)
    dtype = torch.float16 if cuda else torch.float32
    m = args.gemm_m
    dev = torch.device(device)
    rows = []
    for k, n in ((768, 3072), (3072, 768), (768, 768)):
        first = len(rows)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g) * 0.05
        bias = torch.zeros(n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        dense = w.to(device, dtype)
        base_s = time_call(lambda: F.linear(x, dense, bias), reps, device)
        rows.append({"kernel": "fp16 cuBLAS" if cuda else "fp32 GEMM", "m": m, "k": k, "n": n, "ms": base_s * 1e3,
                     "tops": flops / base_s / 1e12, "speedup": 1.0})
        bits = pack_signs(w).to(device)
        for name, kern in kernels.BINARY_KERNELS.items():
            # the reference is for tests; fp8 on CPU is oneDNN emulation (seconds per call)
            if name == "reference" or kern.unavailable(dev) or (name == "fp8" and not cuda):
                continue
            wk = kern.prepare_weight(bits, k)
            xs = kern.binarize(x, k)
            gemm_s = time_call(lambda: kern.dot(xs, wk, k), reps, device)
            layer_s = time_call(lambda: kern.linear(x, wk, bias.float(), k, dtype), reps, device)
            rows.append({"kernel": f"1-bit {name}", "m": m, "k": k, "n": n, "ms": gemm_s * 1e3,
                         "tops": flops / gemm_s / 1e12, "speedup": base_s / gemm_s, "layer_ms": layer_s * 1e3})
        q, lo, hi = index8_quantize(w)
        weight_range = torch.stack([lo, hi]).to(torch.float16).to(device)
        for name, kern in kernels.INDEX8_KERNELS.items():
            if name == "reference" or kern.unavailable(dev):
                continue
            prepared = kern.prepare([(q.to(device), weight_range, bias)], dtype)
            s = time_call(lambda: kern.linear(x, prepared), reps, device)
            rows.append({"kernel": f"8-bit {name}" + ("" if kern.exact else " (approx.)"), "m": m, "k": k, "n": n,
                         "ms": s * 1e3, "tops": flops / s / 1e12, "speedup": base_s / s})
        for r in rows[first:]:
            log.info("GEMM %-28s M=%d K=%-4d N=%-4d %9.2f ms %8.2f TOPS %5.2fx", r["kernel"], m, k, n, r["ms"],
                     r["tops"], r["speedup"])
    return rows


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="sensimix-benchmark-") as tmp:
        try:
            results: dict[str, Any] = {"schema": SCHEMA, **run_models(args, Path(tmp))}
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
        results["gemm"] = run_gemms(args, env["device"])
    env["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["wall_s"] = time.perf_counter() - start
    if args.json:
        from sensimix.io import write_json

        write_json(args.json, results)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
