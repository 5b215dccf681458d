"""The benchmark's rows: which models it times, in which order, and what each loads (a :class:`ModelSpec`).

In order: the certified baseline (BERT fp32, eager attention; on CUDA also BERT fp16 + SDPA); the peers of the full
geometry, then of its first :data:`SMALL_LAYERS` layers (transformers, PyTorch dynamic int8, ONNX Runtime fp32 and
int8, padded and length-bucketed); the like-for-like row (every layer of the BERT, all 8-bit, in the packed runtime
with padding skipped); then each model of :data:`SENSIMIX_MODELS` in each of its :class:`Variant` s.

To time SensiMix another way, add one :class:`Variant` line to :data:`EVERY_VARIANT` (SensiMix (2+1)) or
:data:`EXACT_AND_FAST` (every model); a variant that names a kernel is listed only where that kernel runs (a new
8-bit kernel is such a line); :func:`with_graphs` adds a variant's CUDA-graph twin (one line). Each other exact 1-bit kernel the device runs fast, and the other exact 8-bit kernel,
get their rows without a line (:func:`other_exact_kernels`). Another SensiMix model is one :class:`SensiMixModel`
line in :data:`SENSIMIX_MODELS` (its folder is compressed from the same BERT).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch

from .. import kernels
from ..vv import BERT_FP16, BERT_FP32
from .models import ModelSpec

SMALL_LAYERS = 3  # the peers' small geometry: the first 3 layers, as many as SensiMix (2+1) keeps
# the like-for-like reference: every layer of the BERT, all 8-bit, exact: BERT-base's FLOPs in the packed runtime
# with padded tokens skipped, so "vs BERT with padding skipped" shows what the kernels alone buy
LIKE_FOR_LIKE = ("all", "all")
EXACT = "fp32"  # the variant every other variant of a model is compared with


@dataclass(frozen=True)
class Variant:
    """One way to run a SensiMix folder: the row ``<model prefix>-<key>``, named ``<model name> <title>``.

    ``binary_kernel`` / ``index8_kernel``: a kernel named outright (None: the plan's choice); the row is listed
    only where the kernel can run. ``only_on``: the device type the row is listed for (None: every device); where
    CUDA is absent, a CUDA-only row is listed without the kernel check (the rows of a CUDA run, for ``--rows``).
    """

    key: str
    title: str
    precision: str
    skip_padding: bool | None = None
    binary_kernel: str | None = None
    index8_kernel: str | None = None
    compiled: bool = False  # torch.compile; it compiles in its warm-up (listed only when asked for)
    only_on: str | None = None
    cuda_graphs: bool = False  # the forward replayed from CUDA graphs (sensimix.inference.graphs)

    def __post_init__(self) -> None:
        for table, name, kind in ((kernels.BINARY_KERNELS, self.binary_kernel, "1-bit"),
                                  (kernels.INDEX8_KERNELS, self.index8_kernel, "8-bit")):
            if name is not None and name not in table:
                raise ValueError(f"variant {self.key!r}: no {kind} kernel {name!r}; the kernels: {', '.join(table)}")

    def listed(self, device: torch.device, compiled: bool = True) -> bool:
        """Whether the row belongs to a run on ``device`` (``compiled``: the run times torch.compile rows)."""
        if (self.only_on and device.type != self.only_on) or (self.compiled and not compiled):
            return False
        if self.only_on == "cuda" and not torch.cuda.is_available():
            return True
        named = [(kernels.BINARY_KERNELS, self.binary_kernel), (kernels.INDEX8_KERNELS, self.index8_kernel)]
        return all(table[name].unavailable(device) is None for table, name in named if name is not None)


def other_exact_kernels(device: torch.device) -> list[Variant]:
    """The exact path on each other kernel ``device`` runs (the plan's defaults are timed already): every other
    1-bit kernel that is fast there (and ``float``), and the other exact 8-bit kernel (``dense`` / ``dequant``);
    fp16 activations on CUDA, fp32 on CPU."""
    if device.type == "cuda" and not torch.cuda.is_available():  # listing the rows of a CUDA run (--rows, tests)
        runnable, default_binary = ["fp8", "int8", "float", "xnor"], "fp8"
    else:
        runnable = [n for n, k in kernels.BINARY_KERNELS.items() if n != "reference" and k.unavailable(device) is None
                    and (k.fast_on(device) or n == "float")]
        default_binary = kernels.default_binary_kernel(device)
    precision = "fp16" if device.type == "cuda" else "fp32"
    out = [Variant(f"{precision}-1bit-{n}", f"{precision}, 1-bit {n}", precision, binary_kernel=n)
           for n in runnable if n != default_binary]
    other = "dequant" if kernels.default_index8_kernel(device) == "dense" else "dense"
    out.append(Variant(f"{precision}-8bit-{other}", f"{precision}, 8-bit {other}", precision, index8_kernel=other))
    return out


def with_graphs(*variants: Variant) -> tuple[Variant, ...]:
    """Each variant again, replayed from CUDA graphs (``<key>-graphs``; CUDA runs only)."""
    return tuple(replace(v, key=f"{v.key}-graphs", title=f"{v.title}, CUDA graphs", cuda_graphs=True, only_on="cuda")
                 for v in variants)


# a model's variants, in the table's order: a Variant, or a function of the device that lists some
VariantEntry = Union[Variant, Callable[[torch.device], list[Variant]]]
EXACT_AND_FAST: tuple[VariantEntry, ...] = (
    Variant(EXACT, "fp32 (exact)", "fp32"),
    Variant("fast", "fast", "fast"),
)
FAST_PADDED = Variant("fast-padded", "fast, padding kept", "fast", skip_padding=False)
BF16 = Variant("bf16", "bf16", "bf16")
FP16 = Variant("fp16", "fp16", "fp16", only_on="cuda")
# every model's exact and fast rows, with and without CUDA graphs
GRAPHED_EXACT_AND_FAST: tuple[VariantEntry, ...] = (*EXACT_AND_FAST, *with_graphs(*EXACT_AND_FAST))
EVERY_VARIANT: tuple[VariantEntry, ...] = (
    *EXACT_AND_FAST,
    FAST_PADDED,
    BF16,
    FP16,
    other_exact_kernels,
    # approximate (15-bit activations): `fast` runs it only for a calibrated checkpoint (inference.plan)
    Variant("fp32-8bit-int16", "fp32, 8-bit int16 (approximate)", "fp32", index8_kernel="int16"),
    # the exact path's fp32 GEMMs on bf16 tensor cores, fp32-grade
    Variant("fp32-8bit-bf16x3", "fp32, 8-bit bf16x3 (bf16 tensor cores, fp32-grade)", "fp32",
            index8_kernel="bf16x3", only_on="cuda"),
    Variant("fp16-compiled", "fp16, torch.compile", "fp16", compiled=True, only_on="cuda"),
    # every precision and padding mode again with CUDA graphs (issue 24: launches were 85% of the fp16 path's time)
    *with_graphs(*EXACT_AND_FAST, FAST_PADDED, BF16, FP16),
)


@dataclass(frozen=True)
class SensiMixModel:
    """A SensiMix folder the benchmark compresses from its BERT (``layers`` kept, ``eightbit`` of them 8-bit) and
    the variants it is timed in."""

    layers: int
    eightbit: int
    variants: tuple[VariantEntry, ...] = GRAPHED_EXACT_AND_FAST
    activations: str = "fp32"  # or "a8": an A8 model (sensimix.a8)

    @property
    def shape(self) -> tuple:
        """(layers, 8-bit layers), and "a8" for an A8 model: the key of its folder."""
        return (self.layers, self.eightbit) + (() if self.activations == "fp32" else (self.activations,))

    @property
    def prefix(self) -> str:
        return f"sensimix-{self.eightbit}+{self.layers - self.eightbit}" + \
            ("" if self.activations == "fp32" else f"-{self.activations}")

    @property
    def name(self) -> str:
        return f"SensiMix ({self.eightbit}+{self.layers - self.eightbit})" + \
            ("" if self.activations == "fp32" else f" {self.activations.upper()}")

    def variants_on(self, device: torch.device, compiled: bool = True) -> list[Variant]:
        """The model's variants listed for a run on ``device``, in the table's order."""
        out: list[Variant] = []
        for entry in self.variants:
            if isinstance(entry, Variant):
                out += [entry] if entry.listed(device, compiled) else []
            else:
                out += entry(device)
        return out


def other_a8_kernels(device: torch.device) -> list[Variant]:
    """An A8 model's exact path on each other A8 kernel ``device`` runs (the default is timed already); a CUDA run's
    rows listed where CUDA is absent: ``a8-torch`` (the default there is ``a8-triton``)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        names = ["a8-torch"]
    else:
        default = kernels.default_index8_kernel(device, "a8")
        names = [n for n, k in kernels.INDEX8_KERNELS.items() if k.activations == "a8"
                 and n not in (default, "a8-reference") and k.unavailable(device) is None]
    return [Variant(f"fp32-8bit-{n}", f"fp32, 8-bit {n}", "fp32", index8_kernel=n) for n in names]


A8_VARIANTS: tuple[VariantEntry, ...] = (
    *EXACT_AND_FAST,
    FAST_PADDED,
    other_a8_kernels,
    *with_graphs(*EXACT_AND_FAST, FAST_PADDED,
                 Variant("fp32-8bit-a8-torch", "fp32, 8-bit a8-torch", "fp32", index8_kernel="a8-torch")),
)

# the first is the V&V run's SensiMix (2+1), timed every way; (3+3) exact and fast; their A8 twins (8-bit activations)
SENSIMIX_MODELS: tuple[SensiMixModel, ...] = (
    SensiMixModel(3, 2, EVERY_VARIANT),
    SensiMixModel(6, 3),
    SensiMixModel(3, 2, A8_VARIANTS, activations="a8"),
    SensiMixModel(6, 3, activations="a8"),
)


def geometry_label(config: Any) -> str:
    """``BERT-base`` for bert-base's geometry, else e.g. ``BERT 6L/128H``."""
    if (config.num_hidden_layers, config.hidden_size) == (12, 768):
        return "BERT-base"
    return f"BERT {config.num_hidden_layers}L/{config.hidden_size}H"


def gpu_peers(bert: Path, prefix: str, name: str, layers: int | None, ref: str, compiled: bool) -> list[ModelSpec]:
    """What a GPU user runs to go fast: transformers fp32 and fp16 (SDPA) replayed from CUDA graphs (its padded
    batches have fixed shapes), and with ``compiled`` fp16 under torch.compile."""
    specs = [ModelSpec(f"{prefix}-{p}-graphs", f"{name} {p} + SDPA, CUDA graphs", "peer", "transformers", str(bert), p,
                       layers=layers, cuda_graphs=True, reference=ref) for p in ("fp32", "fp16")]
    if compiled:
        specs.append(ModelSpec(f"{prefix}-fp16-compiled", f"{name} fp16 + SDPA, torch.compile", "peer",
                               "transformers", str(bert), "fp16", layers=layers, compiled=True, reference=ref))
    return specs


def peer_specs(bert: Path, label: str, onnx: Mapping[str, Any], ort_reason: str | None, cuda: bool,
               buckets: int, compiled: bool = True) -> list[ModelSpec]:
    """The peers, full geometry then 3 layers: transformers (3 layers; fp16 too on CUDA, and on CUDA each geometry
    with CUDA graphs and torch.compile: :func:`gpu_peers`), PyTorch dynamic int8, ONNX Runtime fp32 and int8, each
    padded and bucketed (the CPU runtimes are listed as skipped on CUDA)."""
    cpu_only = "a CPU runtime: timed in CPU runs" if cuda else None
    specs = []
    for prefix, name, layers in (("bert", label, None),
                                 (f"bert{SMALL_LAYERS}", f"{SMALL_LAYERS}-layer BERT", SMALL_LAYERS)):
        ref = BERT_FP32 if layers is None else f"{prefix}-fp32"
        if layers is not None:
            specs.append(ModelSpec(ref, f"{name} fp32 (transformers)", "peer", "transformers", str(bert),
                                   layers=layers))
            if cuda:
                specs.append(ModelSpec(f"{prefix}-fp16", f"{name} fp16 (transformers)", "peer", "transformers",
                                       str(bert), "fp16", layers=layers, reference=ref))
        if cuda:
            specs += gpu_peers(bert, prefix, name, layers, ref, compiled)
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
    return specs


def model_specs(bert: Path, label: str, sensimix: Mapping[tuple, Path], onnx: Mapping[str, Any],
                ort_reason: str | None, device: str, buckets: int, compiled: bool = True) -> list[ModelSpec]:
    """Every row of a run on ``device``, in order (module docstring). ``sensimix``: the folders by
    :attr:`SensiMixModel.shape` (and :data:`LIKE_FOR_LIKE`); a model without a folder gets no rows. ``onnx``: the
    ONNX exports by peer prefix; ``ort_reason``: why the ONNX Runtime rows cannot run (None: they can)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    specs = [ModelSpec(BERT_FP32, f"{label} fp32 (certified baseline)", "baseline", "certified", str(bert),
                       attention="eager")]
    if cuda:
        specs.append(ModelSpec(BERT_FP16, f"{label} fp16 + SDPA", "peer", "certified", str(bert), "fp16",
                               reference=BERT_FP32))
    specs += peer_specs(bert, label, onnx, ort_reason, cuda, buckets, compiled)
    if LIKE_FOR_LIKE in sensimix:  # BERT's geometry and FLOPs through the packed runtime, padding skipped
        precision = "fp16" if cuda else "fp32"
        specs.append(ModelSpec(f"bert-runtime-{precision}-skip", f"{label} {precision}, padding skipped (runtime)",
                               "like-for-like", "sensimix", str(sensimix[LIKE_FOR_LIKE]), precision))
    for model in SENSIMIX_MODELS:
        if model.shape not in sensimix:
            continue
        for v in model.variants_on(dev, compiled):
            specs.append(ModelSpec(f"{model.prefix}-{v.key}", f"{model.name} {v.title}", "sensimix", "sensimix",
                                   str(sensimix[model.shape]), v.precision, skip_padding=v.skip_padding,
                                   kernels=(v.binary_kernel, v.index8_kernel), compiled=v.compiled,
                                   cuda_graphs=v.cuda_graphs,
                                   reference=None if v.key == EXACT else f"{model.prefix}-{EXACT}"))
    return specs


def row_keys() -> list[str]:
    """Every row key the benchmark can time, on CPU or CUDA (what ``--rows`` patterns are matched against)."""
    folders = {m: Path("-") for m in (*(model.shape for model in SENSIMIX_MODELS), LIKE_FOR_LIKE)}
    keys = [sp.key for device in ("cpu", "cuda") for sp in model_specs(Path("-"), "-", folders, {}, None, device, 1)]
    return list(dict.fromkeys(keys))


def unmatched_patterns(patterns: Sequence[str]) -> list[str]:
    """The ``--rows`` patterns no row key matches."""
    keys = row_keys()
    return [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in keys)]


def select_rows(specs: list[ModelSpec], patterns: Sequence[str] | None) -> list[ModelSpec]:
    """The baseline and the rows matching one of ``patterns`` (all rows without patterns)."""
    if not patterns:
        return specs
    return [sp for sp in specs if sp.key == BERT_FP32 or any(fnmatch.fnmatchcase(sp.key, p) for p in patterns)]
