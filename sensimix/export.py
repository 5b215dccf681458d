"""Export a trained QAT model to the compressed SensiMix checkpoint folder.

Folder layout (like the certified one, plus safetensors)::

    config.json              SensiMixConfig + "sensimix_format": "packed-v1"
    pytorch_model.bin        the packed state dict (torch.save of plain tensors; load with weights_only=True)
    model.safetensors        the same tensors
    vocab.txt, tokenizer_config.json, special_tokens_map.json (+ tokenizer.json when the tokenizer has one)

Packed state dict ("packed-v1"), keyed by the BERT parameter names:

* 8-bit tensors (word/position embeddings, every Index8Linear weight):
  ``<name>.weight_q`` int8 indices, shape of the weight; ``<name>.weight_range`` fp16 ``[lo, hi]``.
  Dequantize: ``(q + 128) * (hi - lo) / 255 + lo`` (``hi == lo``: the constant ``lo``).
* 1-bit tensors (FFN weights of mixed layers): ``<name>.weight_bits`` uint8 ``[out, ceil(in / 8)]``,
  bit j of byte i = 1 iff W[:, 8 i + j] > 0 (+1), else -1; padding bits are 0.
* Everything else (biases, LayerNorms, token-type embeddings, pooler, classifier): fp16, same name.

The (lo, hi) pair is taken from the final weights at export time (reference bug 6 fixed), and the QAT model
already uses fp16-rounded (lo, hi), so the checkpoint reproduces the QAT model's eval forward.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .io import atomic_dir, save_tokenizer, write_json
from .modeling import BinaryLinear, Index8Embedding, Index8Linear, SensiMixQATForSequenceClassification
from .quant import index8_quantize, pack_signs

log = logging.getLogger(__name__)

FORMAT = "packed-v1"
WEIGHTS_BIN = "pytorch_model.bin"
WEIGHTS_SAFETENSORS = "model.safetensors"


def packed_state_dict(model: SensiMixQATForSequenceClassification) -> dict[str, torch.Tensor]:
    """The compressed tensors of ``model`` (see the module docstring for the format)."""
    packed: dict[str, torch.Tensor] = {}
    handled = model.quantized_weight_names()
    for name, module in model.named_modules():
        if isinstance(module, (Index8Linear, Index8Embedding)):
            q, lo, hi = index8_quantize(module.weight.detach())
            packed[f"{name}.weight_q"] = q.cpu().contiguous()
            packed[f"{name}.weight_range"] = torch.stack([lo, hi]).to(torch.float16).cpu()
        elif isinstance(module, BinaryLinear):
            packed[f"{name}.weight_bits"] = pack_signs(module.weight.detach()).cpu().contiguous()
    for name, tensor in model.state_dict().items():
        if name in handled:
            continue
        if name.endswith("position_ids") or name.endswith("token_type_ids"):  # constant buffers
            continue
        t = tensor.detach().cpu()
        packed[name] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
    return packed


def export_checkpoint(
    model: SensiMixQATForSequenceClassification,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    extra_json: dict[str, object] | None = None,
) -> Path:
    """Write the compressed checkpoint folder atomically (temp folder beside ``out_dir``, then rename).

    ``extra_json`` adds small JSON files (e.g. training metrics) to the folder. Every 1-bit FFN is exported
    binarized, whatever the training schedule reached; a warning says so when the model was not fully
    binarized (its eval accuracy then differs from the checkpoint's).
    """
    out = Path(out_dir)
    mixed = model.config.mixed_layers
    if sorted(model.binarized_layers) != mixed:
        log.warning(
            "exporting with every 1-bit FFN binarized, but training had binarized only layers %s of %s",
            model.binarized_layers, mixed,
        )
    tensors = packed_state_dict(model)
    config = model.config.to_dict()
    config.update(
        sensimix_format=FORMAT,
        architectures=["SensiMixForSequenceClassification"],
        sign_of_zero=-1,
        bit_order="little",
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / "config.json", config)
        torch.save(tensors, tmp / WEIGHTS_BIN)
        save_file(tensors, str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt", "sensimix_format": FORMAT})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
    log.info("wrote %s (%s, %.1f MB pytorch_model.bin)", out, model.config.describe(),
             (out / WEIGHTS_BIN).stat().st_size / 1e6)
    return out
