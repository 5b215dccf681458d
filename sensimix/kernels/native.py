"""The package's C kernels (``sensimix/kernels/csrc``): built when the package is installed, loaded with ctypes.

Where a library comes from, in this order:

1. **Installed**: ``setup.py`` compiles each row of :data:`.native_builds.BUILDS` into ``sensimix/kernels/_native/``
   when the package is installed (``pip install .`` or ``pip install -e .``; a row that fails to build, e.g. without
   a compiler, leaves the install working and is said once at run time). No writable cache is on this path.
2. **Built at run time**, only where (1) has no library for the source as it is now: a source edited since the
   install (an editable checkout), an install made without a compiler, or a source outside the table. It is built
   into a private temporary folder (mode 0700) inside the per-user cache, from the bytes read and hashed, and
   renamed into place; the next process loads it from there. Cache: ``$SENSIMIX_CACHE_DIR/kernels``, else
   ``$XDG_CACHE_HOME/sensimix/kernels``, else ``~/.cache/sensimix/kernels``. Compiler: ``$CC``, else ``cc``, else
   ``gcc``, checked like the files below (its folder and the file its links lead to).

Every file read on the way (the C source, the folders, the library) must be one that no other user could have
written (:mod:`.native_trust`: owner this user or root, not writable by others, no links; checked through file
descriptors). A library is opened by its descriptor (``/proc/self/fd/N``), so what is loaded is the file that was
checked, and for a run-time build the file whose SHA-256 was taken right after the compiler wrote it. After loading,
its ``sensimix_abi_version()`` must match the table. ``torch.compile`` (an option) keeps its cache under the same
per-user cache (:func:`private_compile_cache`). Any failure is a :class:`NativeBuildError` with one line
naming the file and the fix; :func:`unavailable` turns it into the kernel's reason, logged once, and the next
exact kernel runs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import native_builds as builds
from .native_builds import NativeBuild
from .native_trust import UntrustedPath, fd_path, open_file, open_folder, read_all, sha256_of

log = logging.getLogger(__name__)

CSRC = builds.CSRC
INSTALLED = Path(__file__).with_name("_native")  # where setup.py's build step puts the libraries
BUILD_TIMEOUT_S = 120
# A private build folder older than this belongs to no live build (a build lasts at most BUILD_TIMEOUT_S): it is
# what a killed process left, and the next build removes it.
STALE_BUILD_S = 5 * BUILD_TIMEOUT_S
_OPEN_FDS: list[int] = []  # descriptors of loaded libraries: kept open, so that no later library reuses the number


class NativeBuildError(RuntimeError):
    """A C kernel could not be built or loaded here (the message says why and what to do instead)."""


class _BuildFailed(NativeBuildError):
    """The run-time compile failed (no compiler that runs, a compile error)."""


def cache_dir() -> Path:
    """Where run-time builds are kept (see the module docstring)."""
    if os.environ.get("SENSIMIX_CACHE_DIR"):
        root = Path(os.environ["SENSIMIX_CACHE_DIR"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sensimix"
    else:
        root = Path.home() / ".cache" / "sensimix"
    return root / "kernels"


def private_compile_cache() -> Path:
    """Point ``torch.compile``'s cache at a checked folder of this user's cache (``<cache>/inductor``) unless the
    user named one (``TORCHINDUCTOR_CACHE_DIR``), and return it. Inductor's default, ``/tmp/torchinductor_<user>``,
    is made by whichever user creates it first, and inductor loads libraries, Python files and pickled entries from
    it (and points Triton's cache into it): code another user could have written."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    fd, real = open_folder(cache_dir().parent / "inductor", create=True,
                           fix="set TORCHINDUCTOR_CACHE_DIR to a folder of your own")
    os.close(fd)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(real)
    return real


def compiler() -> list[str] | None:
    """The C compiler for a run-time build ($CC, cc, gcc), its program checked like every file loaded here (the
    folder it is found in and the file its links lead to): running a compiler another user could have written,
    e.g. a ``cc`` in the current folder through an empty ``$PATH`` entry, would run their code."""
    cc = builds.compiler()
    program = shutil.which(cc[0]) if cc else None
    if program is None:
        return cc  # none, or one that will not run: the build says so
    fix = "set CC to a compiler that only you or root can change"
    found, real = Path(os.path.abspath(program)), Path(os.path.realpath(program))
    folder_fd, _ = open_folder(found.parent, fix=fix)  # where it is found: a link there could be swapped
    os.close(folder_fd)
    folder_fd, folder = open_folder(real.parent, fix=fix)
    try:
        os.close(open_file(folder_fd, folder, real.name, fix=fix))
    finally:
        os.close(folder_fd)
    return [str(found), *cc[1:]]


def unavailable(what: str, cpu_flags: set[str], library: Callable[[], object], fallback: str) -> str | None:
    """None where the C kernel ``what`` runs on this CPU, else why not: a missing CPU flag, or its library failing
    to build, load or bind (``library()`` loads it and binds its functions), logged once with what runs instead
    (``fallback``): one line, never a traceback."""
    from ..devices import cpu_features

    if not cpu_flags <= cpu_features():
        return f"the {what} needs an x86 CPU with {' and '.join(f.upper() for f in sorted(cpu_flags))}"
    try:
        library()
    except (NativeBuildError, AttributeError) as exc:  # AttributeError: a function the library lacks
        reason = str(exc) if isinstance(exc, NativeBuildError) else f"its library lacks a function ({exc})"
        log.warning("the %s is unavailable, %s: %s", what, fallback, reason)
        return reason
    return None


@functools.lru_cache(maxsize=None)
def load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The shared library built from ``csrc/<source>`` with ``flags``: the installed one, else built at run time.

    Raises :class:`NativeBuildError` with the reason (no compiler, a compile error, a file another user could have
    written, a library of another ABI, a full disk, a missing source file): never another exception, so a caller
    can fall back on it.
    """
    build = builds.find(source, tuple(flags))
    if build is None:  # not in the table: never installed, built at run time (tests, a kernel being written)
        build = NativeBuild(Path(source).stem, source, tuple(flags), frozenset(), abi=None)
    return load_build(build)


@functools.lru_cache(maxsize=None)
def load_build(build: NativeBuild | str) -> ctypes.CDLL:
    """:func:`load` for a row of :data:`.native_builds.BUILDS` (or its name); loaded once per process."""
    try:
        return _load(builds.by_name(build) if isinstance(build, str) else build)
    except UntrustedPath as exc:
        raise NativeBuildError(str(exc)) from None
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: Path.home() without a home
        if isinstance(exc, NativeBuildError):
            raise
        raise NativeBuildError(f"building {build.source if isinstance(build, NativeBuild) else build} failed: "
                               f"{type(exc).__name__}: {exc}") from exc


def _source_path(build: NativeBuild) -> Path:
    return Path(build.source) if os.path.isabs(build.source) else CSRC / build.source


def _source_files(build: NativeBuild) -> dict[str, bytes]:
    """The source and the local headers it includes, each read through the checked folder: {file name: bytes},
    the source first."""
    path = _source_path(build)
    fix = "reinstall sensimix where only you (or root) can write"
    folder_fd, folder = open_folder(path.parent, fix=fix)
    try:
        def read(name: str) -> bytes:
            fd = open_file(folder_fd, folder, name, fix=fix)
            try:
                return read_all(fd)
            finally:
                os.close(fd)

        source = read(path.name)
        return {path.name: source, **{h: read(h) for h in builds.local_includes(source)}}
    finally:
        os.close(folder_fd)


def _load(build: NativeBuild) -> ctypes.CDLL:
    files = _source_files(build)
    source_name = next(iter(files))
    source = builds.bundle(files[source_name], {n: b for n, b in files.items() if n != source_name})
    name = builds.library_file(build, source)
    why_not_installed = "it is not in native_builds.BUILDS"
    if builds.find(build.source, build.flags) == build:
        lib, why_not_installed = _load_installed(build, name)
        if lib is not None:
            return lib
    cc = compiler()
    if cc is None:
        raise NativeBuildError(f"no library for {build.source} was built at install time ({why_not_installed}) and "
                               f"no C compiler is found to build it now (looked for $CC, cc, gcc): install gcc or "
                               f"clang and reinstall sensimix")
    log.info("the %s library is built at run time: %s", build.name, why_not_installed)
    try:
        return _load_or_build_in_cache(build, name, files, cc)
    except _BuildFailed as exc:  # say why it was built at all: an install with a compiler avoids it
        raise NativeBuildError(f"{exc} (no installed library: {why_not_installed})") from None


def _load_installed(build: NativeBuild, name: str) -> tuple[ctypes.CDLL | None, str]:
    """(the installed library, "") or (None, why there is none); refuses one that another user could have written."""
    fix = "reinstall sensimix where only you (or root) can write"
    try:
        folder_fd, folder = open_folder(INSTALLED, fix=fix)
    except FileNotFoundError:
        return None, f"{INSTALLED} does not exist: the package was installed without building its C kernels"
    try:
        fd = open_file(folder_fd, folder, name, fix=f"delete it and {fix}")
    except FileNotFoundError:
        return None, (f"{INSTALLED} holds no {name}: {build.source} changed since the install, or did not compile "
                      f"then")
    finally:
        os.close(folder_fd)
    return _dlopen(fd, folder / name, build, fix=f"delete it and {fix}"), ""


def _load_or_build_in_cache(build: NativeBuild, name: str, files: dict[str, bytes], cc: list[str]) -> ctypes.CDLL:
    fix = "set SENSIMIX_CACHE_DIR to a folder of your own"
    folder_fd, folder = open_folder(cache_dir(), create=True, fix=fix)
    try:
        try:
            fd = open_file(folder_fd, folder, name, fix="delete it (it is rebuilt)")
        except FileNotFoundError:
            fd, digest = _build(build, name, files, cc, folder_fd, folder)
            if sha256_of(fd) != digest:  # the inode the compiler wrote, read again just before loading
                os.close(fd)
                raise NativeBuildError(f"{folder / name} changed between its build and its loading; not "
                                       f"loaded") from None
        return _dlopen(fd, folder / name, build, fix="delete it (it is rebuilt)")
    finally:
        os.close(folder_fd)


def _build(build: NativeBuild, name: str, files: dict[str, bytes], cc: list[str], folder_fd: int,
           folder: Path) -> tuple[int, str]:
    """Compile the source (``files``: it and its headers) in a private folder inside the cache, rename the library
    into the cache; returns a descriptor of it (the inode just written, whatever happens to the names afterwards)
    and its SHA-256."""
    _remove_stale_builds(folder_fd)
    private = f".build-{secrets.token_hex(8)}"
    os.mkdir(private, 0o700, dir_fd=folder_fd)
    private_fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    try:
        src = folder / private / next(iter(files))
        for file_name, data in files.items():  # compile exactly the bytes that were checked and hashed
            with open(os.open(file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=private_fd), "wb") as f:
                f.write(data)
        cmd = builds.compile_command(cc, build, src, folder / private / name)
        log.info("compiling the %s kernel: %s", build.name, " ".join(cmd))
        done = _run(cmd)
        if done.returncode != 0:
            error = builds.first_error(done.stderr).replace(str(src), str(_source_path(build)))
            raise _BuildFailed(f"compiling {build.source} failed (`{' '.join(cc)}`): {error}")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=private_fd)
        except OSError as exc:
            raise _BuildFailed(f"the compiler wrote no library for {build.source} ({exc.strerror})") from None
        os.fchmod(fd, 0o755)  # whatever the umask: writable by this user only
        os.fsync(fd)  # on disk before its name: a power loss never leaves a cut library under the final name
        digest = sha256_of(fd)
        os.replace(name, name, src_dir_fd=private_fd, dst_dir_fd=folder_fd)  # atomic: whole or absent
        return fd, digest
    finally:
        for entry in os.listdir(private_fd):  # the source copy, a library left by a failed step
            os.unlink(entry, dir_fd=private_fd)
        os.close(private_fd)
        os.rmdir(private, dir_fd=folder_fd)


def _remove_stale_builds(folder_fd: int) -> None:
    """Remove the private build folders that killed processes left in the cache: this user's own, older than
    STALE_BUILD_S; their files and links go (a link is never followed), a folder holding a folder stays."""
    now = time.time()
    listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=folder_fd)  # folder_fd: O_PATH
    try:
        entries = os.listdir(listing_fd)
    finally:
        os.close(listing_fd)
    for entry in entries:
        if not entry.startswith(".build-"):
            continue
        try:
            st = os.stat(entry, dir_fd=folder_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or now - st.st_mtime < STALE_BUILD_S:
                continue
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
            try:
                for name in os.listdir(fd):
                    if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=fd)  # a link is removed, never followed
            finally:
                os.close(fd)
            os.rmdir(entry, dir_fd=folder_fd)
        except OSError:  # another process removed it first, or it holds what we do not remove: left as it is
            continue


def _dlopen(fd: int, path: Path, build: NativeBuild, *, fix: str) -> ctypes.CDLL:
    """Load the file behind ``fd`` (the descriptor stays open for the life of the process) and check its ABI."""
    try:
        lib = ctypes.CDLL(fd_path(fd, path))
    except OSError as exc:
        os.close(fd)
        raise NativeBuildError(f"loading {path} failed: {exc}; {fix}") from None
    _OPEN_FDS.append(fd)
    if build.abi is not None:
        try:
            version = lib.sensimix_abi_version
        except AttributeError:
            raise NativeBuildError(f"{path} has no sensimix_abi_version(): it was not built from sensimix's "
                                   f"{build.source}; {fix}") from None
        version.restype, version.argtypes = ctypes.c_int64, []
        if version() != build.abi:
            raise NativeBuildError(f"{path} has ABI version {version()}, this sensimix needs {build.abi}; {fix}")
    return lib


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _BuildFailed(f"`{' '.join(cmd[:1])}` could not run: {exc}") from exc
