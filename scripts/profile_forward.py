#!/usr/bin/env python
"""Where one forward's time goes (not a test): SensiMix (2+1), fp32 activations and A8, beside a 3-layer BERT,
profiled on one device (on CUDA also replayed from CUDA graphs: ``from_pretrained(..., cuda_graphs=True)``).

For each model, on the same staged batches (the first ``--batches`` x ``--batch-size`` QNLI dev pairs, or
synthetic QNLI-shaped pairs without $GLUE_DIR):

* ``ms``: wall time per batch, the device synchronized once per pass (as the V&V times);
* ``host_ms``: time until the Python call returns, per batch, no synchronization: when it is close to ``ms``, the
  forward is bound by the host (Python and kernel launches), not by the device's arithmetic;
* ``kernels``: device kernels launched per forward, and ``kernel_ms``: their summed device time (torch.profiler);
  ``ms - kernel_ms`` is time the device waits;
* on CUDA, ``graph_ms``: the same forward replayed from a CUDA graph (padding kept: fixed shapes), i.e. without
  launch overhead; "capture failed: ..." where the model cannot be captured;
* the ``--top`` operators by device time (self), per model, printed.

Usage::

    python scripts/profile_forward.py --device cuda --json profile-h200.json    # ~1 min on a GPU machine
    python scripts/profile_forward.py --device cpu --batches 2 --batch-size 16  # the CPU twin (no graphs)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sensimix.devices import device_name, resolve_device
from sensimix.inference import SensiMixForSequenceClassification
from sensimix.sources import load_tokenizer
from sensimix.measure import INPUT_KEYS, forward_batch, make_batches, synthetic_inputs, task_inputs
from sensimix.bench.peers import load_bert
from sensimix.vv.sizes import build_bert_folder, build_sensimix_folder

log = logging.getLogger("profile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--bert", default="random:bert-base", help="the BERT to compress (default: random bert-base)")
    p.add_argument("--batches", type=int, default=8, help="batches per pass (default: 8)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--passes", type=int, default=5, help="timed passes; the median is reported (default: 5)")
    p.add_argument("--top", type=int, default=12, help="operators listed per model (default: 12)")
    p.add_argument("--glue-dir", default=None, help="glue_data folder with QNLI/dev.tsv (default: $GLUE_DIR)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure here")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_passes(model: torch.nn.Module, batches: list[dict[str, Any]], device: str, passes: int) -> dict[str, float]:
    walls, hosts = [], []
    for _ in range(passes):
        sync(device)
        start = time.perf_counter()
        host = 0.0
        for b in batches:
            t = time.perf_counter()
            forward_batch(model, b)
            host += time.perf_counter() - t
        sync(device)
        walls.append((time.perf_counter() - start) * 1e3 / len(batches))
        hosts.append(host * 1e3 / len(batches))
    walls.sort()
    hosts.sort()
    return {"ms": walls[len(walls) // 2], "host_ms": hosts[len(hosts) // 2]}


def profile(model: torch.nn.Module, batches: list[dict[str, Any]], device: str, top: int) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches:
            forward_batch(model, b)
        sync(device)
    events = prof.key_averages()
    kernel_ms = count = None
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(getattr(e, "device_time_total", 0.0) for e in kernels) / 1e3 / len(batches)
        count = len(kernels) / len(batches)
    try:
        table = events.table(sort_by=key, row_limit=top, max_name_column_width=48)
    except (AttributeError, KeyError):  # an older torch names the device column "cuda"
        table = events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=48)
    return {"kernels": count, "kernel_ms": kernel_ms, "table": table}


def graph_time(model: torch.nn.Module, batch: dict[str, Any], device: str, passes: int) -> float | str:
    """ms per replay of one captured forward (fixed shapes: a padding-kept batch)."""
    static = {k: batch[k] for k in INPUT_KEYS if batch.get(k) is not None}
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(**static)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**static)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be captured is a finding, not a crash
        return f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    sync(device)
    start = time.perf_counter()
    reps = 20 * passes
    for _ in range(reps):
        graph.replay()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / reps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="sensimix-profile-") as tmp:
        bert = build_bert_folder(Path(tmp) / "bert", args.bert)
        sm21 = build_sensimix_folder(bert, Path(tmp) / "sensimix")
        sm21a8 = build_sensimix_folder(bert, Path(tmp) / "sensimix-a8", activations="a8")
        n = args.batches * args.batch_size
        try:
            inputs = task_inputs("qnli", load_tokenizer(sm21), glue_dir=args.glue_dir, split="dev",
                                 max_seq_length=args.seq_len)
            data = "QNLI dev"
        except (FileNotFoundError, ValueError) as exc:
            log.info("synthetic inputs (%s)", exc)
            inputs, data = synthetic_inputs(n, args.seq_len), "synthetic"
        batches = make_batches(inputs, batch_size=args.batch_size, num_examples=n, device=device, packing=True)
        fill = float(torch.cat([b["attention_mask"].float().flatten() for b in batches]).mean())

        def sensimix(precision: str, skip_padding: bool | None = None, folder: Path = sm21,
                     cuda_graphs: bool = False) -> torch.nn.Module:
            model = SensiMixForSequenceClassification.from_pretrained(folder, device=device, precision=precision,
                                                                      skip_padding=skip_padding, cuda_graphs=cuda_graphs)
            model.check_inputs = False  # staged batches were checked once (as the V&V run times it)
            return model

        rows = {"sensimix-2+1-fast (exact)": lambda: sensimix("fast"),
                "sensimix-2+1-fast, padding kept": lambda: sensimix("fast", skip_padding=False),
                "sensimix-2+1-a8-fast (exact)": lambda: sensimix("fast", folder=sm21a8),
                "bert3-fp32 (transformers, sdpa)": lambda: load_bert(bert, layers=3).to(device)}
        if cuda:
            rows.update({"sensimix-2+1-fp16": lambda: sensimix("fp16"),
                         "sensimix-2+1-fp16, padding kept": lambda: sensimix("fp16", skip_padding=False),
                         "sensimix-2+1-fp16, CUDA graphs": lambda: sensimix("fp16", cuda_graphs=True),
                         "sensimix-2+1-a8-fast, CUDA graphs": lambda: sensimix("fast", folder=sm21a8,
                                                                               cuda_graphs=True),
                         "bert3-fp16 (transformers, sdpa)":
                             lambda: load_bert(bert, layers=3, dtype=torch.float16).to(device)})
        results: dict[str, Any] = {}
        with torch.inference_mode():
            for name, make in rows.items():
                model = make()
                for b in batches[: len(batches) if "graphs" in name else 3]:  # graphs: every key captured first
                    forward_batch(model, b)
                row = time_passes(model, batches, device, args.passes)
                prof = profile(model, batches, device, args.top)
                row.update(kernels=prof["kernels"], kernel_ms=prof["kernel_ms"])
                if cuda and ("padding kept" in name or name.startswith("bert3")):
                    row["graph_ms"] = graph_time(model, batches[0], device, args.passes)
                results[name] = row
                print(f"\n=== {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in row.items()))
                print(prof["table"])
                del model
                if cuda:
                    torch.cuda.empty_cache()
    print(f"\n{device_name(device)}; {data}; {args.batches} batches of {args.batch_size} x {args.seq_len}; "
          f"{100 * fill:.1f}% of tokens attended; median of {args.passes} passes")
    print(f"{'model':<36} {'ms':>8} {'host_ms':>8} {'kernels':>8} {'kernel_ms':>10} {'graph_ms':>10}")
    # a CUDA-graph row's ms is its replays' wall time: host_ms far below the eager row's is what the graphs buy
    for name, r in results.items():
        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)[:40])
        print(f"{name:<36} {f(r['ms']):>8} {f(r['host_ms']):>8} {f(r['kernels']):>8} {f(r['kernel_ms']):>10} "
              f"{f(r.get('graph_ms')):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "schema": "sensimix-profile/1", "device": device, "device_name": device_name(device), "data": data,
            "batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "attended_fraction": fill, "passes": args.passes, "torch": torch.__version__, "rows": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
