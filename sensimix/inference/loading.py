"""Loader arguments of the packed model's ``from_pretrained``: what transformers' Auto classes, ``pipeline`` and
users pass, each applied, passed on (hub options), dropped as a no-op, or refused by name -- never silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import SensiMixConfig
from ..devices import dtype_name
from ..sources import looks_local
from .plan import FAST

_IGNORED_LOADER_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "low_cpu_mem_usage",
                          "attn_implementation", "use_safetensors", "_commit_hash", "code_revision", "adapter_kwargs",
                          "proxies")
# transformers' hub options, passed on to the download of a hub id
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
# config fields a caller may set at load time: they change what forward returns or how labels are named, never the
# computation (the label count must stay the classifier's)
SETTABLE_FIELDS = ("return_dict", "id2label", "label2id")
_IGNORED_FIELDS = ("_name_or_path", "dtype", "torch_dtype", "transformers_version")


# transformers' loader options that are no-ops at these values (what a packed folder always does)
_NOOP_LOADER_KWARGS = {"weights_only": True, "ignore_mismatched_sizes": False, "output_loading_info": False,
                       "variant": None, "quantization_config": None, "state_dict": None, "offload_folder": None}


def drop_loader_kwargs(kwargs: dict[str, Any]) -> None:
    """transformers' loader options that do not apply to a packed folder (the Auto classes and ``pipeline`` pass
    some of them), and those given at the value a packed folder loads with anyway."""
    for key in _IGNORED_LOADER_KWARGS:
        kwargs.pop(key, None)
    for key, value in _NOOP_LOADER_KWARGS.items():
        if key in kwargs and kwargs[key] is value:  # True / False / None: singletons
            kwargs.pop(key)


def apply_config_override(config: SensiMixConfig, theirs: dict[str, Any], folder: Path) -> None:
    """Apply a config asked for at load time (the Auto classes' ``config=``, made of their kwargs, e.g.
    ``num_labels=3``; or ``id2label=`` given directly) to the folder's config: settable fields are taken, any other
    difference is refused (never silently dropped)."""
    ours = config.to_dict()
    if "num_labels" in theirs and theirs["num_labels"] != config.num_labels:
        raise ValueError(f"{folder}: num_labels={theirs['num_labels']} was asked for, but the classifier has "
                         f"{config.num_labels} outputs; a packed checkpoint's label count is fixed")
    # the format fields and the checksum are the file's, not model fields
    ignored = {*_IGNORED_FIELDS, *checkpoint.FORMAT_FIELDS, checkpoint.CHECKSUM_KEY, "architectures", "num_labels"}
    changed = sorted(k for k in set(ours) | set(theirs) if k not in ignored and ours.get(k) != theirs.get(k))
    fixed = [k for k in changed if k not in SETTABLE_FIELDS]
    if fixed:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (config.json: {ours.get(k)!r})" for k in fixed[:4])
        raise ValueError(f"{folder}: a packed checkpoint's config cannot be changed at load time, but the config "
                         f"asked for differs from its config.json in {shown}{' ...' if len(fixed) > 4 else ''}; load "
                         f"it without these arguments (only {', '.join(SETTABLE_FIELDS)} may be set)")
    labels = len(theirs.get("id2label") or {})
    if labels != config.num_labels:
        raise ValueError(f"{folder}: {labels} labels were asked for (num_labels / id2label), but the classifier has "
                         f"{config.num_labels} outputs; a packed checkpoint's label count is fixed")
    for key in changed:
        setattr(config, key, theirs[key])


def pop_device(kwargs: dict[str, Any], device: Any) -> Any:
    device_map = kwargs.pop("device_map", None)
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError("device_map as a dict of modules is not supported: a packed SensiMix model runs on one "
                             "device (device_map={'': device} or device=...)")
        device_map = device_map[""]
    mapped = f"cuda:{device_map}" if isinstance(device_map, int) else device_map
    if device is not None and mapped != "auto" and not _same_device(device, mapped):
        raise ValueError(f"device={device!r} and device_map={device_map!r} name different devices; give one of them")
    return device if device is not None else mapped


def _same_device(a: Any, b: Any) -> bool:
    """Whether two device names can mean the same device (``cpu`` = ``cpu:0``; ``cuda`` = any ``cuda:N``)."""
    try:
        x, y = torch.device(a), torch.device(b)
    except (RuntimeError, TypeError, ValueError):
        return str(a) == str(b)
    return x.type == y.type and (x.type == "cpu" or x.index is None or y.index is None or x.index == y.index)


def pop_precision(kwargs: dict[str, Any], precision: Any) -> Any:
    """``precision``, or transformers' ``dtype`` / ``torch_dtype``; two that disagree are an error."""
    given = {k: v for k, v in (("precision", precision), ("dtype", kwargs.pop("dtype", None)),
                               ("torch_dtype", kwargs.pop("torch_dtype", None))) if v is not None and v != "auto"}
    names = {k: _precision_name(v) for k, v in given.items()}
    if set(names.values()) == {"fast", "fp32"}:  # fast computes in fp32: a dtype of float32 agrees with it
        return "fast"
    if len(set(names.values())) > 1:
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} ask for different precisions; give one "
                         f"(precision='fp32'|'fp16'|'bf16'|'fast')")
    return next(iter(given.values()), None)


def _precision_name(value: Any) -> str:
    """fp32 / fp16 / bf16 / fast for a precision name or a dtype (unknown values pass as they are, for make_plan
    to refuse)."""
    if value == FAST:
        return FAST
    try:
        return dtype_name(value)
    except ValueError:
        return str(value)


def local_folder(name: str | os.PathLike, subfolder: str = "", hub: dict[str, Any] | None = None) -> Path:
    """A local folder (``subfolder`` inside it), or a hub snapshot of the packed files (online users; ``hub``:
    transformers' revision, token, cache_dir, ... options)."""
    path = Path(name).expanduser()
    if looks_local(os.fspath(name)) or "/" not in os.fspath(name):  # a packed model on the hub is "org/name"
        return path / subfolder
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(str(name), allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors",
                                                            f"{prefix}*.txt"], **(hub or {}))
        return Path(root) / subfolder
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, ...: say what was looked for
        raise FileNotFoundError(f"{name} is not a local folder, and the hub did not give it "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
