"""SensiMixConfig: a BERT config plus the SensiMix (a+b) layer split, validated field by field.

N = ``num_hidden_layers`` encoder layers are kept; the first a = ``num_8bit_layers`` are "8-bit layers"
(every Linear 8-bit index quantized), the last b = N - a are "mixed layers" (8-bit attention, 1-bit FFN).

Every field the models read is checked when a config is made (also from a tampered ``config.json``), so a bad
value is one ``ValueError`` naming the field and what it must be, before any tensor is allocated.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import BertConfig

# Largest accepted sizes: far above any BERT, low enough that a typo cannot ask for terabytes of weights.
MAX_DIM = 1 << 16          # hidden_size, intermediate_size, max_position_embeddings
MAX_VOCAB = 1 << 21
MAX_LAYERS = 256
MAX_PARAMETERS = 20_000_000_000
MAX_LABELS = 100_000      # num_labels: a classifier of at least 2 and at most this many classes

ACTIVATION_QUANT = "a8"     # the one value of activation_quant (sensimix.a8.A8)
A8_ACTIVATIONS = ("gelu", "relu")  # sensimix.a8 specifies their rounding

# activations f with f(z) > 0 iff z > 0: sign(f(z)) == sign(z), so a mixed layer may skip f exactly
SIGN_PRESERVING_ACTS = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_python", "gelu_pytorch_tanh", "quick_gelu",
                                  "relu", "silu", "swish", "tanh"})


def _shown(value: Any, width: int = 40) -> str:
    """``repr(value)``, cut to ``width`` characters: a tampered field may be huge."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _positive_int(name: str, value: Any, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {_shown(value)} ({type(value).__name__})")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be in [1, {limit}], got {_shown(value)}")
    return value


def _label_maps(kwargs: dict[str, Any]) -> None:
    """id2label / label2id must be JSON objects (transformers calls .items() on them)."""
    for name in ("id2label", "label2id"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be an object mapping label ids and names, got {type(value).__name__}")


def validate_geometry(config: Any, layers: str = "num_hidden_layers") -> None:
    """Raise ``ValueError`` naming the first field of a BERT config (sizes, depth, LayerNorm epsilon, dropout)
    outside its allowed range, before any tensor is allocated. ``layers`` is how the depth is named."""
    n = _positive_int(layers, config.num_hidden_layers, MAX_LAYERS)
    h = _positive_int("hidden_size", config.hidden_size, MAX_DIM)
    heads = _positive_int("num_attention_heads", config.num_attention_heads, MAX_DIM)
    if h % heads:
        raise ValueError(f"hidden_size ({h}) must be a multiple of num_attention_heads ({heads})")
    inter = _positive_int("intermediate_size", config.intermediate_size, MAX_DIM)
    vocab = _positive_int("vocab_size", config.vocab_size, MAX_VOCAB)
    positions = _positive_int("max_position_embeddings", config.max_position_embeddings, MAX_DIM)
    types = _positive_int("type_vocab_size", config.type_vocab_size, MAX_DIM)
    eps = config.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps < 1:
        raise ValueError(f"layer_norm_eps must be a finite number in (0, 1), got {eps!r}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = getattr(config, name, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    act = getattr(config, "hidden_act", "gelu")
    if not callable(act):
        from transformers.activations import ACT2FN

        if not isinstance(act, str) or act not in ACT2FN:
            raise ValueError(f"hidden_act must name one of transformers' activations (e.g. 'gelu'), got "
                             f"{_shown(act)}")
    params = vocab * h + positions * h + types * h + n * (4 * h * h + 2 * h * inter)
    if params > MAX_PARAMETERS:
        raise ValueError(f"this geometry has {params:,} weights (> {MAX_PARAMETERS:,}): a typo in config.json?")


class SensiMixConfig(BertConfig):
    """A :class:`~transformers.BertConfig` that also says which layers are 8-bit and which are mixed.

    Args:
        num_8bit_layers: a, the number of leading encoder layers quantized entirely to 8 bits.
            ``0 <= a <= num_hidden_layers``; the remaining layers get a 1-bit FFN.
        activation_quant: None (the default: the 8-bit linears read fp32 activations) or ``"a8"``: every 8-bit
            linear's input is quantized per row to 8-bit integers and the model computes :mod:`sensimix.a8`'s
            specified arithmetic (integer GEMMs; LayerNorms, GELUs and attention with fixed roundings).
        **kwargs: any :class:`BertConfig` field (``num_hidden_layers`` is N = a + b).
    """

    model_type = "sensimix"

    def __init__(self, num_8bit_layers: int = 2, activation_quant: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("num_hidden_layers", 3)
        _label_maps(kwargs)
        try:
            super().__init__(**kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers' own field checks (huggingface_hub's strict
            # dataclass errors are neither TypeError nor ValueError): one ValueError, on one line
            raise ValueError(" ".join(str(exc).split())) from exc
        self.num_8bit_layers = num_8bit_layers
        self.activation_quant = activation_quant
        self.validate_sensimix()

    # -- validation -------------------------------------------------------------------------------
    def validate_sensimix(self, teacher_layers: int | None = None) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""
        n = _positive_int("num_hidden_layers (N = a + b)", self.num_hidden_layers, MAX_LAYERS)
        a = self.num_8bit_layers
        if not isinstance(a, int) or isinstance(a, bool):
            raise ValueError(f"num_8bit_layers must be an integer, got {a!r} ({type(a).__name__})")
        if not 0 <= a <= n:
            raise ValueError(f"num_8bit_layers (a; compress --8bit-layers) must be in [0, num_hidden_layers={n}], got "
                             f"{a}; the remaining N - a layers get a 1-bit FFN")
        if teacher_layers is not None and n > teacher_layers:
            raise ValueError(
                f"num_hidden_layers (N = a + b; compress --layers) must be in [1, {teacher_layers}] (the "
                f"pre-trained BERT's depth), got {n}: SensiMix keeps the first N layers of the BERT it compresses")
        validate_geometry(self, layers="num_hidden_layers (N = a + b)")
        act = self.hidden_act
        if not isinstance(act, str) or act not in SIGN_PRESERVING_ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported; SensiMix needs an activation f with f(z) > 0 "
                             f"iff z > 0 (so the 1-bit FFN can skip it exactly): "
                             f"{', '.join(sorted(SIGN_PRESERVING_ACTS))}")
        quant = getattr(self, "activation_quant", None)
        if quant is not None and quant != ACTIVATION_QUANT:
            raise ValueError(f"activation_quant must be absent (fp32 activations) or {ACTIVATION_QUANT!r} (8-bit "
                             f"activations; compress --activations a8), got {_shown(quant)}")
        if quant == ACTIVATION_QUANT and act not in A8_ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} has no A8 rule (its rounding must be specified to deploy it "
                             f"exactly); A8 models take {' or '.join(A8_ACTIVATIONS)}: train with fp32 activations")
        kind = getattr(self, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type {kind!r} is not supported: SensiMix (like bert-base) uses "
                             f"absolute position embeddings")

    # -- layer roles ------------------------------------------------------------------------------
    @property
    def num_mixed_layers(self) -> int:
        """b: the number of trailing layers with a 1-bit FFN."""
        return self.num_hidden_layers - self.num_8bit_layers

    @property
    def mixed_layers(self) -> list[int]:
        """Indices of the layers whose FFN is 1-bit (the top b layers)."""
        return list(range(self.num_8bit_layers, self.num_hidden_layers))

    @property
    def a8(self) -> bool:
        """Whether the 8-bit linears read 8-bit activations (``activation_quant == "a8"``)."""
        return getattr(self, "activation_quant", None) == ACTIVATION_QUANT

    def describe(self) -> str:
        return f"SensiMix ({self.num_8bit_layers}+{self.num_mixed_layers})" + (" A8" if self.a8 else "")
