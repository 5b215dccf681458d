"""Packed SensiMix inference: the transformers-loadable model, its precision recipes and token packing."""

from .model import SensiMixForSequenceClassification
from .packing import Packing
from .plan import FAST, PRECISIONS, InferencePlan, fast_index8_kernel, make_plan

__all__ = ["FAST", "PRECISIONS", "InferencePlan", "Packing", "SensiMixForSequenceClassification",
           "fast_index8_kernel", "make_plan"]
