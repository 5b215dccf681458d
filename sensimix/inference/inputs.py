"""Checks of a forward's inputs: shapes, dtypes and devices always; value ranges when asked (a host sync on CUDA).
Bad input is one ``ValueError`` naming it, never an error from inside a kernel."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .packing import Packing


def _outside(t: torch.Tensor, limit: int) -> tuple[int, int] | None:
    """(min, max) of ``t`` when a value lies outside [0, limit), else None (one host sync on CUDA)."""
    lo, hi = (int(v) for v in torch.aminmax(t))
    return (lo, hi) if lo < 0 or hi >= limit else None


def check_inputs(model: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any,
                 packing: Packing | None) -> None:
    """Shapes, dtypes and devices always; value ranges when ``model.check_inputs`` (a host sync on CUDA)."""
    cfg = model.config
    if isinstance(input_ids, Mapping):  # model(tokenizer(...)) instead of model(**tokenizer(...))
        raise ValueError(f"input_ids must be a tensor of token ids [batch, seq_len], got a {type(input_ids).__name__} "
                         f"of {sorted(input_ids)[:4]}: pass the tokenizer's output unpacked, model(**inputs)")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids [batch, seq_len], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got shape {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0:
        raise ValueError("input_ids is an empty batch (shape [0, L]): nothing to classify")
    limit = cfg.max_position_embeddings
    if not 0 < seq <= limit:
        raise ValueError(f"sequence length {seq} is outside [1, max_position_embeddings={limit}] of this model: "
                         f"truncate the inputs (tokenizer(..., truncation=True, max_length={limit}); "
                         f"--max-seq-length {limit} on the command line)")
    if input_ids.device != model.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {model.device}: move them with "
                         f".to(model.device)")
    for name, t, dtypes in (("attention_mask", attention_mask, None),
                            ("token_type_ids", token_type_ids, (torch.int64, torch.int32))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor like input_ids, got {type(t).__name__}")
        if tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(input_ids.shape)} like input_ids")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} must be int64 or int32 segment ids, got {t.dtype}")
        if t.dtype.is_complex:
            raise ValueError(f"{name} must be a real tensor, got {t.dtype}")
    if packing is not None and not isinstance(packing, Packing):
        raise ValueError(f"packing must be a Packing (Packing.of(attention_mask)), got {type(packing).__name__}")
    if packing is not None and (packing.batch_shape != tuple(input_ids.shape) or packing.device != input_ids.device):
        raise ValueError(f"packing was made for a {list(packing.batch_shape)} mask on {packing.device}, but the "
                         f"inputs are {list(input_ids.shape)} on {input_ids.device}")
    if packing is not None and attention_mask is None:
        raise ValueError("packing was given without the attention_mask it was made from: pass both")
    if not model.check_inputs:
        return
    for name, t, limit, field in (("input_ids", input_ids, cfg.vocab_size, "vocab_size"),
                                  ("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")):
        if t is not None and (bad := _outside(t, limit)):
            raise ValueError(f"{name} must lie in [0, {limit}) ({field} of this model), got values in "
                             f"[{bad[0]}, {bad[1]}]; were the inputs made with this model's tokenizer?")
    if attention_mask is not None and not attention_mask.dtype == torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (1 = attend)")
    if attention_mask is not None:
        attended = attention_mask.bool()
        if rows := _rows(~attended.any(dim=1)):
            raise ValueError(f"attention_mask row(s) {rows} attend no token: such a sequence holds no input to "
                             f"classify (its logits would mean nothing); drop it from the batch, or attend at least "
                             f"its [CLS] token")
        if rows := _rows(~attended[:, 0]):
            raise ValueError(f"attention_mask masks the first token of sequence(s) {rows}: BERT classifies from each "
                             f"sequence's first token ([CLS]), so it must be attended; pad on the right (the "
                             f"tokenizer's padding_side='right', BERT's default)")
        if packing is not None and not (packing.index.numel() == int(attended.sum())
                                        and bool(attended.reshape(-1)[packing.index].all())):
            raise ValueError("packing was made from another attention mask than this batch's (same shape, other "
                             "tokens attended): make it with Packing.of(attention_mask) of these inputs")


def _rows(flags: torch.Tensor) -> str:
    """The flagged rows of a [B] bool tensor, as '[i, j, ...]' (the first five), or '' when none is."""
    rows = flags.nonzero().squeeze(1).tolist()
    return f"{rows[:5]}{' ...' if len(rows) > 5 else ''}" if rows else ""


def check_labels(model: Any, labels: Any, batch: int) -> None:
    """Class ids [batch] in [0, num_labels): a SensiMix model classifies (no regression head)."""
    num_labels = model.config.num_labels
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor of class ids [batch], got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be integer class ids in [0, {num_labels}), got {labels.dtype} (a SensiMix "
                         f"model classifies; it has no regression head)")
    if labels.numel() != batch:
        raise ValueError(f"labels has {labels.numel()} value(s) (shape {list(labels.shape)}), expected one class id "
                         f"per example: [{batch}]")
    if model.check_inputs and (bad := _outside(labels, num_labels)):
        raise ValueError(f"labels must lie in [0, {num_labels}) (num_labels of this model), got values in "
                         f"[{bad[0]}, {bad[1]}]")


def check_logits(model: Any, logits: torch.Tensor) -> None:
    """fp16 logits that overflowed (NaN/inf) are an error naming the fix, never a prediction. ``forward`` calls it
    when ``model.check_inputs`` (one host read on CUDA, like the input checks); without it (the timed paths,
    ``compile``) nothing is read here, and :func:`sensimix.measure.run_inference` judges every batch's logits after
    the timed region."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"the fp16 forward overflowed: the logits of sequence(s) {_rows(bad)} are NaN/inf (fp16 holds "
                         f"values up to 65,504, and this model's activations exceed it). Load it with precision='fp32' "
                         f"(exact) or 'bf16' (fp32's range)")
