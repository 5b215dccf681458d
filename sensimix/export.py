"""From the quantization-aware model to the packed one: :func:`convert` in memory, :func:`export_checkpoint` to disk.

``convert(qat)`` quantizes every fake-quantized module of a trained QAT model with the ``pack`` method of its
packed twin (8-bit indices + fp16 range, or sign bits), rounds the float tensors to fp16, and returns the packed
inference model holding those tensors. Exporting is saving what ``convert`` returns. The (lo, hi) pair is taken
from the final weights (reference bug 6 fixed), and the QAT model already uses fp16-rounded (lo, hi), so the
packed model reproduces the QAT model's eval forward.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_finite
from .config import SensiMixConfig
from .inference.layers import BinaryLinear, Index8Embedding, Index8Linear
from .inference.model import SensiMixForSequenceClassification
from .inference.plan import make_plan
from .qat import FakeBinaryLinear, FakeIndex8Embedding, FakeIndex8Linear, SensiMixQATForSequenceClassification

log = logging.getLogger(__name__)


def packed_state_dict(model: SensiMixQATForSequenceClassification) -> dict[str, torch.Tensor]:
    """The packed-v1 tensors of ``model`` (see :mod:`sensimix.checkpoint`), on CPU."""
    packed: dict[str, torch.Tensor] = {}
    handled = model.quantized_weight_names()
    for name, module in model.named_modules():
        if isinstance(module, FakeIndex8Embedding):
            parts = Index8Embedding.pack(module.weight)
        elif isinstance(module, FakeIndex8Linear):
            parts = Index8Linear.pack(module.weight, module.bias)
        elif isinstance(module, FakeBinaryLinear):
            parts = BinaryLinear.pack(module.weight, module.bias)
        else:
            continue
        packed.update({f"{name}.{k}": v for k, v in parts.items()})
    for name, tensor in model.state_dict().items():
        if name in handled or name in packed or name.endswith(("position_ids", "token_type_ids")):
            continue  # quantized above, or constant buffers
        t = tensor.detach().cpu()
        packed[name] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
    return packed


def _packed_config(model: SensiMixQATForSequenceClassification) -> SensiMixConfig:
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        fields.pop(key, None)
    return SensiMixConfig(**fields)


def convert(model: SensiMixQATForSequenceClassification, device: torch.device | str | None = None,
            precision: str | None = None, **plan: Any) -> SensiMixForSequenceClassification:
    """The packed inference model of a trained QAT model, in memory (``device``/``precision``/kernel options as
    :meth:`SensiMixForSequenceClassification.from_pretrained`; ``device=None`` leaves it unprepared).

    Every 1-bit FFN is converted binarized, whatever the training schedule reached; a warning says so when the
    model was not fully binarized (its eval accuracy then differs from the packed model's). Biases, LayerNorms,
    pooler and classifier are stored in fp16, which the QAT forward rounds them to as well
    (:func:`sensimix.quant.ste_fp16`), so the packed model computes what ``model`` computes in eval mode (logits
    within 1e-5: only the order of float sums differs).
    """
    check_finite(dict(model.state_dict()), f"the {model.config.describe()} to convert")
    mixed = model.config.mixed_layers
    if sorted(model.binarized_layers) != mixed:
        log.warning("converting with every 1-bit FFN binarized, but training had binarized only layers %s of %s",
                    model.binarized_layers, mixed)
    config = _packed_config(model)
    packed = SensiMixForSequenceClassification.from_state_dict(config, packed_state_dict(model), source="QAT model")
    if device is not None or precision is not None or plan:
        plan.setdefault("activations", "a8" if config.a8 else "fp32")
        packed.prepare(make_plan(device or "cpu", precision, **plan))
    return packed


def export_checkpoint(model: SensiMixQATForSequenceClassification, out_dir: str | os.PathLike, tokenizer: Any = None,
                      *, overwrite: bool = False, extra_json: dict[str, object] | None = None) -> Path:
    """Write the packed checkpoint folder of ``model`` atomically: ``convert(model).save_pretrained(out_dir)``.

    ``extra_json`` adds small JSON files (e.g. training metrics). Tensors holding NaN/inf are refused before
    anything is written.
    """
    return convert(model).save_pretrained(out_dir, tokenizer=tokenizer, overwrite=overwrite, extra_json=extra_json)


__all__ = ["convert", "export_checkpoint", "packed_state_dict"]
