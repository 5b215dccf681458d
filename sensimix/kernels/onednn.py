"""oneDNN bf16 GEMMs for the 8-bit linears (APPROXIMATE), with the bias and GELU in the GEMM epilogue."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..devices import cpu_has_bf16
from ..quant import index8_dequantize
from .base import Index8Kernel, Prepared


@functools.lru_cache(maxsize=1)
def onednn_linear_ok() -> bool:
    """``torch.ops.mkldnn._linear_pointwise`` (oneDNN linear with bias and GELU in the epilogue) works here.

    It is the op torch.compile's CPU backend emits; private, so it is checked once on a tiny problem against
    ``F.linear`` + ``F.gelu`` and the ``bf16`` kernel falls back to those when it is missing or disagrees.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((5, 24), (7, 24), (7,)))
        want = F.linear(x.float(), w.float(), b.float())
        plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        tol = 0.02 * float(want.abs().max()) + 0.02  # bf16 output rounding (2^-8 relative) with margin
        return bool((plain.float() - want).abs().max() <= tol and (gelu.float() - F.gelu(want)).abs().max() <= tol)
    except Exception:  # noqa: BLE001 - a private op: any failure means "use the public ops"
        return False


class Bf16Index8Kernel(Index8Kernel):
    """APPROXIMATE: ``W_hat`` dequantized once in fp32 and rounded to bf16; bf16 GEMM (fp32 accumulation).

    Returns bf16 whatever the input dtype: in a bf16-kernel model the next op (SDPA, GELU, the next bf16 linear)
    runs in bf16 too, and the residual add promotes back to fp32 before the LayerNorm. Rounding both operands to
    bf16 (8 significant bits) gives a relative error of about 2^-9 per product (at most 2^-7: two roundings of at
    most 2^-8 each), i.e. ~2^-9 * |x| |w| * sqrt(K) on an output (random-sign rounding errors add up as a random
    walk). Fast only on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere oneDNN emulates bf16, slower than fp32.

    On CPUs with oneDNN the GEMM is ``mkldnn._linear_pointwise`` with the bias (and an erf GELU through
    ``linear_act``) applied in the GEMM epilogue: ``F.linear`` first broadcasts the bias into the [M, N] output (an
    extra pass) and a separate GELU is another two; measured 20-25% of the FFN intermediate's time.
    """

    name = "bf16"
    exact = False
    out_dtype = torch.bfloat16
    fusable = True
    ACTIVATIONS: ClassVar[dict[str, tuple[str, str]]] = {"gelu": ("gelu", "none"), "relu": ("relu", "")}

    def fast_on(self, device):
        return device.type == "cuda" or cpu_has_bf16()

    def prepare_one(self, q, weight_range, dtype):
        lo, hi = weight_range.float()
        return index8_dequantize(q, lo, hi, torch.bfloat16), weight_range.float()

    def fuses_activation(self, act, device):
        return act in self.ACTIVATIONS and torch.device(device).type == "cpu" and onednn_linear_ok()

    def linear(self, x, p):
        return self._run(x, p, None)

    def linear_act(self, x, p, act):
        if not self.fuses_activation(act, x.device):
            return super().linear_act(x, p, act)
        return self._run(x, p, act)

    def _run(self, x: torch.Tensor, p: Prepared, act: str | None) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if x.device.type == "cpu" and onednn_linear_ok():
            attr, algorithm = self.ACTIVATIONS[act] if act else ("none", "")
            lead = x.shape[:-1]
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), p.weight, p.bias, attr, [], algorithm)
            return y.view(*lead, y.shape[-1])
        return F.linear(x, p.weight, p.bias)
