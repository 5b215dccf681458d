"""SensiMix: sensitivity-aware 8-bit index / 1-bit value mixed-precision quantization of BERT.

``import sensimix`` registers the packed model with transformers' Auto classes, so that
``AutoModelForSequenceClassification.from_pretrained(folder)`` and ``pipeline("text-classification", model=folder)``
load a packed SensiMix folder. The model module itself is imported on first use (``sensimix --help`` stays light).
"""

from typing import Any

from transformers import AutoConfig, AutoModelForSequenceClassification

from .config import SensiMixConfig
from .version import __version__

__all__ = ["SensiMixConfig", "SensiMixForSequenceClassification", "__version__"]


class _AutoEntry:
    """What the Auto classes call for a ``sensimix`` config: the real class, imported on first use."""

    config_class = SensiMixConfig

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        from .inference import SensiMixForSequenceClassification

        return SensiMixForSequenceClassification.from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config: SensiMixConfig, **kwargs: Any) -> Any:
        # AutoModel*.from_config: a packed model's buffers are int8 indices and sign bits that only an export fills
        raise ValueError("a packed SensiMix model cannot be built from a config alone (its int8 indices and sign bits "
                         "come from a trained model): load a folder with from_pretrained, or export a "
                         "quantization-aware model (sensimix.export.convert)")

    from_config = _from_config


# pipeline() checks the model's class name against the registered classes' names
_AutoEntry.__name__ = _AutoEntry.__qualname__ = "SensiMixForSequenceClassification"

AutoConfig.register(SensiMixConfig.model_type, SensiMixConfig, exist_ok=True)
AutoModelForSequenceClassification.register(SensiMixConfig, _AutoEntry, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name == "SensiMixForSequenceClassification":
        from .inference import SensiMixForSequenceClassification

        return SensiMixForSequenceClassification
    raise AttributeError(f"module 'sensimix' has no attribute {name!r}")
