"""The package's C kernels (``sensimix/kernels/csrc``): compiled with the system C compiler on first use, cached.

A C kernel is one dependency-free source file (no Python or torch headers: it compiles in about a second) built
into a shared library under a per-user cache folder and loaded with :mod:`ctypes`, whose foreign calls release
the GIL. The library's file name carries a hash of the source, the flags and the compiler's version, so editing
the source or changing the compiler builds a new one. The library is written under a temporary name and renamed
into place (atomic), so concurrent processes never load a half-written file; the cache folder must belong to
this user and be writable by nobody else, because loading a library runs its code.

Where to cache: ``$SENSIMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sensimix``, else ``~/.cache/sensimix``. Which
compiler: ``$CC``, else ``cc``, else ``gcc``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
BUILD_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """A C kernel could not be built or loaded here (the message says why and what to do instead)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("SENSIMIX_CACHE_DIR"):
        root = Path(os.environ["SENSIMIX_CACHE_DIR"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sensimix"
    else:
        root = Path.home() / ".cache" / "sensimix"
    return root / "kernels"


def compiler() -> list[str] | None:
    """The C compiler command ($CC may carry arguments), or None when there is none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _private_folder(path: Path) -> None:
    """Create ``path`` (mode 0700), or check that an existing one is ours and not writable by others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise NativeBuildError(f"the kernel cache {path} belongs to another user; set SENSIMIX_CACHE_DIR to a "
                               f"folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(f"the kernel cache {path} is writable by other users (mode "
                               f"{stat.S_IMODE(st.st_mode):o}); run `chmod go-w {path}` or set SENSIMIX_CACHE_DIR")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"`{' '.join(cmd[:1])}` could not run: {exc}") from exc


def unavailable(what: str, cpu_flags: set[str], library: Callable[[], object], fallback: str) -> str | None:
    """None where the C kernel ``what`` runs on this CPU, else why not: a missing CPU flag, or its build failing
    (``library()`` builds and loads it), which is logged once with what runs instead (``fallback``)."""
    from ..devices import cpu_features

    if not cpu_flags <= cpu_features():
        return f"the {what} needs an x86 CPU with {' and '.join(f.upper() for f in sorted(cpu_flags))}"
    try:
        library()
    except NativeBuildError as exc:
        log.warning("the %s is unavailable, %s: %s", what, fallback, exc)
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The shared library built from ``csrc/<source>`` with ``flags`` (compiled on first use, then cached).

    Raises :class:`NativeBuildError` with the reason (no compiler, a compile error, an unusable cache folder, a
    full disk, a missing source file): never another exception, so a caller can fall back on it.
    """
    try:
        return _load(source, flags)
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() without a home; NativeBuildError passes
        if isinstance(exc, NativeBuildError):
            raise
        raise NativeBuildError(f"building {source} failed: {type(exc).__name__}: {exc}") from exc


def _load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (looked for $CC, cc, gcc): install gcc or clang")
    src = CSRC / source
    version = _run([*cc, "--version"])
    if version.returncode != 0:
        raise NativeBuildError(f"the C compiler `{' '.join(cc)}` does not run: {version.stderr.strip()[:200]}")
    headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]  # a source may include them: part of the build
    key = hashlib.sha256("\0".join([src.read_text(), *headers, *flags, *cc, version.stdout]).encode()).hexdigest()[:16]
    folder = cache_dir()
    _private_folder(folder)
    lib = folder / f"{src.stem}-{key}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            cmd = [*cc, "-O3", "-shared", "-fPIC", "-pthread", *flags, str(src), "-o", tmp]
            log.info("compiling the %s kernel: %s", src.stem, " ".join(cmd))
            done = _run(cmd)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["(no message)"]
                first = next((line for line in lines if " error:" in line), lines[-1])  # not the notes after it
                raise NativeBuildError(f"compiling {source} failed (`{' '.join(cc)}`): {first[:300]}")
            os.replace(tmp, lib)  # atomic: another process sees the old state or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(lib))
    except OSError as exc:
        raise NativeBuildError(f"loading {lib} failed: {exc}") from exc
