"""SensiMixConfig: a BERT config plus the SensiMix (a+b) layer split.

N = ``num_hidden_layers`` encoder layers are kept; the first a = ``num_8bit_layers`` are "8-bit layers"
(every Linear 8-bit index quantized), the last b = N - a are "mixed layers" (8-bit attention, 1-bit FFN).
"""

from __future__ import annotations

from typing import Any

from transformers import BertConfig


class SensiMixConfig(BertConfig):
    """A :class:`~transformers.BertConfig` that also says which layers are 8-bit and which are mixed.

    Args:
        num_8bit_layers: a, the number of leading encoder layers quantized entirely to 8 bits.
            ``0 <= a <= num_hidden_layers``; the remaining layers get a 1-bit FFN.
        **kwargs: any :class:`BertConfig` field (``num_hidden_layers`` is N = a + b).
    """

    model_type = "sensimix"

    def __init__(self, num_8bit_layers: int = 2, **kwargs: Any) -> None:
        kwargs.setdefault("num_hidden_layers", 3)
        super().__init__(**kwargs)
        self.num_8bit_layers = num_8bit_layers
        self.validate_sensimix()

    # -- validation -------------------------------------------------------------------------------
    def validate_sensimix(self, teacher_layers: int | None = None) -> None:
        """Raise ``ValueError`` naming the field and its allowed range if the split is impossible."""
        n, a = self.num_hidden_layers, self.num_8bit_layers
        for name, value in (("num_hidden_layers", n), ("num_8bit_layers", a)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if n < 1:
            raise ValueError(f"num_hidden_layers (N = a + b) must be >= 1, got {n}")
        if not 0 <= a <= n:
            raise ValueError(
                f"num_8bit_layers (a) must be in [0, num_hidden_layers={n}], got {a}; "
                f"the remaining N - a layers get a 1-bit FFN"
            )
        if teacher_layers is not None and n > teacher_layers:
            raise ValueError(
                f"num_hidden_layers (N = a + b) must be in [1, {teacher_layers}] (the pre-trained BERT's depth), "
                f"got {n}: SensiMix keeps the first N layers of the teacher"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )

    # -- layer roles ------------------------------------------------------------------------------
    @property
    def num_mixed_layers(self) -> int:
        """b: the number of trailing layers with a 1-bit FFN."""
        return self.num_hidden_layers - self.num_8bit_layers

    @property
    def mixed_layers(self) -> list[int]:
        """Indices of the layers whose FFN is 1-bit (the top b layers)."""
        return list(range(self.num_8bit_layers, self.num_hidden_layers))

    def describe(self) -> str:
        return f"SensiMix ({self.num_8bit_layers}+{self.num_mixed_layers})"
