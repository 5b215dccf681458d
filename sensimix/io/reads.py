"""Bounded reads of small JSON files: one clear error naming the file and what it should have been."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .folders import OutputError, previous_version, recover_interrupted, reserve_output

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20  # config.json and friends are a few KB; refuse to parse anything huge


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (weight and data files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def brief(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, cut to ``limit`` characters (torch's messages run to paragraphs)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first if len(first) <= limit else first[:limit] + "..."


def read_json(path: str | os.PathLike, *, what: str = "a JSON file", error: type[Exception] = ValueError) -> Any:
    """The JSON in ``path``; any problem is one ``error`` (or FileNotFoundError) naming the file and ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}: not {what}")
    with open(path, "rb") as f:  # one open: the size bound holds for the bytes read, whatever the name points at now
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{path} is over {MAX_JSON_BYTES:,} bytes; {what} has a small {path.name} (limit "
                    f"{MAX_JSON_BYTES:,})")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{path} is nested too deeply to be {what}") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{path} is not {what}: {brief(exc)}") from exc


def read_config_json(folder: str | os.PathLike, *, expected: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``<folder>/config.json``; errors name the folder or file and what was ``expected``."""
    folder = Path(folder)
    find_interrupted(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {expected}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder (expected {expected})")
    raw = read_json(folder / "config.json", what=expected, error=error)
    if not isinstance(raw, dict):
        raise error(f"{folder / 'config.json'} must hold a JSON object, got {type(raw).__name__}")
    return raw


def find_interrupted(folder: str | os.PathLike) -> None:
    """Put back a ``folder`` that is missing because an overwrite of it (on a file system without the one-step
    swap: NFS, many FUSE) was interrupted between its two renames -- under the writers' lock, as the next write to
    it would -- so every reader finds the previous version. Where that cannot be done now (another writer holds the
    lock, a read-only parent), ``FileNotFoundError`` says where the previous version is."""
    hidden = previous_version(folder)
    if hidden is None:
        return
    try:
        with reserve_output(folder):
            restored = recover_interrupted(folder)
    except (OutputError, OSError) as exc:
        raise FileNotFoundError(f"{folder} is missing: an overwrite of it was interrupted between its two renames, and "
                                f"its previous version is whole in {hidden} ({brief(exc)}); the next write to "
                                f"{folder} puts it back, or move it back yourself: mv {hidden} {folder}") from None
    if restored:
        log.warning("%s was missing (an overwrite of it was interrupted between its two renames): its previous "
                    "version was put back from %s", folder, hidden)
