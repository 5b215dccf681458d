"""Precision recipes: what a packed model computes with on a device, decided once, before any weight is read.

================ ================================================================================================
precision        what runs
================ ================================================================================================
``fp32``         EXACT: the QAT model's arithmetic in fp32 -- 8-bit weights dequantized exactly as the QAT model
                 does (per call on CPU: int8 weight memory; once at load on CUDA), exact 1-bit kernels, fp32
                 LayerNorms and attention. Q, K, V run as one GEMM and padded tokens are
                 skipped: both change only the summation order of GEMMs (logits within 1e-5 of the QAT model).
``fp16``/``bf16`` all activations in that dtype (the paper's GPU inference is fp16), ``dense`` 8-bit weights in
                 it, exact 1-bit products (their outputs rounded once to the dtype).
``fast``         the fastest recipe measured within the agreement bar (>= 99.5% of trained-model predictions
                 equal to the exact path's, accuracy within 0.3 points): the exact path with the device's fastest
                 exact kernels, except on a CPU for a checkpoint whose ``fast_calibration.json`` shows that the
                 approximate ``int16`` 8-bit kernel kept its predictions (:mod:`sensimix.calibration_record`; see
                 :func:`fast_index8_kernel` for why rounded activations cannot qualify without measuring).
================ ================================================================================================

An A8 checkpoint (``activation_quant: "a8"``, :mod:`sensimix.a8`) is one arithmetic: integer GEMMs with fixed
float roundings around them. Its plans are ``fp32`` and ``fast``, both EXACT, both on the device's fastest A8
kernel (no calibration is needed: nothing is approximated); fp16 and bf16 would change its arithmetic and are
refused. The plan records ``activations`` (``fp32`` or ``a8``), and a model refuses a plan of the other kind.

Its agreement with the exact path on trained models is measured (``sensimix.vv.accuracy``) and reported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..calibration_record import calibrated_index8_kernel
from ..checkpoint import CHECKSUM_KEY
from ..config import ACTIVATION_QUANT as A8
from ..devices import resolve_device, torch_dtype

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "fast")
FAST = "fast"
ACTIVATIONS = ("fp32", A8)
A8_PRECISIONS = ("fp32", FAST)  # an A8 checkpoint's exact plans (its kernels are exact); fp16/bf16 are refused


@dataclass(frozen=True)
class InferencePlan:
    """Everything that decides how a packed model runs (see the module table)."""

    device: torch.device
    precision: str               # fp32 | fp16 | bf16 | fast
    dtype: torch.dtype           # the residual stream's dtype
    binary_kernel: str
    index8_kernel: str
    fuse_qkv: bool
    skip_padding: bool
    calibrated: bool = False     # fast took the approximate 8-bit kernel this checkpoint was calibrated for
    activations: str = "fp32"    # the checkpoint's arithmetic: fp32 activations, or a8 (sensimix.a8)
    cuda_graphs: bool = False    # the forward replayed from CUDA graphs (sensimix.inference.graphs)

    @property
    def a8(self) -> bool:
        return self.activations == A8

    @property
    def exact(self) -> bool:
        """Computes what the QAT model computes (fp32, exact kernels)."""
        return (self.dtype == torch.float32 and kernels.BINARY_KERNELS[self.binary_kernel].exact
                and kernels.INDEX8_KERNELS[self.index8_kernel].exact)

    def describe(self) -> str:
        kind = "exact" if self.exact else ("approximate, calibrated for this checkpoint" if self.calibrated
                                           else "approximate")
        return (f"precision {self.precision} ({kind}{', A8' if self.a8 else ''}), 1-bit kernel "
                f"{self.binary_kernel}, 8-bit kernel {self.index8_kernel}"
                + (", Q/K/V fused" if self.fuse_qkv else "") + (", padding skipped" if self.skip_padding else "")
                + (", CUDA graphs" if self.cuda_graphs else ""))


def fast_index8_kernel(device: torch.device | str, calibrated: str | None = None) -> str:
    """The 8-bit kernel of ``precision="fast"``: ``calibrated`` (the kernel a checkpoint's passed calibration
    record names) where ``device`` runs it, else the device's exact one (``dequant`` on CPU, ``dense`` on CUDA).

    Why exact: a SensiMix model binarizes the inputs of its 1-bit FFNs, so rounding anywhere upstream moves
    pre-activations near 0 across it. Measured on MiniLM-L6 SensiMix trained on SST-2, SST-2 dev (872),
    predictions equal to the exact path's when only the 8-bit linears' activations are rounded:

    ========================================= ============ ============================================
    activations of the 8-bit linears          (3+3)        (2+1)
    ========================================= ============ ============================================
    int16 per row, 15 bits (``int16``)        861          872 and 871 (2,000 examples), 860 (1,000)
    bf16                                      848          868
    int8 per row                              841-851      848-858
    int8 per tensor (fbgemm, ONNX Runtime)    838          846
    ========================================= ============ ============================================

    ``int16`` also kept 408/408 MRPC dev predictions of a (2+1) trained on MRPC. The whole model in fp16 (the
    paper's GPU inference; emulated on CPU): 855 (3+3) / 871 (2+1). The bar is 99.5% (868/872) with accuracy
    within 0.3 points. ``int16`` meets it on well-trained (2+1) models but not on the (2+1) that CI trains on
    1,000 examples (63% accuracy: many logits near the decision boundary), nor on (3+3); no property of a
    checkpoint tells these apart before its predictions are measured. So ``fast`` is exact unless the
    checkpoint's predictions were measured on the candidate (:mod:`sensimix.train.calibrate`, run by ``sensimix
    compress`` on the longest train examples it left out), and the approximate kernels (``int16``, ``bf16``,
    ``int8``, ``fbgemm``) are available by name.
    """
    device = torch.device(device)
    if calibrated in kernels.INDEX8_KERNELS and kernels.INDEX8_KERNELS[calibrated].unavailable(device) is None:
        return calibrated
    return kernels.default_index8_kernel(device)


def _precision_name(precision: str | torch.dtype | None) -> str:
    """One of :data:`PRECISIONS` for a precision name or torch dtype (None: fp32); anything else is refused."""
    if precision is None:
        return "fp32"
    if not isinstance(precision, str):
        from ..devices import dtype_name

        if not isinstance(precision, torch.dtype):  # e.g. 16: name every choice, fast included
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or a torch float dtype, got "
                             f"{precision!r}")
        precision = dtype_name(precision)
    precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(precision, precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def make_plan(device: torch.device | str = "cpu", precision: str | torch.dtype | None = None, *,
              binary_kernel: str | None = None, index8_kernel: str | None = None, fuse_qkv: bool | None = None,
              skip_padding: bool | None = None, calibrated_index8: str | None = None,
              activations: str = "fp32", cuda_graphs: bool = False) -> InferencePlan:
    """Resolve a precision (default: fp32, exact, on every device) and kernel choices into a checked plan;
    ``calibrated_index8``: the 8-bit kernel a checkpoint was calibrated for (used by ``fast`` alone);
    ``activations``: the checkpoint's arithmetic (``fp32``, or ``a8`` for an A8 checkpoint); ``cuda_graphs``: replay
    the forward from CUDA graphs (CUDA only; :mod:`sensimix.inference.graphs`)."""
    dev = torch.device(resolve_device(device))
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and dev.type != "cuda":
        raise ValueError(f"cuda_graphs=True replays the forward from CUDA graphs: it needs a CUDA device, not {dev}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    precision = _precision_name(precision)
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    calibrated = False
    if activations == A8:
        if precision not in A8_PRECISIONS:
            raise ValueError(f"precision {precision!r} would change an A8 checkpoint's arithmetic (integer GEMMs with "
                             f"an fp32 epilogue, sensimix.a8); run it with precision fp32 or fast (both exact)")
        dtype = torch.float32
    elif precision == FAST:
        dtype = torch.float32
        if index8_kernel in (None, "auto"):
            index8_kernel = fast_index8_kernel(dev, calibrated_index8)
            calibrated = index8_kernel == calibrated_index8
    else:
        dtype = torch_dtype(precision)
    binary = kernels.binary_kernel(binary_kernel, dev)
    index8 = kernels.index8_kernel(index8_kernel, dev, activations)
    if fuse_qkv is None:
        fuse_qkv = index8.fusable
    elif fuse_qkv and not index8.fusable:
        raise ValueError(f"fuse_qkv=True, but the index8 kernel {index8.name!r} cannot fuse linears; use one of "
                         f"{', '.join(n for n, k in kernels.INDEX8_KERNELS.items() if k.fusable)}")
    return InferencePlan(device=dev, precision=precision, dtype=dtype, binary_kernel=binary.name,
                         index8_kernel=index8.name, fuse_qkv=fuse_qkv,
                         skip_padding=True if skip_padding is None else bool(skip_padding), calibrated=calibrated,
                         activations=activations, cuda_graphs=cuda_graphs)


def check_request(request: dict[str, Any]) -> None:
    """The parts of a plan request that need no checkpoint -- the precision, kernel names that exist -- checked
    before any file is read (whether the kernels suit the checkpoint and the device is :func:`make_plan`'s)."""
    _precision_name(request.get("precision"))
    for kind, table in (("binary", kernels.BINARY_KERNELS), ("index8", kernels.INDEX8_KERNELS)):
        name = request.get(f"{kind}_kernel")
        if name not in (None, "auto") and name not in table:
            raise ValueError(f"unknown {kind} kernel {name!r}; choose one of: auto, {', '.join(table)}")


def checkpoint_plan(device: torch.device | str, request: dict[str, Any], *, folder: str | os.PathLike,
                    raw_config: dict[str, Any]) -> tuple[InferencePlan, dict[str, Any]]:
    """The plan a packed folder runs with, and the full request it was made from (what ``.to(device)`` replays):
    the one place that turns a folder's facts (config.json, its fast calibration record), the device and the
    caller's request (``make_plan``'s keywords) into kernels.

    ``fast`` with the 8-bit kernel left to the plan reads the folder's calibration record
    (:func:`sensimix.calibration_record.calibrated_index8_kernel`: it must be valid, passed and measured on these
    weights, whose checksum the loader then proves) and takes the kernel it names where the device runs it;
    every other request is decided by :func:`make_plan` alone. An A8 checkpoint (config.json's
    ``activation_quant``) runs A8 kernels, and ignores any record: its ``fast`` is exact.
    """
    request = dict(request)
    request["activations"] = A8 if raw_config.get("activation_quant") == A8 else "fp32"
    asks_fast = _precision_name(request.get("precision")) == FAST
    if asks_fast and request["activations"] != A8 and request.get("index8_kernel") in (None, "auto"):
        calibrated = calibrated_index8_kernel(folder, raw_config.get(CHECKSUM_KEY))
        if calibrated:
            request["calibrated_index8"] = calibrated
    return make_plan(device, **request), request
