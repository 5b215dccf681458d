"""Open files that no other user could have written, through file descriptors (for :mod:`.native`).

Loading a shared library runs its code, and compiling a source builds code, so every file the native kernels read
must be one that only this user (or root) could have written:

* every folder from ``/`` down: owned by this user or root, and not writable by group or others, except a folder
  above with the sticky bit (``/tmp``): there nobody can rename or delete an entry they do not own;
* the folder holding the file, and the file: owned by this user or root, writable by nobody else; a regular file.

Symbolic links in the path given are resolved once (``realpath``); the real path is then walked one component at a
time with ``O_NOFOLLOW`` relative to the folder checked before it (``openat``), and each open descriptor is what is
checked (``fstat``), so a component swapped after its check is never reached through its name again (no TOCTOU
between the check and the use). The caller reads, hashes and loads the file through the returned descriptor.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_DIR_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedPath(RuntimeError):
    """A path another user could have written (the message names it and the fix)."""


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def _who(st: os.stat_result) -> str:
    return f"uid {st.st_uid}" if st.st_uid != os.getuid() else "you"


def _check_folder(path: Path, st: os.stat_result, *, last: bool, fix: str) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedPath(f"{path} is not a folder")
    mode = stat.S_IMODE(st.st_mode)
    if not _owner_ok(st):
        raise UntrustedPath(f"the folder {path} belongs to another user ({_who(st)}, mode {mode:o}); {fix}")
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and (last or not mode & stat.S_ISVTX):
        raise UntrustedPath(f"the folder {path} is writable by other users (mode {mode:o}): a library in it could be "
                            f"theirs; run `chmod go-w {path}` or {fix}")


def open_folder(path: str | Path, *, create: bool = False, fix: str) -> tuple[int, Path]:
    """A descriptor of the folder ``path`` and its real path, every component checked (the module docstring).

    ``create``: make missing folders (mode 0700). ``fix`` ends each refusal: what the user can do instead.
    Raises :class:`UntrustedPath`, or FileNotFoundError where a folder is missing and ``create`` is False.
    """
    real = Path(os.path.realpath(path))
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_folder(Path("/"), os.fstat(fd), last=real == Path("/"), fix=fix)
        here = Path("/")
        for i, part in enumerate(real.parts[1:], start=2):
            here = here / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:  # made meanwhile (another process): checked below like any other
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # ELOOP: a link put there after realpath; ENOTDIR: a file
                raise UntrustedPath(f"{here} is not a folder ({exc.strerror}); {fix}") from exc
            os.close(fd)
            fd = child
            _check_folder(here, os.fstat(fd), last=i == len(real.parts), fix=fix)
        return fd, real
    except BaseException:
        os.close(fd)
        raise


def open_file(folder_fd: int, folder: Path, name: str, *, fix: str) -> int:
    """A read-only descriptor of the regular file ``name`` in a folder opened by :func:`open_folder`, checked:
    owned by this user or root, writable by nobody else, not a link. FileNotFoundError where it is missing."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symbolic link
        raise UntrustedPath(f"{folder / name} is not a regular file ({exc.strerror}); {fix}") from exc
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedPath(f"{folder / name} is not a regular file; {fix}")
        if not _owner_ok(st):
            raise UntrustedPath(f"{folder / name} belongs to another user ({_who(st)}, mode {mode:o}): it could run "
                                f"their code; {fix}")
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedPath(f"{folder / name} is writable by other users (mode {mode:o}): it could run their code; "
                                f"{fix}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def sha256_of(fd: int) -> str:
    """The SHA-256 of the whole file behind ``fd`` (read with pread: the descriptor's offset is left alone)."""
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def fd_path(fd: int, real: Path) -> str:
    """A path that opens exactly the file behind ``fd``: ``/proc/self/fd/<fd>`` where /proc is mounted, else its
    checked real path (every folder on it is writable only by this user or root, so nobody else can redirect it)."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(real)
