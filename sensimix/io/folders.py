"""Output folders: checked before work starts, locked for a whole job, written atomically, never lost.

Dependency-free on purpose (only the standard library): unit/test_io.py loads this file alone in child processes
that race each other for a lock or are killed mid-commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .durable import forget_kept, fsync_path, settle


class OutputError(ValueError):
    """An output location that cannot be written as asked; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalized ("a/../b" -> "b"): one spelling per folder, for locks and renames."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _missing_parents(out: Path) -> list[Path]:
    """The folders above ``out`` that do not exist yet, deepest first."""
    missing, parent = [], out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False, what: str = "--out",
                     any_folder: bool = False) -> Path:
    """Validate an output folder before any work: returns its absolute path or raises :class:`OutputError` /
    ``FileExistsError`` with the fix. Probes the parent (or its nearest existing ancestor) for writability by
    creating and removing a temp folder; nothing else is created. ``any_folder``: see :func:`atomic_dir`."""
    out = _absolute(out)
    cwd = Path.cwd().resolve()
    real = out.resolve()  # "..", "./", a symlink to the current folder: the same folder
    if real == Path(real.anchor) or real == cwd or real in cwd.parents:
        raise OutputError(f"{what} {out} is the current folder or one above it; name a new folder for the output "
                          f"(e.g. {what} out/model)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a folder; choose another {what}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{what} {out} already exists; pass --overwrite to replace it, or choose another {what}")
    if out.exists() and not any_folder:
        check_replaceable(out, what)
    check_private_parent(out)  # found now, not when the finished job takes its lock
    parent = (_missing_parents(out) or [out])[-1].parent  # the nearest folder that exists: probe it, create nothing
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {out}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {out}: {exc.strerror or exc} in {parent}") from exc
    return out


def check_apart(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], what: str = "--out", *,
                replaces: bool = True) -> None:
    """:class:`OutputError` when ``out`` is or is inside one of the ``inputs`` folders ({flag: path}; a path that is
    neither a folder nor a file, e.g. a hub id or ``random:...``, is skipped), is one of the input files (also
    through a link), or, when the command ``replaces`` ``out`` as a whole (``--overwrite``), holds one: writing it
    would replace or delete what the command reads."""
    real = _absolute(out).resolve()
    for flag, folder in inputs.items():
        if folder is None or not str(folder).strip():
            continue
        if Path(folder).is_file():
            if real.exists() and os.path.samefile(real, folder):
                raise OutputError(f"{what} {out} is the {flag} file {folder}, which this command reads and must not "
                                  f"write; choose another {what}")
            continue
        if not Path(folder).is_dir():
            continue
        src = Path(folder).resolve()
        if real == src or real.is_relative_to(src) or (replaces and src.is_relative_to(real)):
            where = "is" if real == src else ("is inside" if real.is_relative_to(src) else "holds")
            raise OutputError(f"{what} {out} {where} the {flag} folder {folder}, which this command reads and must "
                              f"not write; choose another {what}")


def check_replaceable(out: Path, what: str = "--out") -> None:
    """``--overwrite`` replaces a model folder (one with a config.json) or an empty folder, nothing else: a typo
    such as ``--out ~ --overwrite`` must not delete a home folder."""
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise OutputError(f"refusing to replace {what} {out}: it is not empty and holds no config.json, so it is not "
                          f"a model folder; --overwrite replaces model folders only. Remove it yourself or choose "
                          f"another {what}")


# target -> (lock fd, depth, owning thread): re-entrant for the thread holding it only (compress holds it while its
# export takes it again); another thread is refused as another process is by the flock
_HELD: dict[Path, tuple[int, int, int]] = {}
_HELD_GUARD = threading.Lock()
_PENDING = -1  # the fd slot of a hold whose flock is being taken


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _busy(out: Path, by: str) -> OutputError:
    return OutputError(f"another {by} is writing {out} (it holds {_lock_path(out)}); wait for it to finish or "
                       f"choose another output folder")


@contextlib.contextmanager
def reserve_output(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (a ``.<name>.lock`` file beside it) for the block; re-entrant within the
    thread that holds it. Another thread of this process, or another process, holding it: :class:`OutputError` at
    once (never a wait)."""
    out = _absolute(out)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(out)
        if held is not None and held[2] != me:
            raise _busy(out, "thread of this process")
        acquired = held is None
        _HELD[out] = (_PENDING, 1, me) if acquired else (held[0], held[1] + 1, me)
    made: list[Path] = []  # the parent folders this hold creates: removed again if the job writes nothing
    if acquired:
        try:
            fd, made = _take_lock(out)
        except BaseException:
            with _HELD_GUARD:
                del _HELD[out]
            raise
        with _HELD_GUARD:
            _HELD[out] = (fd, 1, me)
    try:
        yield out
    finally:
        with _HELD_GUARD:
            fd, depth, _ = _HELD[out]
            if depth > 1:
                _HELD[out] = (fd, depth - 1, me)
                fd = None
            else:
                del _HELD[out]
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_lock_path(out))
            os.close(fd)  # releases the flock
            if not out.exists():  # a refused or failed job leaves no empty parent folders behind
                for folder in made:  # deepest first; rmdir fails (and keeps it) once anything else is inside
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)


def check_private_parent(out: Path) -> None:
    """Refuse to write ``out`` in a folder every user may write that lacks the sticky bit: another user could
    rename the temp file or folder being written and put a link in its place."""
    try:
        mode = os.stat(out.parent).st_mode
    except OSError:
        return  # a missing parent: the callers say so
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise OutputError(f"cannot write {out}: its folder {out.parent} is writable by every user and not sticky "
                          f"(chmod o-w or +t), so another user could replace what is written there; write into a "
                          f"folder of your own")


def _take_lock(out: Path) -> tuple[int, list[Path]]:
    """flock ``out``'s lock file (creating the parents it needs); returns its fd and the parents made."""
    made = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(out)
    while True:
        try:
            check_private_parent(out)
            # never through a link (planted: it would create or truncate the file it points at)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~_umask())
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or not _ours(info):
                os.close(fd)
                raise OutputError(f"cannot write {out}: its lock file {lock} is not a file of this user (another "
                                  f"user's?); remove it or choose another place")
        except OSError as exc:
            for folder in made:  # the parents this hold created, deepest first: nothing is left behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if isinstance(exc, OutputError):
                raise
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise OutputError(f"cannot write {out}: its lock file {lock} cannot be created ({why}); "
                              f"make {out.parent} writable or choose another place") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(out, "process") from None
        try:  # the file we locked must still be the one at the path (a finishing holder unlinks it)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd, made
        except FileNotFoundError:
            pass
        os.close(fd)


# renameat2(2) flags (Linux >= 3.15); file systems without them answer EINVAL
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when renameat2 did it; False when this system or file system lacks it (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _old_versions(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.old.*"))


def _ours(info: os.stat_result) -> bool:
    """Owned by this user or root: not something another user put there."""
    return info.st_uid in (os.geteuid(), 0)


def _own(path: Path) -> bool:
    try:
        return _ours(os.lstat(path))
    except OSError:
        return False


def previous_version(out: str | os.PathLike) -> Path | None:
    """Where the previous version of a missing ``out`` lies whole (``.<name>.old.*/<name>``, the newest) when an
    overwrite without ``RENAME_EXCHANGE`` was interrupted between its two renames; None when ``out`` exists or
    nothing was left."""
    out = _absolute(out)
    if out.exists():
        return None
    kept = [p for p in _old_versions(out) if (p / out.name).exists() and _own(p / out.name)]  # never another's
    return max(kept, key=lambda p: p.stat().st_mtime) / out.name if kept else None


def recover_interrupted(out: str | os.PathLike) -> Path | None:
    """Restore ``out`` from the hidden copy an interrupted overwrite left (fallback path only) and remove the
    stale hidden folders and the temp folders of writers that are gone; returns ``out`` when it was restored. Call
    it holding :func:`reserve_output`."""
    out = _absolute(out)
    olds = _old_versions(out)
    restored = None
    previous = previous_version(out)
    if previous is not None:  # the process died between the two renames: the previous version is whole in there
        os.replace(previous, out)
        restored = out
    for old in olds:  # the target exists now, so these are empty or a superseded version
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale_temps(out)
    return restored


# Temp folders are owned: beside each ``.<name>.tmp.XXXX`` folder an ``.<name>.tmp.XXXX.owner`` file is flocked by
# its writer until the folder is committed or removed. The kernel drops the flock when the writer dies (whatever
# its pid is later reused for), so a lock that can be taken means the owner is gone; this process's own live temp
# folders are also listed here (POSIX-lock emulations of flock, e.g. on NFS, let a process take its own lock again).
_OWNER = ".owner"
_LIVE_TEMPS: set[Path] = set()


def _make_temp(out: Path) -> tuple[Path, int]:
    """A new temp folder beside ``out`` and the fd of its flocked owner file (made first: a folder never exists
    unowned)."""
    while True:
        fd, owner = tempfile.mkstemp(prefix=f".{out.name}.tmp.", suffix=_OWNER, dir=out.parent)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file nobody else has opened yet
        tmp = Path(owner[:-len(_OWNER)])
        try:
            os.mkdir(tmp, 0o777 & ~_umask())  # what mkdtemp's 0700 would hide: the result looks like any new folder
        except FileExistsError:  # an unowned folder of that name (an older version's): draw another name
            os.unlink(owner)
            os.close(fd)
            continue
        _LIVE_TEMPS.add(tmp)
        return tmp, fd


def _drop_temp(tmp: Path, fd: int) -> None:
    """Remove a temp folder (if still there) and then its owner file; the flock goes with the fd."""
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{tmp}{_OWNER}")
    _LIVE_TEMPS.discard(tmp)
    os.close(fd)


def _remove_stale_temps(out: Path) -> None:
    """Temp folders of ``out`` whose writer is provably gone (killed: SIGKILL, power loss): its owner file can be
    flocked, or it has none (written by an older version, whose writer would hold the target lock we hold)."""
    temps = {Path(str(p).removesuffix(_OWNER)) for p in out.parent.glob(f".{glob.escape(out.name)}.tmp.*")}
    for tmp in sorted(temps - _LIVE_TEMPS):
        owner = f"{tmp}{_OWNER}"
        try:
            fd = os.open(owner, os.O_RDWR)
        except FileNotFoundError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        except OSError:
            continue  # cannot tell: keep it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive (e.g. a writer that does not share our target lock)
            os.close(fd)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(owner)
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the block and deliver them right after it, so a Ctrl-C or a kill never
    splits the renames of a commit (main thread only: Python runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old = {s: h for s, h in old.items() if h is not None}  # None: a handler set outside Python, left alone
    for s in old:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    with _signals_deferred():
        _rename_into_place(tmp, out, overwrite)


def _rename_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    appeared = f"{out} appeared while it was being written (another program?); nothing was replaced"
    if not out.exists():
        try:
            if _renameat2(tmp, out, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            raise FileExistsError(appeared) from None
        if out.exists():  # no NOREPLACE here: check as late as possible
            raise FileExistsError(appeared)
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{appeared}: pass --overwrite to replace it")
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    try:
        os.replace(out, trash / out.name)
    except BaseException:
        os.rmdir(trash)  # nothing was moved
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash / out.name, out)  # put the previous version back
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` for the block (main thread, default handler only), so that
    ``finally`` blocks and context managers clean up instead of the process vanishing mid-write."""
    install = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    if install:
        def _exit(signum, frame):  # noqa: ARG001
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
               any_folder: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes ``out_dir`` in one rename, on any exception it is deleted.

    Without ``overwrite`` an existing target (also one that appears while the block runs) is never replaced; with
    it, only a model folder or an empty one is, unless ``any_folder`` (the caller carries every file of the old
    folder into the new one, so nothing is lost).
    """
    out = _absolute(out_dir)
    if overwrite or not out.exists():  # the location checks; whether it may replace is decided under the lock
        check_output_dir(out, overwrite=True, what="output folder", any_folder=any_folder)
    with reserve_output(out), raise_on_sigterm():
        recover_interrupted(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another "
                                  f"output folder")
        if out.exists() and not any_folder:
            check_replaceable(out, "output folder")
        tmp, owner = _make_temp(out)
        try:
            yield tmp
            if tmp.is_symlink() or not tmp.is_dir():
                raise OutputError(f"the temp folder {tmp} was replaced while it was written (another user?); "
                                  f"nothing was committed")
            settle(tmp, 0o666 & ~_umask())
            _commit(tmp, out, overwrite)
            fsync_path(out.parent)
        finally:  # committed: only the owner file is left (and the old version, after an exchange)
            forget_kept(tmp)
            _drop_temp(tmp, owner)
