"""Every row of the benchmark as a value: what a model is (:class:`ModelSpec`) and how to load it
(:func:`load_model`), so the benchmark can build it and :func:`sensimix.bench.memory.weight_memory` can build it again
in a fresh process."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .peers import CudaGraphed, LengthBuckets, OrtClassifier, load_bert, torch_dynamic_int8

# the modules a loader imports, imported before the RSS baseline of weight_memory so they do not count
RUNTIME_MODULES = ("torch", "transformers", "transformers.models.bert.modeling_bert", "torch.ao.quantization",
                   "sensimix.inference", "sensimix.measure", "sensimix.bench.models", "sensimix.bench.peers")
RUNTIMES = ("certified", "transformers", "torch-int8", "ort", "sensimix")


@dataclass
class ModelSpec:
    """One model of the benchmark: what it is (``key``, ``name``, ``group``) and how to load it.

    ``runtime``: ``certified`` (:func:`sensimix.measure.load_for_inference` of a BERT folder: the V&V
    baseline), ``transformers`` / ``torch-int8`` (:func:`.peers.load_bert`, then :func:`.peers.torch_dynamic_int8`),
    ``ort`` (:class:`.peers.OrtClassifier` of an ONNX file) or ``sensimix`` (``SensiMixForSequenceClassification``).
    ``buckets``: wrap the model in :class:`.peers.LengthBuckets`. ``reference``: the key of the row whose logits and
    predictions this one is compared with (None: itself a reference).
    """

    key: str
    name: str
    group: str                      # baseline | peer | like-for-like | sensimix
    runtime: str
    path: str                       # BERT folder, ONNX file or packed SensiMix folder
    precision: str = "fp32"
    layers: int | None = None       # first encoder layers of the BERT folder (None: all)
    attention: str = "sdpa"         # transformers rows
    skip_padding: bool | None = None  # SensiMix rows (None: the plan's choice)
    kernels: tuple[str | None, str | None] = (None, None)  # SensiMix rows: (1-bit, 8-bit) kernel; None: the plan's
    compiled: bool = False          # SensiMix and transformers rows: torch.compile the forward
    cuda_graphs: bool = False       # SensiMix and transformers rows: replay the forward from CUDA graphs
    buckets: int | None = None
    reference: str | None = None
    skipped: str | None = None      # why this row cannot run here (then it is reported, not timed)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")

    def loads(self) -> tuple:
        """What :func:`load_model` loads (the weights it holds), whatever the row's name, bucketing or compilation."""
        return self.runtime, self.path, self.precision, self.layers, self.attention, self.skip_padding, self.kernels


def load_model(spec: ModelSpec, device: str = "cpu", *, shared: dict[str, nn.Module] | None = None) -> nn.Module:
    """The model ``spec`` describes, in eval mode on ``device``. ``shared``: ONNX Runtime sessions by file, so a
    padded and a bucketed row share one session (and its memory) within a process."""
    from ..devices import torch_dtype

    if spec.skipped:
        raise ValueError(f"{spec.name} cannot run here: {spec.skipped}")
    if spec.runtime == "certified":
        from ..measure import load_for_inference

        model = load_for_inference(spec.path, device=device, precision=spec.precision, weights="pytorch_model.bin")
    elif spec.runtime in ("transformers", "torch-int8"):
        if spec.runtime == "torch-int8":
            model = torch_dynamic_int8(load_bert(spec.path, layers=spec.layers, attention=spec.attention))
        else:
            model = load_bert(spec.path, layers=spec.layers, attention=spec.attention,
                              dtype=torch_dtype(spec.precision)).to(device)
            if spec.compiled:  # what a GPU user does: the default mode, fixed shapes (padded batches)
                import torch

                from ..kernels.native import private_compile_cache

                private_compile_cache()  # not inductor's shared /tmp default
                model = torch.compile(model)
            if spec.cuda_graphs:
                model = CudaGraphed(model)
    elif spec.runtime == "ort":
        if shared is not None and spec.path in shared:
            model = shared[spec.path]
        else:
            model = OrtClassifier(spec.path)
            if shared is not None:
                shared[spec.path] = model
    else:
        from ..inference import SensiMixForSequenceClassification

        model = SensiMixForSequenceClassification.from_pretrained(
            spec.path, device=device, precision=spec.precision, skip_padding=spec.skip_padding,
            binary_kernel=spec.kernels[0], index8_kernel=spec.kernels[1], compile=spec.compiled,
            cuda_graphs=spec.cuda_graphs)
        model.check_inputs = False  # the batches were checked against the model when staged (as in the V&V run)
    if spec.buckets:
        model = LengthBuckets(model, spec.buckets)
    return model.eval()
