"""What reaches the disk, and with which permissions, before a rename publishes it: the flush of a file or a
folder's entries, and the pass over a temp folder before :func:`.folders.atomic_dir` commits it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to disk; best effort for a folder, which some
    file systems cannot open or sync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


_KEEP_MODE: set[Path] = set()


def keep_mode(path: str | os.PathLike) -> None:
    """Leave ``path`` (a file or folder put in a :func:`.folders.atomic_dir` temp folder as a copy, e.g. carried
    from the version it replaces) with its own permissions: only what the job wrote is opened up to the umask."""
    _KEEP_MODE.add(Path(path))


def forget_kept(tmp: Path) -> None:
    """Drop the :func:`keep_mode` entries of a temp folder that is committed or removed."""
    _KEEP_MODE.difference_update({p for p in list(_KEEP_MODE) if p == tmp or tmp in p.parents})


def settle(tmp: Path, file_mode: int) -> None:
    """Before the commit of the temp folder ``tmp``: each file the job wrote gets ``file_mode`` (the umask's:
    safetensors and mkstemp create 0600 files), and every file and folder reaches the disk, so a power loss leaves
    the old version or the new. Links are neither followed nor changed (a carried link to a private file stays a
    link, the file untouched)."""
    kept = list(_KEEP_MODE)  # a snapshot: other threads' writes add to it meanwhile
    for root, folders, files in os.walk(tmp):  # a linked folder is listed, never entered
        for name in (*files, *folders):
            path = Path(root) / name
            kind = os.lstat(path).st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
                continue  # a link (never followed), a FIFO or socket (never opened)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISREG(mode) and not any(p == path or p in path.parents for p in kept):
                    os.fchmod(fd, file_mode)
                if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                    os.fsync(fd)
            finally:
                os.close(fd)
    fsync_path(tmp)
