"""SensiMix: sensitivity-aware 8-bit index / 1-bit value mixed-precision quantization of BERT.

``import sensimix`` registers the packed model with transformers' Auto classes, so that
``AutoModelForSequenceClassification.from_pretrained(folder)`` and ``pipeline("text-classification", model=folder)``
load a packed SensiMix folder.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .config import SensiMixConfig
from .inference import SensiMixForSequenceClassification

AutoConfig.register(SensiMixConfig.model_type, SensiMixConfig, exist_ok=True)
AutoModelForSequenceClassification.register(SensiMixConfig, SensiMixForSequenceClassification, exist_ok=True)

__all__ = ["SensiMixConfig", "SensiMixForSequenceClassification", "__version__"]
__version__ = "0.2.0"
