"""Criterion 1 -- sizes on disk -- and the two model folders the V&V compares.

The size criterion judges the file it names (``pytorch_model.bin``), and only after proving that each folder's
two weight files hold the same tensors: a truncated or altered ``.bin`` beside an intact ``model.safetensors``
is an error, not a 0.006% ratio.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import WEIGHTS_BIN, WEIGHTS_SAFETENSORS, CheckpointError, load_weight_file
from ..io import read_json
from ..sources import LEGACY_BERT_BUFFERS, TOKENIZER_FILES

log = logging.getLogger(__name__)

CERTIFIED_FOLDER_FILES = ("config.json", WEIGHTS_BIN, *TOKENIZER_FILES)


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under ``path`` (what a file browser sums for the folder)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass(frozen=True)
class SizeReport:
    """Byte sizes as on disk of the BERT and SensiMix folders (criterion 1 reads ``pytorch_model.bin``)."""

    bert_bin: int
    sensimix_bin: int
    bert_safetensors: int | None
    sensimix_safetensors: int | None
    bert_folder: int
    sensimix_folder: int
    bert_path: str = ""
    sensimix_path: str = ""
    sensimix_model: str = ""  # e.g. "SensiMix (2+1)"
    bert_model: str = ""      # e.g. "BERT 12 layers, hidden 768, FFN 3072, vocab 30,522"
    # each folder has both weight files and they were proven to hold the same tensors (measure_sizes refuses a pair
    # that differs; False when a folder has only its .bin, so nothing was compared)
    weight_files_agree: bool = False

    @property
    def ratio(self) -> float:
        return self.sensimix_bin / self.bert_bin

    @property
    def safetensors_ratio(self) -> float | None:
        if not self.bert_safetensors or self.sensimix_safetensors is None:
            return None
        return self.sensimix_safetensors / self.bert_safetensors

    @property
    def folder_ratio(self) -> float:
        return self.sensimix_folder / self.bert_folder

    def deviations(self) -> list[str]:
        """How the compared models differ from the certified pair (a bert-base baseline and SensiMix (2+1))."""
        out = []
        if self.bert_model and self.bert_model != CERTIFIED_BERT:
            out.append(f"the baseline is {self.bert_model} (certified: bert-base, {CERTIFIED_BERT})")
        if self.sensimix_model and self.sensimix_model != "SensiMix (2+1)":
            out.append(f"{self.sensimix_model} (certified: SensiMix (2+1))")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(ratio=self.ratio, safetensors_ratio=self.safetensors_ratio, folder_ratio=self.folder_ratio,
                 deviations_from_certified=self.deviations())
        return d


def _file_size(folder: Path, name: str, required: bool) -> int | None:
    path = folder / name
    if path.is_file():
        return path.stat().st_size
    if required:
        raise FileNotFoundError(f"{path} not found: criterion 1 compares the {name} files of both folders")
    return None


# the fields that fix a model's shape: a SensiMix made from a BERT has that BERT's values of them
PAIR_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
               "type_vocab_size", "hidden_act")  # not num_labels: the head is a few KB, and verify builds a 2-label one
# a weight file's bytes beyond its tensors' own (zip headers, names, pickle): far below this for any BERT
_CONTAINER_SLACK = 1 << 20
CERTIFIED_BERT = "BERT 12 layers, hidden 768, FFN 3072, vocab 30,522"  # bert-base-uncased


def describe_bert(config: Any) -> str:
    return (f"BERT {config.num_hidden_layers} layers, hidden {config.hidden_size}, FFN {config.intermediate_size}, "
            f"vocab {config.vocab_size:,}")


def check_pair(bert_config: Any, sensimix_config: Any, bert: str, sensimix: str) -> None:
    """The SensiMix must be a compression of this BERT: same shape fields, no more layers. Ratios of unrelated
    models certify nothing (a SensiMix of bert-tiny is 1% of bert-base's size)."""
    differ = [f"{k} {getattr(sensimix_config, k)!r} vs {getattr(bert_config, k)!r}" for k in PAIR_FIELDS
              if getattr(sensimix_config, k) != getattr(bert_config, k)]
    if sensimix_config.num_hidden_layers > bert_config.num_hidden_layers:
        differ.append(f"num_hidden_layers {sensimix_config.num_hidden_layers} > {bert_config.num_hidden_layers}")
    if differ:
        raise ValueError(f"--sensimix {sensimix} was not made from --bert {bert}: {'; '.join(differ[:4])} "
                         f"(SensiMix vs BERT config.json); the ratios of unrelated models certify nothing. Compress "
                         f"this BERT (sensimix compress --bert {bert}) or pass the BERT the SensiMix was made from")


def check_bert_tensors(folder: Path, tensors: dict[str, torch.Tensor], config: Any) -> None:
    """The baseline file holds exactly the fp32 BertForSequenceClassification of its config.json: criterion 1 sizes
    this file and criterion 2 times the model built from config.json, so both must be the same fp32 model."""
    from transformers import BertForSequenceClassification

    with torch.device("meta"):
        spec = {k: tuple(v.shape) for k, v in BertForSequenceClassification(config).state_dict().items()}
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec) - set(LEGACY_BERT_BUFFERS))
    shapes = sorted(k for k in set(spec) & set(tensors) if tuple(tensors[k].shape) != spec[k])
    path = folder / WEIGHTS_BIN
    if missing or extra or shapes:
        parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("not in the model", extra), ("other shape", shapes))
                 if names]
        raise CheckpointError(f"{path} is not the BertForSequenceClassification of its config.json "
                              f"({config.num_hidden_layers} layers, hidden {config.hidden_size}): "
                              f"{'; '.join(parts)}. Criterion 1 would size another model than criterion 2 times; "
                              f"save the classifier with save_pretrained (or sensimix finetune)")
    legacy = {k: tuple(v.shape) for k, v in tensors.items() if k in LEGACY_BERT_BUFFERS}
    for name, shape in legacy.items():
        if shape not in ((1, config.max_position_embeddings), (config.max_position_embeddings,)):
            raise CheckpointError(f"{path}: {name} has shape {list(shape)}, but the position buffer of this config "
                                  f"is [1, {config.max_position_embeddings}]; the file holds more than the model")
    held = sum(v.numel() * v.element_size() for v in tensors.values())
    size = path.stat().st_size
    if size > held + held // 100 + _CONTAINER_SLACK:
        raise CheckpointError(f"{path} is {size / 1e6:,.1f} MB, but its tensors hold {held / 1e6:,.1f} MB: the file "
                              f"carries other bytes (tensors saved as views of larger storages, extra archive "
                              f"entries), which criterion 1 would count as the model's. Re-save it (save_pretrained, "
                              f"or torch.save of a state dict of .contiguous().clone() tensors)")
    other = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != torch.float32)
    if other:
        raise CheckpointError(f"{path}: the baseline must be fp32 (the certified BERT is 438 MB of fp32), but "
                              f"{', '.join(other[:3])}{' ...' if len(other) > 3 else ''} are "
                              f"{tensors[other[0]].dtype}; save the fp32 model")


def prove_bert_weight_files(folder: Path) -> None:
    """A plain BERT folder's pytorch_model.bin must load safely, hold exactly the fp32 model of its config.json
    and the tensors of its model.safetensors."""
    from ..sources import bert_config

    binary = load_weight_file(folder / WEIGHTS_BIN)
    check_bert_tensors(folder, binary, bert_config(folder, allow_qat=False))
    if not (folder / WEIGHTS_SAFETENSORS).is_file():
        return
    safe = load_weight_file(folder / WEIGHTS_SAFETENSORS)
    only = sorted(set(safe) ^ set(binary))
    differ = sorted(n for n in set(safe) & set(binary)
                    if safe[n].shape != binary[n].shape or not torch.equal(safe[n], binary[n]))
    if only or differ:
        raise CheckpointError(f"{folder}: {WEIGHTS_BIN} and {WEIGHTS_SAFETENSORS} hold different tensors "
                              f"({', '.join((only + differ)[:4])}...): criterion 1 would size one model and time "
                              f"another. Re-save the folder")


def prove_sensimix_weight_files(folder: Path) -> None:
    """A packed folder's two weight files both pass the checks and hold the same tensors (by the checksum)."""
    from ..checkpoint import config_from_raw, read_raw_config, read_tensors
    from ..inference import SensiMixForSequenceClassification

    raw = read_raw_config(folder)
    config = config_from_raw(raw, folder / "config.json")
    spec = SensiMixForSequenceClassification.checkpoint_spec(config)
    read_tensors(folder, spec, raw, config.describe(), weights=WEIGHTS_BIN, verify_all=True)


def measure_sizes(bert_dir: str | os.PathLike, sensimix_dir: str | os.PathLike) -> SizeReport:
    """Sizes of both folders' weight files, read from disk (``stat``), as the certified file browser showed,
    after proving each folder's weight files agree."""
    bert, sm = Path(bert_dir), Path(sensimix_dir)
    sizes = dict(bert_bin=_file_size(bert, WEIGHTS_BIN, True), sensimix_bin=_file_size(sm, WEIGHTS_BIN, True),
                 bert_safetensors=_file_size(bert, WEIGHTS_SAFETENSORS, False),
                 sensimix_safetensors=_file_size(sm, WEIGHTS_SAFETENSORS, False))
    from ..checkpoint import read_config
    from ..sources import bert_config

    check_pair(bert_config(bert, allow_qat=False), read_config(sm), str(bert), str(sm))
    prove_bert_weight_files(bert)
    prove_sensimix_weight_files(sm)
    cfg = read_json(sm / "config.json", what="a SensiMix checkpoint folder")
    model = f"SensiMix ({cfg['num_8bit_layers']}+{cfg['num_hidden_layers'] - cfg['num_8bit_layers']})"
    compared = sizes["bert_safetensors"] is not None and sizes["sensimix_safetensors"] is not None
    return SizeReport(**sizes, bert_folder=folder_bytes(bert), sensimix_folder=folder_bytes(sm),
                      bert_path=str(bert), sensimix_path=str(sm), sensimix_model=model, weight_files_agree=compared,
                      bert_model=describe_bert(bert_config(bert, allow_qat=False)))


# ---------------------------------------------------------------------------------------------------
# the folders
# ---------------------------------------------------------------------------------------------------
def build_bert_folder(out: str | os.PathLike, source: str | os.PathLike = "random:bert-base", *, seed: int = 0,
                      num_labels: int = 2, overwrite: bool = False) -> Path:
    """The BERT side of the certified test: a ``BertForSequenceClassification`` saved like the certified folder
    (``random:<geometry>``: random weights; bert-base = the certified 438 MB model)."""
    from transformers import BertForSequenceClassification

    from ..sources import bert_config, is_random, load_bert_classifier, load_tokenizer
    from ..train.jobs import save_bert_folder

    torch.manual_seed(seed)
    if is_random(source):
        config = bert_config(source)
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    else:
        model = load_bert_classifier(source, num_labels)
    log.info("writing the BERT baseline folder %s (%s, %.1fM parameters)", out, source,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return save_bert_folder(model.eval(), load_tokenizer(source), out, overwrite=overwrite)


def build_sensimix_folder(bert_dir: str | os.PathLike, out: str | os.PathLike, *, layers: int = 3,
                          eightbit_layers: int = 2, seed: int = 0, overwrite: bool = False,
                          activations: str = "fp32") -> Path:
    """The SensiMix side: ``sensimix compress --max-steps 0`` of ``bert_dir`` (quantize + export, no training);
    ``activations``: ``fp32`` or ``a8`` (an A8 model)."""
    from ..train import TrainSettings, compress

    settings = TrainSettings(max_steps=0, seed=seed, device="cpu")
    return compress(bert_dir, "qnli", out, layers=layers, eightbit_layers=eightbit_layers, settings=settings,
                    overwrite=overwrite, activations=activations).path
