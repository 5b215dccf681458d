"""SensiMix: sensitivity-aware 8-bit index / 1-bit value mixed-precision quantization of BERT."""

from transformers import AutoConfig

from .config import SensiMixConfig

AutoConfig.register(SensiMixConfig.model_type, SensiMixConfig, exist_ok=True)

__all__ = ["SensiMixConfig", "__version__"]
__version__ = "0.1.0"
