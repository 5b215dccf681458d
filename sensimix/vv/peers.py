"""What a CPU user deploys instead of SensiMix, built from the V&V run's BERT folder, and how much memory each
model holds once loaded.

Beside the certified baseline (transformers BERT fp32, eager attention) a user who wants a small, fast BERT
classifier on a CPU truncates BERT and runs it as

* ``transformers`` fp32 (SDPA attention, transformers' default);
* PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``);
* ONNX Runtime fp32 or int8: exported with ``torch.onnx.export``, fused with ONNX Runtime's BERT optimizer
  (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), int8 by
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, int8 activations quantized at run time);
  each either fed the padded batch or **length-bucketed** (:class:`LengthBuckets`: the batch sorted by attended
  length, split in 4 equal buckets, each cut to its longest sequence).

Every model -- peers and SensiMix alike -- is described by a :class:`ModelSpec` (what to load from which file),
so :func:`load_model` can build it in the benchmark and again in a fresh process for :func:`weight_memory`.
ONNX Runtime is optional (``pip install 'sensimix[bench]'``); :func:`ort_missing` says why a row cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BUCKETS = 4
OPSET = 17
# the modules a loader imports, imported before the RSS baseline of weight_memory so they do not count
RUNTIME_MODULES = ("torch", "transformers", "transformers.models.bert.modeling_bert", "torch.ao.quantization",
                   "sensimix.inference", "sensimix.vv.measure", "sensimix.vv.peers")
INT8_OPS = frozenset({"MatMulInteger", "DynamicQuantizeLinear", "QAttention", "QEmbedLayerNormalization",
                      "DynamicQuantizeMatMul", "QGemm"})


def ort_missing() -> str | None:
    """None when ONNX Runtime and onnx import; else why the ONNX Runtime rows are skipped."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or 'onnxruntime'} is not installed: pip install 'sensimix[bench]' for the ONNX Runtime peers"
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation and tracer warnings of torch.onnx / torch.ao, transformers' load reports and
    progress bars, and the per-tensor logs of onnxruntime's optimizer and quantizer."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------
# PyTorch peers
# ---------------------------------------------------------------------------------------------------
def load_bert(folder: str | os.PathLike, *, layers: int | None = None, attention: str = "sdpa",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """``BertForSequenceClassification`` of ``folder`` in eval mode; ``layers``: only its first encoder layers
    (transformers loads just those weights)."""
    from transformers import BertForSequenceClassification

    kwargs: dict[str, Any] = {"attn_implementation": attention, "dtype": dtype}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    with quiet():  # "weights of layers 3..11 not used" is the point of `layers`
        model = BertForSequenceClassification.from_pretrained(os.fspath(folder), **kwargs)
    return model.eval()


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch dynamic int8: int8 weights (per tensor) and activations quantized per batch, in every Linear."""
    with quiet():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime peers
# ---------------------------------------------------------------------------------------------------
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class OnnxExport:
    """The ONNX files of one BERT geometry: ``fp32`` (fused when ``fused``) and its dynamic int8 quantization."""

    fp32: str
    int8: str
    fused: bool
    note: str = ""
    int8_ops: dict[str, int] = field(default_factory=dict)  # the int8 graph's quantized operators, counted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(folder: str | os.PathLike, out_dir: str | os.PathLike, name: str, *, layers: int | None = None,
                seq_len: int = 128, fuse: bool = True) -> OnnxExport:
    """Export the BERT of ``folder`` (its first ``layers``) to ``out_dir/name.onnx``, fuse it with ONNX Runtime's
    BERT optimizer (``fuse``; the plain export is kept, with a note, when fusion does not find the attention), and
    quantize it to ``name.int8.onnx`` with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_bert(folder, layers=layers, attention="eager")  # the pattern ORT's fusion recognizes
    config = model.config
    raw, fp32, int8 = out / f"{name}.export.onnx", out / f"{name}.onnx", out / f"{name}.int8.onnx"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq_len // 2:] = 0  # padding in the example: the traced mask path is the general one
    dynamic = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
    with quiet(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(model, (ids, mask, torch.zeros_like(ids)), str(raw), input_names=list(INPUT_NAMES),
                          output_names=["logits"], dynamic_axes={**dynamic, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    fused, note = False, "not fused (fusion off)"
    if fuse:
        from onnxruntime.transformers.optimizer import optimize_model

        with quiet():
            optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                       hidden_size=config.hidden_size, opt_level=0)
        stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        if stats.get("Attention", 0) == config.num_hidden_layers:
            optimized.save_model_to_file(str(fp32))
            raw.unlink()
            fused, note = True, "fused by onnxruntime.transformers.optimizer: " + ", ".join(
                f"{k} x{v}" for k, v in sorted(stats.items()))
        else:
            note = (f"ONNX Runtime's BERT fusion found {stats.get('Attention', 0)} of {config.num_hidden_layers} "
                    f"attention blocks: the plain export is timed (session-level optimizations only)")
            log.warning("%s: %s", name, note)
    if not fused:
        raw.replace(fp32)
    with quiet():  # DefaultTensorType: fused contrib ops carry no shape-inferred type
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return OnnxExport(fp32=str(fp32), int8=str(int8), fused=fused, note=note, int8_ops=int8_op_counts(int8))


def int8_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many of the ONNX graph's nodes are integer operators (MatMulInteger, QAttention, ...)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(n.op_type for n in graph.node if n.op_type in INT8_OPS).items()))


class OrtClassifier(nn.Module):
    """An ONNX Runtime session (CPU) behind the ``model(input_ids, attention_mask, token_type_ids)`` call of the
    measurement helpers; returns the logits as a torch tensor. Threads: torch's (the same cores as every row).
    A fused graph takes the attention mask as a length per sequence: masks must be right-padded, as tokenizers
    make them."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {k: given[k].cpu().numpy() for k in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0])


class LengthBuckets(nn.Module):
    """Length bucketing in front of any classifier: the batch sorted by attended length, split into ``buckets``
    equal parts, each cut to its longest sequence (the last attended position) and run on its own; the logits come
    back in the batch's order. What a serving stack's length-bucketing collator does, timed with the model."""

    def __init__(self, inner: nn.Module, buckets: int = BUCKETS) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.inner, self.buckets = inner, buckets

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
        ends = (attention_mask.bool() * positions).amax(dim=1)  # last attended position + 1 (0: none)
        order = torch.argsort(ends, stable=True)
        out: torch.Tensor | None = None
        for rows in order.tensor_split(self.buckets):
            if rows.numel() == 0:
                continue
            width = max(1, int(ends[rows].max()))
            part = [t.index_select(0, rows)[:, :width] if t is not None else None
                    for t in (input_ids, attention_mask, token_type_ids)]
            logits = self.inner(*part)
            logits = logits.logits if hasattr(logits, "logits") else logits
            if out is None:
                out = logits.new_empty((input_ids.shape[0], *logits.shape[1:]))
            out[rows] = logits
        if out is None:
            raise ValueError("an empty batch")
        return out


# ---------------------------------------------------------------------------------------------------
# every row of the benchmark, loadable anywhere
# ---------------------------------------------------------------------------------------------------
RUNTIMES = ("certified", "transformers", "torch-int8", "ort", "sensimix")


@dataclass
class ModelSpec:
    """One model of the benchmark: what it is (``key``, ``name``, ``group``) and how to load it.

    ``runtime``: ``certified`` (:func:`sensimix.vv.measure.load_for_inference` of a BERT folder: the V&V
    baseline), ``transformers`` / ``torch-int8`` (:func:`load_bert`, then :func:`torch_dynamic_int8`), ``ort``
    (:class:`OrtClassifier` of an ONNX file) or ``sensimix`` (``SensiMixForSequenceClassification``).
    ``buckets``: wrap the model in :class:`LengthBuckets`. ``reference``: the key of the row whose logits and
    predictions this one is compared with (None: itself a reference).
    """

    key: str
    name: str
    group: str                      # baseline | peer | sensimix
    runtime: str
    path: str                       # BERT folder, ONNX file or packed SensiMix folder
    precision: str = "fp32"
    layers: int | None = None       # first encoder layers of the BERT folder (None: all)
    attention: str = "sdpa"         # transformers rows
    skip_padding: bool | None = None  # SensiMix rows (None: the plan's choice)
    buckets: int | None = None
    reference: str | None = None
    skipped: str | None = None      # why this row cannot run here (then it is reported, not timed)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    def loads(self) -> tuple:
        """What :func:`load_model` loads, whatever the row's name and bucketing."""
        return self.runtime, self.path, self.precision, self.layers, self.attention, self.skip_padding


def load_model(spec: ModelSpec, device: str = "cpu", *, shared: dict[str, nn.Module] | None = None) -> nn.Module:
    """The model ``spec`` describes, in eval mode on ``device``. ``shared``: ONNX Runtime sessions by file, so a
    padded and a bucketed row share one session (and its memory) within a process."""
    from ..devices import torch_dtype

    if spec.skipped:
        raise ValueError(f"{spec.name} cannot run here: {spec.skipped}")
    if spec.runtime == "certified":
        from .measure import load_for_inference

        model = load_for_inference(spec.path, device=device, precision=spec.precision, weights="pytorch_model.bin")
    elif spec.runtime in ("transformers", "torch-int8"):
        if spec.runtime == "torch-int8":
            model = torch_dynamic_int8(load_bert(spec.path, layers=spec.layers, attention=spec.attention))
        else:
            model = load_bert(spec.path, layers=spec.layers, attention=spec.attention,
                              dtype=torch_dtype(spec.precision)).to(device)
    elif spec.runtime == "ort":
        if shared is not None and spec.path in shared:
            model = shared[spec.path]
        else:
            model = OrtClassifier(spec.path)
            if shared is not None:
                shared[spec.path] = model
    else:
        from ..inference import SensiMixForSequenceClassification

        model = SensiMixForSequenceClassification.from_pretrained(spec.path, device=device, precision=spec.precision,
                                                                  skip_padding=spec.skip_padding)
        model.check_inputs = False  # the batches were checked against the model when staged (as in the V&V run)
    if spec.buckets:
        model = LengthBuckets(model, spec.buckets)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# weight memory: RSS growth of a fresh process while it loads one model
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


# ---------------------------------------------------------------------------------------------------
# a small BERT for the benchmark's quick mode
# ---------------------------------------------------------------------------------------------------
def build_small_bert_folder(out: str | os.PathLike, *, layers: int = 6, seed: int = 0) -> Path:
    """A random BERT of bert-tiny's width (128 hidden, 2 heads, 512 FFN) with ``layers`` layers and the
    bert-base-uncased vocabulary, saved like the certified folder: enough layers for SensiMix (3+3) in seconds."""
    from transformers import BertForSequenceClassification

    from ..sources import bert_config, load_tokenizer
    from ..train.jobs import save_bert_folder

    config = bert_config("random:bert-tiny")
    config.num_hidden_layers = layers
    config.num_labels = 2
    torch.manual_seed(seed)
    return save_bert_folder(BertForSequenceClassification(config).eval(), load_tokenizer("random:bert-tiny"), out)
