"""What a CPU user deploys instead of SensiMix, built from the V&V run's BERT folder.

Beside the certified baseline (transformers BERT fp32, eager attention) a user who wants a small, fast BERT
classifier on a CPU truncates BERT and runs it as

* ``transformers`` fp32 (SDPA attention, transformers' default);
* PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``);
* ONNX Runtime fp32 or int8: exported with ``torch.onnx.export``, fused with ONNX Runtime's BERT optimizer
  (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), int8 by
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, int8 activations quantized at run time);
  each either fed the padded batch or **length-bucketed** (:class:`LengthBuckets`: the batch sorted by attended
  length, split in 4 equal buckets, each cut to its longest sequence).

A GPU user runs transformers fp32/fp16 (SDPA), replayed from CUDA graphs (:class:`CudaGraphed`: padded batches have
fixed shapes) or under ``torch.compile``.

Each row of the benchmark -- peers and SensiMix alike -- is a :class:`sensimix.bench.models.ModelSpec`, loaded by
:func:`sensimix.bench.models.load_model` with the builders here.
ONNX Runtime is optional (``pip install 'sensimix[bench]'``); :func:`ort_missing` says why a row cannot run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BUCKETS = 4
OPSET = 17
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


class CudaGraphed(nn.Module):
    """A classifier fed fixed-shape (padded) batches, replayed from one CUDA graph per input shape
    (:class:`sensimix.inference.graphs.GraphCache`, the same capture and buffers as SensiMix's graphs); returns the
    logits. ``capture=False``: the eager twin (CPU tests)."""

    def __init__(self, inner: nn.Module, capture: bool = True) -> None:
        from ..inference.graphs import GraphCache

        super().__init__()
        self.inner = inner
        self.config = getattr(inner, "config", None)
        self.cache = GraphCache(self._logits, capture=capture)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits if hasattr(out, "logits") else out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        key = (tuple(input_ids.shape), attention_mask is not None, token_type_ids is not None)
        return self.cache(key, {"input_ids": input_ids, "attention_mask": attention_mask,
                                "token_type_ids": token_type_ids})


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
