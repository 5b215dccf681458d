"""One benchmark run: build the folders and ONNX files, load every row, time them in one interleaved run, and
return the results (``scripts/benchmark.py`` parses its arguments into :class:`BenchSettings`, prints and writes).

The certified baseline and SensiMix (2+1) are the V&V run's own (:class:`sensimix.vv.VVRun`: its folders,
batches, environment record and timers), so the benchmark times what ``sensimix verify`` times; the other rows
(:mod:`.rows`) are loaded by :func:`.models.load_model` and timed with the V&V's interleaved trials
(:func:`sensimix.vv.timing.time_models`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..sources import bert_config
from ..vv import BERT_FP16, BERT_FP32, ModelTimer, VVRun, VVSettings
from ..vv.sizes import build_sensimix_folder
from ..vv.timing import time_models
from .memory import start_memory_server, weight_memory
from .models import load_model
from .peers import BUCKETS, export_onnx, ort_missing, quiet
from .results import best_peer, goals, make_rows
from .rows import LIKE_FOR_LIKE, SENSIMIX_MODELS, SMALL_LAYERS, geometry_label, model_specs, select_rows

log = logging.getLogger(__name__)

GAP_EXAMPLES = 8  # logit gaps on the first examples of the first batch (predictions: every example)


class UsageError(ValueError):
    """A setting or given folder the run cannot use, found before any work: one line, exit 2."""


@dataclass(frozen=True)
class BenchSettings:
    """What one run times and how (``scripts/benchmark.py``'s options, defaults filled in)."""

    device: str = "auto"
    bert: str = "random:bert-base"  # random:<geometry> or a BERT folder: every row starts from it
    examples: int = 64              # per round
    batch_size: int = 64
    seq_len: int = 128
    rounds: int = 3                 # interleaved timing rounds; the median is reported
    warmup: int | None = None       # untimed batches per model (None: the V&V default)
    glue_dir: str | None = None     # QNLI/dev.tsv (None: $GLUE_DIR; synthetic pairs without it)
    buckets: int = BUCKETS          # length buckets of the bucketed ONNX Runtime rows
    ort_fusion: bool = True         # ONNX Runtime's BERT fusion of the exports
    memory: bool = True             # measure each row's weight memory in a fresh process
    keep_models: str | None = None  # build the folders and ONNX files here (None: under the run's temp folder)
    seed: int = 0
    compile: bool = True            # on CUDA, the torch.compile row
    progress: bool = True
    rows: tuple[str, ...] | None = None  # shell patterns of the row keys to time (the baseline always runs)


def export_peers(bert: Path, root: Path, seq_len: int, fuse: bool) -> dict[str, Any]:
    """The ONNX files of the full and the 3-layer geometry (fp32, int8), by peer prefix."""
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


def build(s: BenchSettings, root: Path) -> tuple[VVRun, dict[tuple, Path], dict[str, Any]]:
    """The V&V run (its BERT and SensiMix (2+1) folders, batches and environment record), the other SensiMix
    folders made from the same BERT, and the ONNX files of the peers."""
    main = SENSIMIX_MODELS[0]
    settings = VVSettings(device=s.device, examples=s.examples, trials=s.rounds, warmup_batches=s.warmup,
                          batch_size=s.batch_size, max_seq_length=s.seq_len, glue_dir=s.glue_dir, bert=s.bert,
                          layers=main.layers, eightbit_layers=main.eightbit, seed=s.seed,
                          keep_models=s.keep_models, overwrite=True, accuracy=None, progress=s.progress)
    try:  # the settings and the given folders, checked before any work
        run = VVRun(settings, root)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    vv, out = run.s, Path(run.s.keep_models or root)
    bert, sensimix21 = run.folders
    sensimix: dict[tuple, Path] = {main.shape: sensimix21}
    for model in SENSIMIX_MODELS[1:]:
        sensimix[model.shape] = build_sensimix_folder(bert, out / model.prefix, layers=model.layers,
                                                      eightbit_layers=model.eightbit, seed=vv.seed, overwrite=True,
                                                      activations=model.activations)
    depth = bert_config(bert, allow_qat=False).num_hidden_layers
    sensimix[LIKE_FOR_LIKE] = build_sensimix_folder(bert, out / "bert-runtime", layers=depth, eightbit_layers=depth,
                                                    seed=vv.seed, overwrite=True)
    _ = run.batches  # staged and checked against the model before the slow exports
    onnx = {}
    if ort_missing():
        log.warning("ONNX Runtime rows skipped: %s", ort_missing())
    elif not vv.device.startswith("cuda"):
        onnx = export_peers(bert, out, vv.max_seq_length, fuse=s.ort_fusion)
    return run, sensimix, onnx


def run_models(s: BenchSettings, root: Path) -> dict[str, Any]:
    """Build, load and time every row under ``root``; the results as the JSON holds them (without ``schema``,
    ``settings`` and the fields ``scripts/benchmark.py`` adds after the run)."""
    if s.memory:
        start_memory_server()  # its imports overlap the building below
    run, sensimix, onnx = build(s, root)
    vv, device = run.s, run.s.device
    bert = run.folders[0]
    batches, data = run.batches
    specs = select_rows(model_specs(bert, geometry_label(bert_config(bert, allow_qat=False)), sensimix, onnx,
                                    ort_missing(), device, s.buckets, compiled=s.compile), s.rows)
    runnable = [sp for sp in specs if not sp.skipped]
    memory = {}
    if s.memory:
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
                    # a CUDA-graph row captures one graph per batch shape: all of them in its warm-up, not in a round
                    warmup = len(batches) if spec.cuda_graphs else vv.warmup_batches
                    timer = ModelTimer(spec.key, load_model(spec, device, shared=shared), batches, device=device,
                                       warmup_batches=warmup, precision=spec.precision)
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
             len(timers), vv.trials, len(batches), vv.batch_size, vv.max_seq_length, data, 100 * fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        report = time_models({}, batches, trials=vv.trials, device=device, timers=timers, data=data,
                             warmup_batches=vv.warmup_batches, max_seq_length=vv.max_seq_length,
                             progress=vv.progress)
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
            "best_peer": best, "goals": goals(rows, best, device=device), "timing_trials_ms": report.trials,
            "onnx": {k: v.to_dict() for k, v in onnx.items()}, "vv_settings": _plain(vars(vv))}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in d.items() if k != "accuracy"}

