"""The quantization-aware (training) SensiMix model.

A SensiMix model is a BERT for sequence classification in which the embedding tables and Linear layers are
swapped for fake-quantizing twins that keep fp32 master weights (SENSIMIX.md section 1):

* ``Index8Embedding`` / ``Index8Linear``: 8-bit index quantization with an identity STE;
* ``BinaryLinear``: the 1-bit FFN linears of the mixed layers, ``sign(x) @ W'^T + b`` where ``W'`` is
  ``sign(W)`` (hardtanh STE) once the layer is binarized, or ``W`` itself before that (Prioritized Training).

Parameter names are those of ``transformers``' BERT, so a pre-trained BERT loads into it unchanged and
``save_pretrained`` / ``from_pretrained`` round-trip the fp32 master weights (training checkpoints). The
packed, compressed checkpoint is written by :mod:`sensimix.export` and served by :mod:`sensimix.runtime`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from .config import SensiMixConfig
from .quant import abwr, ste_index8, ste_sign_input, ste_sign_weight

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_GEOMETRIES = {
    # bert-base-uncased's geometry (BertConfig's defaults): 110M parameters, 438 MB in fp32.
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


# ---------------------------------------------------------------------------------------------------
# quantization-aware modules
# ---------------------------------------------------------------------------------------------------
class Index8Linear(nn.Linear):
    """nn.Linear whose weight is 8-bit index fake-quantized in every forward (bias stays float)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ste_index8(self.weight), self.bias)


class Index8Embedding(nn.Embedding):
    """nn.Embedding whose table is 8-bit index fake-quantized in every forward."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, ste_index8(self.weight), self.padding_idx)


class BinaryLinear(nn.Linear):
    """1-bit value linear: ``sign(x) @ sign(W)^T + b`` (no scale) once ``binarized``; before, ``sign(x) @ W^T + b``.

    The input STE is the identity; the weight STE passes gradients where ``|W| <= 1``. Both stay active in every
    phase, including the final all-binarized one (reference bug 1).
    """

    binarized: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste_sign_weight(self.weight) if self.binarized else self.weight
        return F.linear(ste_sign_input(x), w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binarized={self.binarized}"


def _swap(parent: nn.Module, name: str, cls: type[nn.Module]) -> None:
    """Replace ``parent.<name>`` by a ``cls`` sharing the same parameters (names and storage unchanged)."""
    old = getattr(parent, name)
    if isinstance(old, nn.Linear):
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
    elif isinstance(old, nn.Embedding):
        new = cls(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx, device="meta")
        new.weight = old.weight
    else:  # pragma: no cover - guarded by the callers
        raise TypeError(f"cannot quantize {type(old).__name__} at {name}")
    setattr(parent, name, new)


def attention_linears(layer: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """(parent, attribute) of the four attention Linear layers of a BERT layer."""
    for attr in ("query", "key", "value"):
        yield layer.attention.self, attr
    yield layer.attention.output, "dense"


def ffn_linears(layer: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """(parent, attribute) of the two FFN Linear layers of a BERT layer."""
    yield layer.intermediate, "dense"
    yield layer.output, "dense"


def quantize_bert_for_training(bert: nn.Module, config: SensiMixConfig) -> None:
    """Swap a ``BertModel``'s embeddings and encoder Linears for their SensiMix QAT twins, in place."""
    _swap(bert.embeddings, "word_embeddings", Index8Embedding)
    _swap(bert.embeddings, "position_embeddings", Index8Embedding)
    for i, layer in enumerate(bert.encoder.layer):
        for parent, attr in attention_linears(layer):
            _swap(parent, attr, Index8Linear)
        ffn_cls = BinaryLinear if i >= config.num_8bit_layers else Index8Linear
        for parent, attr in ffn_linears(layer):
            _swap(parent, attr, ffn_cls)


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------
class SensiMixQATForSequenceClassification(BertForSequenceClassification):
    """Quantization-aware SensiMix (a+b) BERT for sequence classification (training and reference model).

    ``token_type_ids`` are passed through like any BERT (reference bug 3 fixed). Regression heads
    (``num_labels == 1``) are refused: SensiMix's recipe and the KOTCA criteria are classification.
    """

    config_class = SensiMixConfig

    def __init__(self, config: SensiMixConfig) -> None:
        if not isinstance(config, SensiMixConfig):
            raise TypeError(f"expected a SensiMixConfig, got {type(config).__name__}")
        config.validate_sensimix()
        if config.num_labels < 2:
            raise ValueError(
                f"num_labels must be >= 2 (classification); got {config.num_labels}. Regression tasks such as "
                "STS-B are not supported by SensiMix's recipe"
            )
        super().__init__(config)
        quantize_bert_for_training(self.bert, config)

    # -- 1-bit FFN control (Inverse Layer-wise Fine-tuning) ----------------------------------------
    def binary_linears(self, layers: Iterable[int] | None = None) -> Iterator[tuple[int, BinaryLinear]]:
        wanted = set(self.config.mixed_layers if layers is None else layers)
        for i, layer in enumerate(self.bert.encoder.layer):
            if i in wanted:
                for parent, attr in ffn_linears(layer):
                    module = getattr(parent, attr)
                    if isinstance(module, BinaryLinear):
                        yield i, module

    def set_binarized_layers(self, layers: Iterable[int]) -> None:
        """Binarize the FFN weights of exactly ``layers`` (each must be a mixed layer)."""
        layers = set(layers)
        bad = layers - set(self.config.mixed_layers)
        if bad:
            raise ValueError(f"layers {sorted(bad)} have no 1-bit FFN; mixed layers are {self.config.mixed_layers}")
        for i, module in self.binary_linears():
            module.binarized = i in layers

    @property
    def binarized_layers(self) -> list[int]:
        return sorted({i for i, m in self.binary_linears() if m.binarized})

    def abwr_loss(self) -> torch.Tensor:
        """Mean over the 1-bit FFN weight matrices of mean((|W| - 1)^2); 0 when there are none."""
        terms = [abwr(m.weight) for _, m in self.binary_linears()]
        if not terms:
            return torch.zeros((), device=self.device)
        return torch.stack(terms).mean()

    def quantized_weight_names(self) -> set[str]:
        """State-dict names of the weights stored quantized (8-bit indices or sign bits); the rest is float."""
        return {f"{name}.weight" for name, m in self.named_modules()
                if isinstance(m, (Index8Linear, Index8Embedding, BinaryLinear))}

    @torch.no_grad()
    def round_float_tensors_to_fp16_(self) -> int:
        """Round every float tensor the checkpoint stores in fp16 (biases, LayerNorms, token-type embeddings,
        pooler, classifier) to fp16 values, in place; returns how many tensors. After it, the model computes
        what its exported checkpoint computes, so an evaluation of it is the checkpoint's."""
        quantized = self.quantized_weight_names()
        count = 0
        for name, t in self.state_dict(keep_vars=True).items():
            if name not in quantized and t.is_floating_point():
                t.data.copy_(t.data.to(torch.float16))
                count += 1
        return count


def _is_random(source: object) -> bool:
    return isinstance(source, str) and source.startswith(RANDOM_PREFIX)


def teacher_config(source: str | os.PathLike | BertConfig) -> BertConfig:
    """The BertConfig of ``source``: a BertConfig, ``random:<geometry>``, a local folder or a hub id."""
    if isinstance(source, BertConfig):
        return source
    if _is_random(source):
        geometry = str(source)[len(RANDOM_PREFIX):]
        if geometry not in RANDOM_GEOMETRIES:
            raise ValueError(
                f"unknown random geometry {geometry!r}; choose one of "
                + ", ".join(RANDOM_PREFIX + g for g in RANDOM_GEOMETRIES)
            )
        return BertConfig(**RANDOM_GEOMETRIES[geometry])
    path = os.fspath(source)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is a folder but has no config.json: not a BERT checkpoint folder")
    try:
        return BertConfig.from_pretrained(path)
    except OSError as exc:
        raise OSError(
            f"could not load a BERT config from {path!r}: give a local checkpoint folder (with config.json), "
            f"a hub id when online (e.g. bert-base-uncased), or random:bert-base for random weights. ({exc})"
        ) from exc


def from_bert(
    source: str | os.PathLike | BertConfig,
    *,
    num_hidden_layers: int = 3,
    num_8bit_layers: int = 2,
    num_labels: int = 2,
    seed: int | None = None,
    **config_overrides: object,
) -> SensiMixQATForSequenceClassification:
    """Build a SensiMix (a+b) QAT model initialised from the first N layers of a BERT.

    ``source`` is a local checkpoint folder or hub id (pre-trained or fine-tuned BERT; a fine-tuned
    classifier head with the same ``num_labels`` is kept), ``random:bert-base`` or a ``BertConfig`` for
    random weights.
    """
    tcfg = teacher_config(source)
    if tcfg.model_type not in ("bert", "sensimix"):
        raise ValueError(f"{source!r} is a {tcfg.model_type!r} model; SensiMix needs a BERT checkpoint")
    fields = tcfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "num_8bit_layers", "_name_or_path"):
        fields.pop(key, None)
    fields.update(config_overrides)
    fields.update(num_hidden_layers=num_hidden_layers, num_labels=num_labels)
    if "id2label" in fields and len(fields["id2label"]) != num_labels:
        fields.pop("id2label")
        fields.pop("label2id", None)
    config = SensiMixConfig(num_8bit_layers=num_8bit_layers, **fields)
    config.validate_sensimix(teacher_layers=tcfg.num_hidden_layers)
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(source, BertConfig) or _is_random(source):
        log.info("building %s with random weights (%s geometry)", config.describe(), source if _is_random(source) else "given")
        return SensiMixQATForSequenceClassification(config)
    log.info("initialising %s from the first %d layers of %s", config.describe(), num_hidden_layers, source)
    # transformers prints a table of every tensor of the dropped upper layers as UNEXPECTED; say it briefly instead
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # a fine-tuned head for another label count is re-initialised (and logged), not a load error
        model, info = SensiMixQATForSequenceClassification.from_pretrained(
            os.fspath(source), config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    _log_loading_info(info, source, num_hidden_layers, tcfg.num_hidden_layers)
    return model


def _log_loading_info(info: dict, source: object, kept: int, teacher_layers: int) -> None:
    upper = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
    unexpected = [k for k in info.get("unexpected_keys", [])
                  if not ((m := upper.search(k)) and int(m.group(1)) >= kept)]
    if kept < teacher_layers:
        log.info("dropped layers %d-%d of %s (SensiMix keeps the first %d)", kept, teacher_layers - 1, source, kept)
    if info.get("missing_keys"):
        log.info("newly initialised (not in %s): %s", source, ", ".join(sorted(info["missing_keys"])))
    if unexpected:
        log.warning("ignored tensors of %s that SensiMix does not use: %s", source, ", ".join(sorted(unexpected)))
    if info.get("mismatched_keys"):
        log.info("re-initialised (another shape in %s): %s", source,
                 ", ".join(sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])))
