"""The table's int8 peers: what a user deploys instead of SensiMix, trained on the same data from the same reference.

A peer keeps the reference's first N layers (N: the depth of the SensiMix model it is compared with), distilled from
the reference for that SensiMix model's epochs (:meth:`sensimix.bench.glue.plans.Protocol.settings`) -- or, when N
is the reference's depth, is the reference itself, untrained -- and is quantized by ONNX Runtime's dynamic int8
(int8 weights per tensor, uint8 activations per batch; ``sensimix.bench.peers.export_onnx``: the benchmark's best
CPU peer, fused by ONNX Runtime's BERT optimizer). It is scored on dev through that ONNX Runtime session, and its
size is the int8 ``.onnx`` file it deploys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...data import METRICS_FILE
from ...io import read_json
from ...sources import bert_config

FP32_FOLDER = "fp32"  # inside the run's work folder: the truncated, distilled fp32 BERT
ONNX_FOLDER = "onnx"


def prepare(reference: Path, layers: int, task: str, settings: Any, glue_dir: Path,
            folder: Path) -> tuple[Path, dict[str, Any] | None, float | None]:
    """(the fp32 BERT folder to quantize, its training metrics, the training's wall seconds): the reference itself
    when it has ``layers`` layers (no training: None, None), else its first ``layers`` layers distilled from it into
    ``folder/fp32``."""
    from ...train import finetune

    if layers == bert_config(reference).num_hidden_layers:  # more layers than it has: finetune refuses
        return reference, None, None
    start = time.perf_counter()
    out = folder / FP32_FOLDER
    finetune(reference, task, out, glue_dir=glue_dir, settings=settings, layers=layers, teacher=reference,
             overwrite=out.exists())
    return out, read_json(out / METRICS_FILE, what="training metrics"), round(time.perf_counter() - start, 1)


def score(fp32_folder: Path, inputs: dict, max_seq_length: int, folder: Path) -> tuple[Any, dict[str, Any], int]:
    """(the InferenceResult on ``inputs``, what ran, the int8 file's bytes) of ``fp32_folder`` exported to ONNX,
    fused and quantized to dynamic int8 in ``folder/onnx``, run by an ONNX Runtime CPU session."""
    from ...measure import make_batches, run_inference
    from ..peers import OrtClassifier, export_onnx, ort_missing

    missing = ort_missing()
    if missing:
        raise ImportError(missing)
    import onnxruntime

    export = export_onnx(fp32_folder, folder / ONNX_FOLDER, "model", seq_len=max_seq_length)
    session = OrtClassifier(export.int8)
    result = run_inference(session, make_batches(inputs, batch_size=128), warmup_batches=0)
    int8 = Path(export.int8)
    info = {"runtime": "onnxruntime dynamic int8", "onnxruntime": onnxruntime.__version__, "device": "cpu",
            "file": int8.name, "fused": export.fused, "note": export.note, "int8_ops": export.int8_ops}
    return result, info, int8.stat().st_size
