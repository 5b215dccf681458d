"""Running the GLUE table: each run fine-tunes (or reuses) its fp32 reference, compresses SensiMix from it (or cuts
and quantizes an int8 peer from it: :mod:`.int8`), scores the saved folder on the dev split through the packed
inference runtime (fp32 exact path; the peers through ONNX Runtime) and appends its line.

The reference of a (task, seed, protocol) lives in the work folder and is reused by every later run and session
once verified (:func:`reference_problem`: its task, settings, pre-trained source and training data are the ones
asked for now); SensiMix folders are scored and deleted (``keep_models`` keeps them).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...data import METRICS_FILE, load_glue, recorded_task, task_file
from ...io import file_sha256, read_json, reserve_output
from ...vv.accuracy import evaluate_folder, parse_split
from ..parity import parity
from . import int8
from .metrics import glue_metrics
from .plans import MODEL_TITLES, REFERENCE, Protocol, RunSpec, depth, record_key, spec_key
from .results import Loaded, append_result, read_results

log = logging.getLogger(__name__)

EVAL_PRECISION = "fp32"  # the exact path: what the table scores (fast's kernels are a deploy-time choice)
NOT_IN_KEY = ("device", "logging_steps", "dataloader_workers", "extra")  # settings that do not change a model


@dataclass
class Context:
    """What every run of one session shares."""

    glue_dir: Path
    work: Path
    device: str
    pretrained: str                     # the folder the references are fine-tuned from
    protocols: dict[str, Protocol]      # task -> protocol
    machine: dict[str, Any]             # sensimix.vv.procedure.environment(device)
    keep_models: bool = False
    _inputs: dict[str, dict] = field(default_factory=dict)
    _verified: dict[Path, str] = field(default_factory=dict)  # reference folder -> its weights' sha256

    def reference_folder(self, task: str, seed: int) -> Path:
        settings = _semantic(self.protocols[task].settings(RunSpec(task, seed, REFERENCE), self.device).as_dict())
        digest = hashlib.sha256(json.dumps([task, self.protocols[task].pretrained, settings],
                                           sort_keys=True).encode()).hexdigest()[:12]
        return self.work / "references" / f"{task}-seed{seed}-{digest}"

    def inputs(self, task: str, tokenizer_folder: Path) -> dict:
        if task not in self._inputs:
            from ...measure import task_inputs
            from ...sources import load_tokenizer

            self._inputs[task] = task_inputs(task, load_tokenizer(tokenizer_folder), glue_dir=self.glue_dir,
                                             split="dev", max_seq_length=self.protocols[task].max_seq_length)
        return self._inputs[task]


def _semantic(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in NOT_IN_KEY}



def reference_problem(folder: Path, spec: RunSpec, ctx: Context) -> str | None:
    """Why ``folder`` is not the reference ``spec`` asks for (None: it is, and may be reused untrained)."""
    from ...train.provenance import FIELD, differs, record_problem

    missing = [n for n in ("config.json", "pytorch_model.bin", METRICS_FILE) if not (folder / n).is_file()]
    if missing:
        return f"it lacks {', '.join(missing)}"
    try:
        metrics = read_json(folder / METRICS_FILE, what="training metrics")
    except (OSError, ValueError) as exc:
        return str(exc)
    if recorded_task(metrics) != spec.task:
        return f"it was fine-tuned on {metrics.get('task')!r}, not {spec.task}"
    if metrics.get("bert") != str(ctx.pretrained):
        return f"it was fine-tuned from {metrics.get('bert')!r}, not {ctx.pretrained}"
    want = _semantic(ctx.protocols[spec.task].settings(spec, ctx.device).as_dict())
    got = _semantic(metrics.get("settings") or {})
    changed = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if changed:
        return f"its training settings differ ({', '.join(changed)})"
    record = metrics.get(FIELD)
    problem = record_problem(record) or differs(record, load_glue(spec.task, "train", ctx.glue_dir))
    return f"its training data differ: {problem}" if problem else None


def ensure_reference(spec: RunSpec, ctx: Context, out: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The verified reference folder of ``spec``'s (task, seed), fine-tuned now when missing or not the one asked
    for; and what the record says about it."""
    from ...train import finetune

    ref = RunSpec(spec.task, spec.seed, REFERENCE)
    folder = ctx.reference_folder(spec.task, spec.seed)
    if folder in ctx._verified:
        return folder, {"folder": str(folder), "pytorch_model_sha256": ctx._verified[folder], "reused": True}
    problem = reference_problem(folder, ref, ctx) if folder.exists() else "none yet"
    info: dict[str, Any] = {"folder": str(folder), "reused": problem is None}
    if problem is not None:
        if folder.exists():
            out(f"  the reference in {folder} is not reusable ({problem}): fine-tuning it again")
        start = time.perf_counter()
        finetune(ctx.pretrained, spec.task, folder, glue_dir=ctx.glue_dir, overwrite=folder.exists(),
                 settings=ctx.protocols[spec.task].settings(ref, ctx.device))
        info["train_wall_s"] = round(time.perf_counter() - start, 1)
    ctx._verified[folder] = info["pytorch_model_sha256"] = file_sha256(folder / "pytorch_model.bin")
    return folder, info


def execute(spec: RunSpec, ctx: Context, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and score one run; its record (the results file's line, without the schema)."""
    from ...train import compress

    protocol = ctx.protocols[spec.task]
    settings = protocol.settings(spec, ctx.device)
    start = time.perf_counter()
    reference, ref_info = ensure_reference(spec, ctx, out)
    if not spec.is_reference:  # a run's time is its own: the reference's training is the reference's
        start = time.perf_counter()
    qat, fp32_folder = None, None
    folder = (ctx.work / "models" /  # the protocol too: a kept folder of an older protocol is never overwritten
              f"{spec.task}-{spec.model}-{spec.activations}-{spec.ablation}-seed{spec.seed}-{protocol.digest}")
    if spec.is_reference:
        folder, train_wall = reference, ref_info.get("train_wall_s")
        training = read_json(folder / METRICS_FILE, what="training metrics")
    elif spec.is_int8_peer:
        fp32_folder, training, train_wall = int8.prepare(reference, depth(spec.model), spec.task, settings,
                                                         ctx.glue_dir, folder)
        if training is None:  # the reference as it is: nothing trained, nothing to record as this run's settings
            settings, training = None, {"note": "the fp32 reference itself (its depth): quantized, not trained"}
    else:
        layers, eightbit = parse_split(spec.model)
        t = time.perf_counter()
        teacher = reference if settings.distill else None
        trained = compress(reference, spec.task, folder, glue_dir=ctx.glue_dir, layers=layers,
                           eightbit_layers=eightbit, settings=settings, teacher=teacher, overwrite=folder.exists(),
                           activations=spec.activations)
        training, qat = trained.metrics, trained.model
        train_wall = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    inputs = ctx.inputs(spec.task, reference)
    fp32_metrics = None
    if fp32_folder is not None:  # scored through ONNX Runtime int8; its fp32 model's score says what int8 cost
        _, fp32_result = evaluate_folder(fp32_folder, inputs, ctx.device, EVAL_PRECISION)
        fp32_metrics = glue_metrics(spec.task, fp32_result.predictions.tolist(), inputs["labels"].tolist())
        result, eval_info, size = int8.score(fp32_folder, inputs, protocol.max_seq_length, folder)
        eval_info["fp32_folder"] = "the reference" if fp32_folder == reference else "distilled from the reference"
    else:
        model, result = evaluate_folder(folder, inputs, ctx.device, EVAL_PRECISION)
        packed = hasattr(model, "plan")
        eval_info = {"runtime": "sensimix packed inference runtime" if packed else "transformers",
                     "precision": EVAL_PRECISION,
                     "plan": model.plan.describe() if packed else "transformers BERT, fp32, eager attention"}
        size = (folder / "pytorch_model.bin").stat().st_size
    eval_wall = round(time.perf_counter() - t, 1)
    parity_record = None
    if qat is not None:  # issue 24's parity: the deployed folder against the model as trained, on dev
        parity_record = parity(qat, folder, inputs, device=ctx.device)
        parity_record.pop("plan", None)
    if not spec.is_reference and not ctx.keep_models:
        shutil.rmtree(folder, ignore_errors=True)
    kept = spec.is_reference or (ctx.keep_models and folder.exists())
    return {
        "task": spec.task, "model": spec.model, "model_title": MODEL_TITLES[spec.model],
        "activations": spec.activations, "ablation": spec.ablation, "seed": spec.seed,
        "metrics": glue_metrics(spec.task, result.predictions.tolist(), inputs["labels"].tolist()),
        **({"fp32_metrics": fp32_metrics} if fp32_metrics is not None else {}),
        "dev_examples": result.num_examples, "train_examples": (training or {}).get("train_examples"),
        "model_bytes": size, **({"model_file": eval_info["file"]} if "file" in eval_info else {}),
        "protocol_digest": protocol.digest, "protocol": protocol.as_dict(),
        "settings": settings.as_dict() if settings is not None else None, "pretrained_folder": str(ctx.pretrained),
        "wall_s": round(time.perf_counter() - start, 1), "train_wall_s": train_wall, "eval_wall_s": eval_wall,
        "eval": {"split": "dev", "max_seq_length": protocol.max_seq_length, "device": ctx.device} | eval_info,
        "reference": ref_info,
        "parity": parity_record,
        "training": {k: training.get(k) for k in ("train_loss", "train_steps", "train_examples", "eval_accuracy",
                                                  "schedule", "world_size", "note") if k in training},
        "train_data": training.get("train_data"),
        "folder": str(folder) if kept else None,
        "machine": ctx.machine,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------
# progress and the time left
# ---------------------------------------------------------------------------------------------------
def estimate_left(pending: list[RunSpec], records: list[dict[str, Any]],
                  protocols: dict[str, Protocol]) -> tuple[float | None, int]:
    """(seconds, how many of ``pending`` were estimated from done runs of their own kind) from the wall times of
    the runs done so far: a run takes the mean of done runs of its task, model, activations and protocol; else of its
    task and protocol; else of all. A reference reused from the work folder (no training in its time) is left out.
    None before any run is done."""
    own: dict[tuple, list[float]] = {}
    same_task: dict[tuple, list[float]] = {}
    every: list[float] = []
    for r in records:
        wall = r.get("wall_s")
        reused = r["model"] == REFERENCE and (r.get("reference") or {}).get("reused")
        if not isinstance(wall, (int, float)) or reused:
            continue
        own.setdefault((r["task"], r["model"], r["activations"], r["protocol_digest"]), []).append(wall)
        same_task.setdefault((r["task"], r["protocol_digest"]), []).append(wall)
        every.append(wall)
    if not every:
        return (0.0 if not pending else None), 0
    seconds, exact = 0.0, 0
    for spec in pending:
        digest = protocols[spec.task].digest
        walls = own.get((spec.task, spec.model, spec.activations, digest))
        exact += walls is not None
        seconds += statistics.fmean(walls or same_task.get((spec.task, digest)) or every)
    return seconds, exact


def duration(seconds: float | None) -> str:
    """``3h05m`` / ``12m30s`` / ``45s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _scores(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {100 * v:.2f}" for k, v in record["metrics"].items() if v is not None)


@dataclass
class Outcome:
    ran: int = 0
    skipped: int = 0          # already in the results file
    failed: list[str] = field(default_factory=list)
    left: int = 0             # not started (--max-runs)


def run_all(runs: list[RunSpec], ctx: Context, results: Path, *,
            execute: Callable[..., dict[str, Any]] = execute, out: Callable[[str], None] = print,
            max_runs: int | None = None, keep_going: bool = False) -> Outcome:
    """Run every run of ``runs`` not yet in the results file, one line each, with a progress bar and the time left.
    The results file and the work folder are locked for the whole session, and the file is read once the lock is
    held (a session that ended just before wrote its last line first)."""
    with reserve_output(results), reserve_output(ctx.work):
        return _run_locked(runs, ctx, results, read_results(results), execute, out, max_runs, keep_going)


def check_done(runs: list[RunSpec], records: list[dict[str, Any]], protocols: dict[str, Protocol], device: str,
               glue_dir: Path, results: Path) -> None:
    """Refuse (one line) to count a line of ``records`` as done when it is not what ``runs`` would run now: the
    protocol digest names the table's knobs only, so a line trained on another device kind, with another recipe
    (a changed default: warmup, weight decay, ABWR coefficient, epochs) or from another copy of the train file
    would otherwise be skipped and averaged with the new runs."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    other = sorted({str((r.get("eval") or {}).get("device", "cpu")).split(":")[0] for r in records} - {kind})
    if other:
        raise ValueError(f"--results {results} holds runs on {other[0]}; this session runs on {kind}: one table per "
                         f"machine kind, so choose another --results")
    train_sha: dict[str, str] = {}
    by_key = {record_key(r): r for r in records}
    for spec in runs:
        record = by_key.get(spec_key(spec, protocols[spec.task]))
        if record is None:
            continue
        got = record.get("settings")
        if isinstance(got, dict):  # None: an int8 peer that is the reference as it is, nothing trained
            want = protocols[spec.task].settings(spec, device).as_dict()
            changed = sorted(k for k in want.keys() & got.keys() if k not in NOT_IN_KEY and want[k] != got[k])
            if changed:
                raise ValueError(f"--results {results}: its line for {spec.label} was trained with another "
                                 f"{', '.join(changed)} than this version trains with: the recipe changed since, so "
                                 f"start a new --results (and --work) for it")
        sha = (record.get("train_data") or {}).get("sha256")
        if sha is not None:
            if spec.task not in train_sha:
                train_sha[spec.task] = file_sha256(task_file(spec.task, "train", glue_dir))
            if sha != train_sha[spec.task]:
                raise ValueError(f"--results {results}: its line for {spec.label} was trained on another "
                                 f"{spec.task} train file than {task_file(spec.task, 'train', glue_dir)}: pass the "
                                 f"--glue-dir those lines used, or start a new --results")


def _run_locked(runs: list[RunSpec], ctx: Context, results: Path, loaded: Loaded,
                execute: Callable[..., dict[str, Any]], out: Callable[[str], None], max_runs: int | None,
                keep_going: bool) -> Outcome:
    check_done(runs, loaded.records, ctx.protocols, ctx.device, ctx.glue_dir, results)
    done = {record_key(r) for r in loaded.records}
    pending = [r for r in runs if spec_key(r, ctx.protocols[r.task]) not in done]
    outcome = Outcome(skipped=len(runs) - len(pending))
    if loaded.truncated:
        out(loaded.truncated)
    seconds, _ = estimate_left(pending, loaded.records, ctx.protocols)
    out(f"{len(runs)} runs in the plan: {outcome.skipped} already in {results}, {len(pending)} to run "
        f"(time left ~{duration(seconds)}{'' if seconds is not None else ': known after the first run'})")
    todo = pending if max_runs is None else pending[:max_runs]
    outcome.left = len(pending) - len(todo)
    ctx.work.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(todo):
        out(f"{bar(outcome.skipped + i, len(runs))} starting {spec.label}")
        try:
            record = execute(spec, ctx, out)
        except Exception as exc:  # noqa: BLE001 - one failed run need not stop days of others (--keep-going)
            out(f"  FAILED {spec.label}: {type(exc).__name__}: {exc} (nothing recorded; it runs again next time)")
            if not keep_going:
                raise
            outcome.failed.append(f"{spec.label}: {type(exc).__name__}: {exc}")
            continue
        append_result(results, loaded, record)
        outcome.ran += 1
        rest = pending[i + 1:]  # the whole plan's: --max-runs only ends this session earlier
        left, exact = estimate_left(rest, loaded.records, ctx.protocols)
        out(f"{bar(outcome.skipped + i + 1, len(runs))} done {spec.label}: {_scores(record)} "
            f"({duration(record.get('wall_s'))}); left ~{duration(left)}"
            + (f" ({len(rest) - exact} of {len(rest)} runs estimated from other kinds)" if exact < len(rest)
               else ""))
    return outcome
