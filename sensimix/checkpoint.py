"""The packed-v1 checkpoint folder: reading, checking and writing it.

A folder holds ``config.json`` (a :class:`SensiMixConfig` plus the format fields below), ``pytorch_model.bin``
(``torch.save`` of plain tensors: load it with ``weights_only=True``), ``model.safetensors`` (the same tensors),
the tokenizer files and small JSON extras (``training_metrics.json``).

The tensors -- their names, dtypes and shapes for a given config -- are defined by the buffers of the packed
inference modules (:mod:`sensimix.inference.layers`): the module tree *is* the format, as in gpt-fast, and
:meth:`SensiMixForSequenceClassification.checkpoint_spec` reads it off a model built on the meta device. This
module checks tensors against such a spec and moves them between files and memory:

* 8-bit tensors: ``<name>.weight_q`` int8 indices, ``<name>.weight_range`` fp16 ``[lo, hi]``;
  ``W_hat = (q + 128) * s + lo`` in fp32, ``s = (hi - lo) / 255`` (``s = 1`` when ``hi == lo``: the constant ``lo``);
* 1-bit tensors: ``<name>.weight_bits`` uint8 ``[out, ceil(in / 8)]``, bit j of byte i = 1 iff W[:, 8i + j] > 0
  (+1), else -1 (sign(0) = -1), little-endian, padding bits 0;
* everything else (biases, LayerNorms, token-type embeddings, pooler, classifier): fp16.

Integrity: ``config.json`` carries ``sensimix_checksum`` -- SHA-256 of the tensors (names, dtypes, shapes,
bytes, in name order) and of the config fields that change the computation. A folder whose weight file or model
fields were altered after export is refused instead of computing something else; both weight files are checked
against the same digest, which proves they hold the same tensors. Folders written before checksums existed load
without one (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .calibration_record import RECORD as CALIBRATION_RECORD
from .config import MAX_LABELS, SensiMixConfig
from .data import METRICS_FILE
from .io import atomic_dir, brief, keep_mode, read_config_json, write_json
from .sources import save_tokenizer

log = logging.getLogger(__name__)

FORMAT = "packed-v1"
WEIGHTS_BIN = "pytorch_model.bin"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHT_FILES = (WEIGHTS_SAFETENSORS, WEIGHTS_BIN)
FORMAT_FIELDS = {"sensimix_format": FORMAT, "sign_of_zero": -1, "bit_order": "little"}
CHECKSUM_KEY = "sensimix_checksum"
CONFIG_ONLY_KEYS = (*FORMAT_FIELDS, CHECKSUM_KEY, "architectures", "model_type", "transformers_version", "dtype",
                    "torch_dtype", "_name_or_path")
# the fields that change what the model computes: their values are part of the checksum
MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "num_8bit_layers",
                "num_labels", "sensimix_format", "sign_of_zero", "bit_order")
# fields added after packed-v1 was released: in the checksum when present (a folder without them keeps its digest)
OPTIONAL_MODEL_FIELDS = ("activation_quant",)

Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


class CheckpointError(ValueError):
    """A SensiMix checkpoint that cannot be loaded; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
def read_raw_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a packed folder, checked to be one (format name and fixed format fields)."""
    folder = Path(folder)
    path = folder / "config.json"
    raw = read_config_json(folder, error=CheckpointError, expected=f"a SensiMix checkpoint folder "
                           f"(config.json + {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN})")
    fmt = raw.get("sensimix_format")
    if fmt is None:
        raise CheckpointError(
            f"{path} has no 'sensimix_format': {folder} is not a SensiMix packed checkpoint (a plain BERT folder? "
            f"load it with transformers, or use `sensimix evaluate`, which accepts both). "
            f"Write a packed checkpoint with sensimix.export.export_checkpoint / `sensimix compress`")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: sensimix_format {fmt!r} is not supported; this runtime reads {FORMAT!r}")
    for key, want in FORMAT_FIELDS.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{path}: {key} = {raw[key]!r}, but {FORMAT} requires {want!r}")
    return raw


def config_from_raw(raw: dict[str, Any], path: str | os.PathLike) -> SensiMixConfig:
    """A validated :class:`SensiMixConfig` from config.json's fields (errors name the file and the field)."""
    try:
        config = SensiMixConfig.from_dict({k: v for k, v in raw.items() if k not in CONFIG_ONLY_KEYS})
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {' '.join(str(exc).split()) or type(exc).__name__}") from exc
    labels = config.num_labels
    if not isinstance(labels, int) or not 2 <= labels <= MAX_LABELS:
        raise CheckpointError(f"{path}: num_labels must be an integer in [2, {MAX_LABELS}] (classification), got "
                              f"{labels!r}")
    return config


def read_config(folder: str | os.PathLike) -> SensiMixConfig:
    """The :class:`SensiMixConfig` of a packed checkpoint folder, after checking it is one."""
    return config_from_raw(read_raw_config(folder), Path(folder) / "config.json")


# ---------------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------------
def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_digest(fields: dict[str, Any]) -> str:
    """SHA-256 of the :data:`MODEL_FIELDS` values (and of the :data:`OPTIONAL_MODEL_FIELDS` a config sets),
    canonical JSON."""
    picked = {k: fields.get(k) for k in MODEL_FIELDS}
    if picked["num_labels"] is None:  # config.json spells the label count as id2label
        picked["num_labels"] = len(fields.get("id2label") or {}) or None
    picked.update({k: fields[k] for k in OPTIONAL_MODEL_FIELDS if fields.get(k) is not None})
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def checksum(config_fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {"algorithm": "sha256", "config": config_digest(config_fields), "tensors": tensors_digest(tensors)}


# ---------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------
def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_tensors(tensors: dict[str, torch.Tensor], spec: Spec, source: str | os.PathLike, geometry: str) -> None:
    """Raise :class:`CheckpointError` naming the tensor if ``tensors`` do not match ``spec`` exactly, or hold
    NaN/inf, or an 8-bit range with lo > hi."""
    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {_listing(missing)}; the file is incomplete or does not "
                              f"match {geometry}")
    unexpected = sorted(set(tensors) - set(spec))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {_listing(unexpected)}; the file does not match "
                              f"{geometry}")
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected {dtype} ({FORMAT})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {list(t.shape)}, expected {list(shape)} from {geometry}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: {name} contains NaN or inf")
        if name.endswith(".weight_range") and not t[0] <= t[1]:
            raise CheckpointError(f"{source}: {name} = [lo, hi] = {t.tolist()} needs lo <= hi")


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file, on CPU; any read problem is a :class:`CheckpointError` naming it."""
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ...: all mean "cannot read this file"
            raise CheckpointError(f"{path}: cannot read the safetensors file ({exc}); it is truncated or corrupt. "
                                  f"Re-export the checkpoint") from exc
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # checked before it is read
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError: truncated, corrupt or not weights-only
        raise CheckpointError(f"{path}: cannot load it with torch.load(weights_only=True) ({type(exc).__name__}: "
                              f"{brief(exc)}); it is truncated, corrupt or holds more than "
                              f"tensors. Re-export it") from exc
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise CheckpointError(f"{path} does not hold a state dict of named tensors")
    # weights_only still rebuilds sparse and quantized tensors; every check and kernel here expects dense ones
    odd = sorted(k for k, v in tensors.items() if v.layout != torch.strided or v.is_quantized)
    if odd:
        first = tensors[odd[0]]
        raise CheckpointError(f"{path}: tensor(s) {_listing(odd)} are not dense ({first.layout}, {first.dtype}); "
                              f"weight files hold dense tensors only. Re-export it")
    return tensors


def weight_file(folder: Path, weights: str = "auto") -> Path:
    """The weight file to load: ``auto`` = model.safetensors, else pytorch_model.bin; or the one named."""
    if weights not in ("auto", WEIGHTS_SAFETENSORS, WEIGHTS_BIN):
        raise ValueError(f"weights must be auto, {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN}, got {weights!r}")
    names = WEIGHT_FILES if weights == "auto" else (weights,)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has {'neither ' + ' nor '.join(names) if len(names) > 1 else 'no ' + names[0]}")


def verify_checksum(raw: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> bool:
    """Check ``tensors`` and the model fields of ``raw`` against config.json's checksum; False when it has none."""
    stored = raw.get(CHECKSUM_KEY)
    if stored is None:
        return False
    config_path = source.parent / "config.json"
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
        raise CheckpointError(f"{config_path}: {CHECKSUM_KEY} is not a sha256 record: {str(stored)[:200]}")
    if stored.get("config") != config_digest(raw):
        raise CheckpointError(f"{config_path}: the model fields (the geometry, {', '.join(MODEL_FIELDS[:6])}, ..., "
                              f"and {', '.join(OPTIONAL_MODEL_FIELDS)}, which an A8 model sets and an fp32-activation "
                              f"model leaves out) differ from those the weights were exported with (checksum mismatch); "
                              f"restore the original config.json or re-export the model")
    if stored.get("tensors") != tensors_digest(tensors):
        raise CheckpointError(f"{source}: the tensors differ from those exported (checksum mismatch): the file was "
                              f"altered or corrupted after export. Re-export or restore the checkpoint")
    return True


def read_tensors(folder: str | os.PathLike, spec: Spec, raw: dict[str, Any], geometry: str, *,
                 weights: str = "auto", verify_all: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The checked tensors of a packed folder and the file they came from.

    ``verify_all`` also reads the other weight file and proves it holds the same tensors (by the checksum, or by
    comparing them when the folder predates checksums).
    """
    folder = Path(folder)
    source = weight_file(folder, weights)
    tensors = load_weight_file(source)
    check_tensors(tensors, spec, source, geometry)
    has_checksum = verify_checksum(raw, tensors, source)
    unchecked = [k for k in OPTIONAL_MODEL_FIELDS if k in raw]
    if not has_checksum and unchecked:  # these fields came after checksums: every folder that sets one has one
        raise CheckpointError(f"{folder / 'config.json'}: sets {', '.join(unchecked)} but has no {CHECKSUM_KEY}, which "
                              f"every release that writes {'it' if len(unchecked) == 1 else 'them'} also writes: the "
                              f"config was edited; restore the original config.json or re-export the model")
    if not has_checksum:
        log.warning("%s has no %s (written before checksums, or removed): tensors checked by name, dtype, shape "
                    "and range only, and the config's fields cannot be checked against the weights; re-export the "
                    "folder to add one", folder / "config.json", CHECKSUM_KEY)
    if verify_all:
        for other in (folder / n for n in WEIGHT_FILES if n != source.name):
            if not other.is_file():
                continue
            others = load_weight_file(other)
            check_tensors(others, spec, other, geometry)
            if has_checksum:
                verify_checksum(raw, others, other)
            else:
                differ = [n for n in spec if not torch.equal(tensors[n], others[n])]
                if differ:
                    raise CheckpointError(f"{other} and {source.name} hold different tensors ({_listing(differ)}); "
                                          f"one of them was altered: re-export the checkpoint")
    return tensors, source


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/inf: raise ``ValueError`` naming the tensors (training diverged)."""
    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{what}: {len(bad)} tensor(s) hold NaN or inf ({_listing(bad)}): training diverged. "
                         f"Nothing was written; lower the learning rate (--lr) or check the data")


# files of a replaced folder that are never carried into its new version: weights the new one does not hold, and
# the old model's training record
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
NOT_CARRIED = (METRICS_FILE, CALIBRATION_RECORD)  # records of the weights replaced


def _carry_other_files(old: Path, new: Path) -> None:
    """Copy what ``old`` (the folder being replaced, if any) holds beside the files just written into ``new``."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name in NOT_CARRIED:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        keep_mode(new / entry.name)  # a private note stays private: only what this write made follows the umask


def write_folder(out: str | os.PathLike, config: SensiMixConfig, tensors: dict[str, torch.Tensor], *,
                 tokenizer: Any = None, overwrite: bool = False,
                 extra_json: dict[str, object] | None = None, keep_other_files: bool = False) -> Path:
    """Write a packed-v1 folder atomically: config.json (with the checksum), both weight files, the tokenizer
    files and ``extra_json``. NaN/inf tensors are refused before anything is written.

    ``keep_other_files`` (``save_pretrained``): the files of the folder being replaced that this write does not
    produce (tokenizer, notes, ...) are carried into the new version, except other weight files and the old
    training record; an existing folder that holds no model (e.g. a tokenizer saved first) is written into without
    ``overwrite``, as transformers does, since every file of it is kept.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite(tensors, f"the checkpoint for {out}")
    fields = config.to_dict()
    for key in ("dtype", "torch_dtype", "_name_or_path"):
        fields.pop(key, None)
    for key in OPTIONAL_MODEL_FIELDS:  # unset: not written, so such a folder is what the earlier release wrote
        if fields.get(key) is None:
            fields.pop(key, None)
    fields.update(FORMAT_FIELDS, architectures=["SensiMixForSequenceClassification"])
    fields[CHECKSUM_KEY] = checksum(fields, tensors)
    target = Path(out)
    merge = keep_other_files and target.is_dir() and not (target / "config.json").exists() and not any(
        p.name.endswith(_WEIGHT_SUFFIXES) for p in target.iterdir())
    with atomic_dir(out, overwrite=overwrite or merge, any_folder=merge) as tmp:
        write_json(tmp / "config.json", fields)
        torch.save(tensors, tmp / WEIGHTS_BIN)
        save_file(tensors, str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt", "sensimix_format": FORMAT})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
        if keep_other_files:
            _carry_other_files(Path(out), tmp)
    out = Path(out)
    log.info("wrote %s (%s, %.1f MB pytorch_model.bin)", out, config.describe(),
             (out / WEIGHTS_BIN).stat().st_size / 1e6)
    return out
