"""Atomic folder writes: build a checkpoint in a temp folder beside the target, then rename it into place.

An interrupted or failed write leaves the target untouched (absent, or the previous version) and no temp
folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out_dir``, on any exception it is deleted."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another output folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors, mkstemp) create 0600 files
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config_json(folder: str | os.PathLike, *, expected: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``<folder>/config.json``; errors name the folder or file and what was ``expected``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {expected}")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder (expected {expected})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON through a temp file + rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


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
