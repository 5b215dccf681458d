"""Single-file writes (JSON results, reports): the target checked before the work, written through a temp file
renamed over it, so readers never see half a file."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .durable import fsync_path
from .folders import OutputError, _umask, check_apart, check_private_parent
from .reads import read_json


def _finite(data: Any) -> Any:
    """``data`` with NaN/inf floats replaced by None: strict JSON that every reader accepts."""
    if isinstance(data, float):
        return data if data == data and abs(data) != float("inf") else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _check_target_kind(target: Path, what: str) -> None:
    """An existing ``target`` is a regular file: a rename over it would replace a symlink, a folder or a device
    such as /dev/null by a plain file."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise OutputError(f"{what} {target} is a symbolic link; give the path of the file itself "
                          f"({os.path.realpath(target)})")
    if stat.S_ISDIR(mode):
        raise OutputError(f"{what} {target} is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{what} {target} exists and is not a regular file (a device, pipe or socket); give the "
                          f"path of a new or regular file")


def check_file_target(path: str | os.PathLike, what: str = "the output file") -> Path:
    """Where a file will be written (a temp file renamed over it), checked before the work: a new or regular file,
    not made read-only (the rename would replace it regardless, even for its owner), in an existing folder that
    takes a new file."""
    if not str(path).strip():
        raise OutputError(f"{what} is empty; give a file name")
    target = Path(path)
    _check_target_kind(target, what)
    check_private_parent(target)
    if target.is_file() and not target.stat().st_mode & 0o222:
        raise OutputError(f"{what} {target} is read-only, so it is kept as it is; make it writable (chmod u+w) to "
                          f"have it replaced, or choose another {what}")
    if not target.parent.is_dir():
        raise OutputError(f"{what} {target}: the folder {target.parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{what} {target}: cannot create a file in {target.parent} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return target


def check_json_target(path: str | os.PathLike, what: str = "--json",
                      reads: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """:func:`check_file_target` for a results file (``--json``), plus: not inside a folder the command ``reads``
    ({flag: path}: e.g. ``--model``, whose config.json or weights it would replace), and an existing file is
    replaced only if it holds a JSON document (an earlier result), never e.g. a checkpoint or a script."""
    target = check_file_target(path, what)
    check_apart(target, reads or {}, what, replaces=False)
    if target.exists():
        try:
            read_json(target, what=f"the existing {what} file")
        except (OSError, ValueError):
            raise OutputError(f"{what} {target} exists and is not a JSON file, so it is not an earlier result; "
                              f"choose another {what} (or remove it yourself)") from None
    return target


def _write_atomically(path: str | os.PathLike, write: Any, *, encoding: str | None = None,
                      binary: bool = False) -> None:
    """``write(f)`` into a temp file beside ``path``, flushed to disk and renamed over it: readers never see half a
    file, and a power loss leaves the old file or the new one, never an empty one (ext4/xfs may otherwise commit
    the rename before the data)."""
    path = Path(path)
    _check_target_kind(path, "the output file")
    check_private_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # by descriptor: the name could be swapped, the open file cannot
        with os.fdopen(fd, "wb" if binary else "w", encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON (NaN/inf as null) through a temp file + rename, so readers never see half a file."""
    data = _finite(data)

    def dump(f: Any) -> None:
        json.dump(data, f, indent=2, sort_keys=True, default=str, allow_nan=False)
        f.write("\n")

    _write_atomically(path, dump)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text through a temp file + rename."""
    _write_atomically(path, lambda f: f.write(text), encoding="utf-8")


def write_figure(path: str | os.PathLike, fig: Any, dpi: int = 100) -> None:
    """Save a matplotlib figure (its format from the file's suffix, PNG without one) through a temp file + rename."""
    kind = Path(path).suffix.lstrip(".").lower() or "png"
    _write_atomically(path, lambda f: fig.savefig(f, format=kind, dpi=dpi), binary=True)
