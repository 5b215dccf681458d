"""Weight memory: what a fresh process holds more once it has loaded one model (the benchmark's memory column)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import RUNTIME_MODULES, ModelSpec, load_model
from .peers import ort_missing

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
def _rss() -> int:
    import psutil  # a dependency of accelerate, hence always installed with sensimix

    return psutil.Process().memory_info().rss


def _model_memory(paths: Sequence[str], model: nn.Module | None = None) -> int | None:
    """Anonymous resident memory of this process, plus the bytes of ``model``'s tensors that live in memory-mapped
    files under ``paths`` (weights loaded with mmap), from /proc/self/smaps; None where there is none (not Linux).

    Plain RSS would also count the pages of shared libraries (libtorch, onnxruntime) that the load touches for the
    first time in a forked process (code, not memory the model holds), and a mapped weight file's resident pages
    depend on what happened to read them: not every tensor yet, and tensors already dropped (PyTorch dynamic int8
    reads the fp32 weights it replaces). The tensors the model holds are what counts."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    anonymous, mapped, model_file = 0, [], False
    for line in text.splitlines():
        first = line.split(None, 1)[0] if line.strip() else ""
        if first and not first.endswith(":"):  # a mapping: address perms offset dev inode [path]
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            model_file = bool(path) and any(path.startswith(p) for p in paths)
            if model_file:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mapped.append((start, end))
        elif first == "Anonymous:" and not model_file:
            anonymous += int(line.split()[1]) * 1024
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in ([*model.parameters(), *model.buffers()] if model is not None and mapped else [])
                   if not t.is_quantized and any(a <= t.data_ptr() < b for a, b in mapped))
    in_files, reach = 0, 0
    for start, end in spans:  # union of the spans (tied weights and views count once)
        start = max(start, reach)
        if end > start:
            in_files += end - start
            reach = end
    return anonymous + in_files


def _settle() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS shows live memory only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure_one(spec: ModelSpec, device: str, threads: int, example: dict[str, torch.Tensor]) -> dict[str, int]:
    import importlib

    torch.set_num_threads(threads)
    for name in RUNTIME_MODULES + (("onnxruntime",) if spec.runtime == "ort" else ()):
        importlib.import_module(name)
    torch.nn.functional.linear(torch.ones(8, 8), torch.ones(8, 8))  # torch's one-time CPU set-up, not the model's
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context is not the model's either
        gpu_before = torch.cuda.memory_allocated(device)
    paths = [os.path.realpath(spec.path)]

    def reading(model: nn.Module | None = None) -> tuple[int | None, int]:
        _settle()
        return _model_memory(paths, model), _rss()

    mem0, rss0 = reading()
    model = load_model(spec, device)
    mem1, rss1 = reading(model)
    result = {"rss_load_bytes": rss1 - rss0}
    if mem0 is not None:
        result["weight_memory_bytes"] = mem1 - mem0
    if cuda:
        result["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device) - gpu_before
    with torch.inference_mode():
        model(**{k: v.to(device) for k, v in example.items()})
    mem2, rss2 = reading(model)
    result["rss_first_forward_bytes"] = rss2 - rss0
    if mem0 is not None:
        result["memory_after_forward_bytes"] = mem2 - mem0
    return result


def start_memory_server():
    """The multiprocessing context of :func:`weight_memory`; starts its fork server now (it imports torch,
    transformers, sensimix and onnxruntime: seconds that can overlap other work)."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(RUNTIME_MODULES) + ([] if ort_missing() else ["onnxruntime"]))
    forkserver.ensure_running()
    return ctx


def weight_memory(specs: Sequence[ModelSpec], example: dict[str, torch.Tensor], *, device: str = "cpu",
                  threads: int | None = None, workers: int = 2) -> dict[str, dict[str, Any]]:
    """Per spec key, what a fresh process holds more after loading the model:

    * ``weight_memory_bytes``: anonymous resident memory plus the model's tensors held in memory-mapped weight
      files (:func:`_model_memory`; Linux), after the load;
    * ``memory_after_forward_bytes``: the same after one forward pass of ``example`` (one sequence: lazy weight
      preparation counts, activations barely do);
    * ``rss_load_bytes`` / ``rss_first_forward_bytes``: plain RSS growth (also counts shared-library code pages
      touched for the first time);
    * on CUDA, ``cuda_allocated_bytes``: torch's allocated GPU memory after the load.

    Each model is loaded in its own process (``workers`` at a time), forked from a server that has imported torch,
    transformers, sensimix and onnxruntime but loaded nothing, so no earlier model (and no freed memory kept by
    the allocator) can blur the figure; freed heap pages are handed back (``malloc_trim``) before each reading.
    Where there is no fork server, each process is spawned (same figures, slower). Skipped specs are left out; a
    bucketed row gets the figures of its padded twin (``same_model_as``).
    """
    import sys
    from concurrent.futures import ProcessPoolExecutor

    threads = threads or torch.get_num_threads()
    ctx = start_memory_server()
    first: dict[tuple, ModelSpec] = {}  # a bucketed row holds the model of its padded twin: measured once
    for spec in specs:
        if not spec.skipped:
            first.setdefault(spec.loads(), spec)
    todo = list(first.values())
    if sys.version_info >= (3, 11):  # one fresh process per model, `workers` at a time
        groups, fresh = [todo], {"max_tasks_per_child": 1}
    else:  # Python 3.10: a pool per model
        groups, fresh, workers = [[spec] for spec in todo], {}, 1
    results: dict[str, dict[str, Any]] = {}
    for group in groups:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **fresh) as pool:
            futures = [pool.submit(_measure_one, spec, device, threads, example) for spec in group]
            for spec, future in zip(group, futures):
                try:
                    results[spec.key] = future.result()
                except Exception as exc:  # noqa: BLE001 -- reported in the row; the other rows still count
                    results[spec.key] = {"error": f"{type(exc).__name__}: {exc}"}
                log.info("weight memory %-44s %s", spec.name, ", ".join(
                    f"{k} {v / 2**20:.1f} MiB" if isinstance(v, int) else f"{k} {v}"
                    for k, v in results[spec.key].items()))
    for spec in specs:
        twin = first.get(spec.loads()) if not spec.skipped else None
        if twin is not None and twin.key != spec.key:
            results[spec.key] = {**results[twin.key], "same_model_as": twin.key}
    return results
