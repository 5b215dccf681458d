"""Training: GLUE data, the SensiMix recipe on transformers' Trainer (ABWR, PT/ILF, distillation), DDP helpers,
and the fine-tune / compress jobs."""

from .jobs import TrainResult, compress, finetune, save_bert_folder
from .recipe import TrainSettings

__all__ = ["TrainResult", "TrainSettings", "compress", "finetune", "save_bert_folder"]
