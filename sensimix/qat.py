"""The quantization-aware (training) SensiMix model: fake-quantized modules with fp32 master weights.

A SensiMix model is a BERT for sequence classification in which the embedding tables and Linear layers are
swapped for fake-quantizing twins (SENSIMIX.md section 1); the ``Fake*`` names keep them apart from the packed
inference modules of :mod:`sensimix.inference`:

* ``FakeIndex8Embedding`` / ``FakeIndex8Linear``: 8-bit index quantization with an identity STE;
* ``FakeBinaryLinear``: the 1-bit FFN linears of the mixed layers, ``sign(x) @ W'^T + b`` where ``W'`` is
  ``sign(W)`` (hardtanh STE) once the layer is binarized, or ``W`` itself before that (Prioritized Training);
* ``Fp16Linear`` / ``Fp16LayerNorm`` / ``Fp16Embedding``: the pooler and classifier, the LayerNorms and the
  token-type embeddings, whose tensors the checkpoint stores in fp16.

Every tensor the checkpoint stores in fp16 (those, and the biases of the quantized linears) is rounded to fp16 in
every forward, with an identity straight-through gradient to its fp32 master value (:func:`sensimix.quant.ste_fp16`):
the model trains in the arithmetic it is deployed in, so export changes nothing it computed.

Parameter names are those of ``transformers``' BERT, so a pre-trained BERT loads into it unchanged and
``save_pretrained`` / ``from_pretrained`` round-trip the fp32 master weights (training checkpoints). The packed
inference model is made from it by :func:`sensimix.export.convert`, and written by
:func:`sensimix.export.export_checkpoint`.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertSelfAttention

from . import a8
from .config import MAX_LABELS, SensiMixConfig
from .quant import abwr, ste_fp16, ste_index8, ste_sign_input, ste_sign_weight
from .sources import (SourceError, bert_config, check_weights_fit, dropped_layer, is_random, quiet_loading,
                      weights_error)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# quantization-aware modules
# ---------------------------------------------------------------------------------------------------
class FakeIndex8Linear(nn.Linear):
    """nn.Linear whose weight is 8-bit index fake-quantized in every forward (bias stays float, fp16-rounded).

    With ``a8`` (an A8 model) its input is quantized per row too and the forward is the deployed integer arithmetic
    itself (:func:`sensimix.a8.ste_linear`), in training and in eval alike.
    """

    a8: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a8:
            return a8.ste_linear(x, self.weight, self.bias, _deployed_linear(x.device))
        return F.linear(x, ste_index8(self.weight), ste_fp16(self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", a8" if self.a8 else "")


def _deployed_linear(device: torch.device) -> Callable | None:
    """The device's A8 kernel as ``(x, q, weight_range, bias) -> y`` when it is a native one (the same bits as
    :func:`sensimix.a8.linear`, several times faster on a CPU with VNNI); None: the torch definition."""
    from . import kernels

    name = kernels.default_index8_kernel(device, "a8")
    if name in ("a8-torch", "a8-reference"):
        return None
    kernel = kernels.INDEX8_KERNELS[name]

    def compute(x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor | None):
        return kernel.linear(x.reshape(-1, x.shape[-1]).contiguous(), kernel.prepare([(q, weight_range, bias)],
                                                                                     torch.float32))
    return compute


class FakeIndex8Embedding(nn.Embedding):
    """nn.Embedding whose table is 8-bit index fake-quantized in every forward."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, ste_index8(self.weight), self.padding_idx)


class FakeBinaryLinear(nn.Linear):
    """1-bit value linear: ``sign(x) @ sign(W)^T + b`` (no scale) once ``binarized``; before, ``sign(x) @ W^T + b``.

    The input STE is the identity; the weight STE passes gradients where ``|W| <= 1``. Both stay active in every
    phase, including the final all-binarized one (reference bug 1).

    The bias is added after the product, not inside ``F.linear``: addmm may start its sum from the bias, and then a
    tiny bias (2^-24 in pre-trained MiniLM) vanishes in ``b + 1 - 1``, so a product of 0 plus that bias came out 0
    (sign -1) here but 2^-24 (sign +1) in the packed model, which adds the bias to the exact integer once.
    """

    binarized: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste_sign_weight(self.weight) if self.binarized else self.weight
        y = F.linear(ste_sign_input(x), w)
        return y if self.bias is None else y + ste_fp16(self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binarized={self.binarized}"


class Fp16Linear(nn.Linear):
    """A float linear the checkpoint stores in fp16 (pooler, classifier): weight and bias rounded in every forward.
    In an A8 model in eval mode it is :func:`sensimix.a8.dense` (fp64 sums rounded once)."""

    a8: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a8 and not self.training:
            return a8.eval_dense(x, self.weight, self.bias)
        return F.linear(x, ste_fp16(self.weight), ste_fp16(self.bias))


class A8Tanh(nn.Module):
    """The pooler's tanh of an A8 model: :func:`sensimix.a8.tanh` in eval mode, torch's in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) if self.training else a8.eval_tanh(x)


class Fp16LayerNorm(nn.LayerNorm):
    """A LayerNorm whose weight and bias the checkpoint stores in fp16: rounded in every forward. In an A8 model
    in eval mode it is :func:`sensimix.a8.layer_norm` (the deployed rounding; training uses torch's, which differs
    by float rounding only)."""

    a8: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a8 and not self.training:
            return a8.eval_layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, ste_fp16(self.weight), ste_fp16(self.bias), self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", a8" if self.a8 else "")


class A8Gelu(nn.Module):
    """The GELU of an A8 model's 8-bit FFN: :func:`sensimix.a8.gelu` in eval mode, torch's erf GELU in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x) if self.training else a8.eval_gelu(x)


class A8SelfAttention(BertSelfAttention):
    """BERT self-attention whose eval forward is :func:`sensimix.a8.attention` (fp64 sums rounded once: what the
    packed runtime computes); training runs transformers' own (with its dropout)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if self.training:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        lead = hidden_states.shape[:-1]
        heads = (*lead, -1, self.attention_head_size)
        q, k, v = (m(hidden_states).view(heads).transpose(1, 2) for m in (self.query, self.key, self.value))
        keep = None
        if attention_mask is not None:  # sdpa passes a bool mask (True: attend), eager an additive 0 / -inf one
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        ctx = a8.eval_attention(q, k, v, keep, self.scaling)
        return ctx.transpose(1, 2).reshape(*lead, -1), None


class Fp16Embedding(nn.Embedding):
    """A float embedding table the checkpoint stores in fp16 (token types): rounded in every forward."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, ste_fp16(self.weight), self.padding_idx)


def _swap(parent: nn.Module, name: str, cls: type[nn.Module]) -> None:
    """Replace ``parent.<name>`` by a ``cls`` sharing the same parameters (names and storage unchanged)."""
    old = getattr(parent, name)
    if isinstance(old, nn.Linear):
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
    elif isinstance(old, nn.Embedding):
        new = cls(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx, device="meta")
        new.weight = old.weight
    elif isinstance(old, nn.LayerNorm):
        new = cls(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                  bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
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
    """Swap a ``BertModel``'s modules for their SensiMix QAT twins, in place: 8-bit embeddings and encoder Linears,
    1-bit FFNs, and fp16-stored twins of every other module with float tensors (LayerNorms, token types, pooler)."""
    _swap(bert.embeddings, "word_embeddings", FakeIndex8Embedding)
    _swap(bert.embeddings, "position_embeddings", FakeIndex8Embedding)
    _swap(bert.embeddings, "token_type_embeddings", Fp16Embedding)
    _swap(bert.embeddings, "LayerNorm", Fp16LayerNorm)
    for i, layer in enumerate(bert.encoder.layer):
        for parent, attr in attention_linears(layer):
            _swap(parent, attr, FakeIndex8Linear)
        eightbit = i < config.num_8bit_layers
        for parent, attr in ffn_linears(layer):
            _swap(parent, attr, FakeIndex8Linear if eightbit else FakeBinaryLinear)
        _swap(layer.attention.output, "LayerNorm", Fp16LayerNorm)
        _swap(layer.output, "LayerNorm", Fp16LayerNorm)
        if config.a8:
            layer.attention.self.__class__ = A8SelfAttention  # the same module and parameters, another forward
            if eightbit and config.hidden_act == "gelu":  # ReLU is exact anywhere; a mixed layer keeps only signs
                layer.intermediate.intermediate_act_fn = A8Gelu()
    if bert.pooler is not None:
        _swap(bert.pooler, "dense", Fp16Linear)
        if config.a8:
            bert.pooler.activation = A8Tanh()
    if config.a8:
        for module in bert.modules():
            if isinstance(module, (FakeIndex8Linear, Fp16LayerNorm, Fp16Linear)):
                module.a8 = True


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
        if not 2 <= config.num_labels <= MAX_LABELS:
            raise ValueError(
                f"num_labels must be in [2, {MAX_LABELS}] (classification); got {config.num_labels}. Regression "
                "tasks such as STS-B are not supported by SensiMix's recipe"
            )
        super().__init__(config)
        quantize_bert_for_training(self.bert, config)
        _swap(self, "classifier", Fp16Linear)
        self.classifier.a8 = config.a8

    # -- 1-bit FFN control (Inverse Layer-wise Fine-tuning) ----------------------------------------
    def binary_linears(self, layers: Iterable[int] | None = None) -> Iterator[tuple[int, FakeBinaryLinear]]:
        wanted = set(self.config.mixed_layers if layers is None else layers)
        for i, layer in enumerate(self.bert.encoder.layer):
            if i in wanted:
                for parent, attr in ffn_linears(layer):
                    module = getattr(parent, attr)
                    if isinstance(module, FakeBinaryLinear):
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
                if isinstance(m, (FakeIndex8Linear, FakeIndex8Embedding, FakeBinaryLinear))}

    @torch.no_grad()
    def round_float_tensors_to_fp16_(self) -> int:
        """Round every float tensor the checkpoint stores in fp16 (biases, LayerNorms, token-type embeddings,
        pooler, classifier) to fp16 values in place, master weights included; returns how many tensors. The forward
        rounds them already (the ``Fp16*`` modules), so this changes no output: it makes the master weights
        themselves what the checkpoint stores."""
        quantized = self.quantized_weight_names()
        count = 0
        for name, t in self.state_dict(keep_vars=True).items():
            if name not in quantized and t.is_floating_point():
                t.data.copy_(t.data.to(torch.float16))
                count += 1
        return count


def from_bert(
    source: str | os.PathLike | BertConfig,
    *,
    num_hidden_layers: int = 3,
    num_8bit_layers: int = 2,
    num_labels: int = 2,
    activation_quant: str | None = None,
    seed: int | None = None,
    **config_overrides: object,
) -> SensiMixQATForSequenceClassification:
    """Build a SensiMix (a+b) QAT model initialised from the first N layers of a BERT.

    ``source`` is a local checkpoint folder or hub id (pre-trained or fine-tuned BERT; a fine-tuned
    classifier head with the same ``num_labels`` is kept), ``random:bert-base`` or a ``BertConfig`` for
    random weights. ``activation_quant="a8"`` makes an A8 model (:mod:`sensimix.a8`).
    """
    tcfg = bert_config(source)
    fields = tcfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "num_8bit_layers", "_name_or_path"):
        fields.pop(key, None)
    fields.update(config_overrides)
    fields.update(num_hidden_layers=num_hidden_layers, num_labels=num_labels, activation_quant=activation_quant)
    if "id2label" in fields and len(fields["id2label"]) != num_labels:
        fields.pop("id2label")
        fields.pop("label2id", None)
    config = SensiMixConfig(num_8bit_layers=num_8bit_layers, **fields)
    config.validate_sensimix(teacher_layers=tcfg.num_hidden_layers)
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(source, BertConfig) or is_random(source):
        log.info("building %s with random weights (%s geometry)", config.describe(),
                 source if is_random(source) else "given")
        return SensiMixQATForSequenceClassification(config)
    log.info("initialising %s from the first %d layers of %s", config.describe(), num_hidden_layers, source)
    from safetensors import SafetensorError

    try:
        check_weights_fit(source, tcfg, layers=num_hidden_layers)  # from the file's index, before any allocation
        # a fine-tuned head for another label count is re-initialised (and logged), not a load error
        with quiet_loading():  # the dropped upper layers are said in one line below, not transformers' table
            model, info = SensiMixQATForSequenceClassification.from_pretrained(
                os.fspath(source), config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    except SourceError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise weights_error(source, exc) from exc
    _log_loading_info(info, source, num_hidden_layers, tcfg.num_hidden_layers)
    return model


# tensors a BERT checkpoint may lack: the task head (and pooler) are newly initialised when missing
_HEAD = ("classifier.", "bert.pooler.")


def _log_loading_info(info: dict, source: object, kept: int, teacher_layers: int) -> None:
    body = sorted(k for k in info.get("missing_keys", []) if not k.startswith(_HEAD))
    if body:  # the encoder would run on random weights: never silently
        raise SourceError(f"{source} lacks {len(body)} encoder weight(s) SensiMix starts from (e.g. "
                          f"{', '.join(body[:3])}); they would be random. Is it a BERT checkpoint of this geometry?")
    unexpected = [k for k in info.get("unexpected_keys", []) if not dropped_layer(k, kept)]
    if kept < teacher_layers:
        log.info("dropped layers %d-%d of %s (SensiMix keeps the first %d)", kept, teacher_layers - 1, source, kept)
    if info.get("missing_keys"):
        log.info("newly initialised (not in %s): %s", source, ", ".join(sorted(info["missing_keys"])))
    if unexpected:
        log.warning("ignored tensors of %s that SensiMix does not use: %s", source, ", ".join(sorted(unexpected)))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    body = [k for k in mismatched if not k.startswith(_HEAD)]
    if body:  # config.json and the weights disagree: the encoder would start from random values there
        raise SourceError(f"{source}: its weights do not match its config.json: {len(body)} encoder tensor(s) have "
                          f"another shape (e.g. {', '.join(body[:3])}); fix config.json or re-save the model")
    if mismatched:  # a fine-tuned head for another label count
        log.info("re-initialised (another shape in %s): %s", source, ", ".join(mismatched))
