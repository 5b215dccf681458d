"""What the package's C kernels are built from: one line per library (:data:`BUILDS`), read both by ``setup.py``
(which builds them when the package is installed) and by :mod:`sensimix.kernels.native` (which loads them).

Standard library only, and no imports from the package: ``setup.py`` loads this file by its path, before torch or
sensimix can be imported.

A library is one dependency-free C file of ``csrc/`` compiled with :data:`COMMON_FLAGS` plus its own flags into
``<name>-<key>.so``, where the key is a hash of the source, the flags and the ABI version: a library built from
another version of the source, or with other flags, has another file name and is never taken for this one. Each
source exports ``int64_t sensimix_abi_version(void)``, which must return the row's ``abi``: bump both when the
functions the Python wrapper binds change.

A source may include headers of ``csrc/`` (``#include "x.h"``): they are part of what is hashed, copied and built
(:func:`bundle`). To add a kernel, add one row (see the a8gemm rows: one source, two builds, IEEE-exact float
epilogues with ``-ffp-contract=off``) and load it with ``native.load_build("<name>")``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
COMMON_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")


@dataclass(frozen=True)
class NativeBuild:
    """One shared library: ``csrc/<source>`` compiled with :data:`COMMON_FLAGS` and ``flags``."""

    name: str                   # the library's name: <name>-<key>.so
    source: str                 # a file in csrc/ (an absolute path only for builds made up at run time)
    flags: tuple[str, ...]      # its own compiler flags, e.g. ("-mavx2", "-mfma", "-ffp-contract=off")
    cpu_flags: frozenset[str]   # /proc/cpuinfo flags its code needs to run
    abi: int | None = 1         # what its sensimix_abi_version() returns (None: not checked)


BUILDS: tuple[NativeBuild, ...] = (
    NativeBuild("popcount-avx2", "popcount.c", ("-mavx2",), frozenset({"avx2"})),
    NativeBuild("int16gemm-avx2", "int16gemm.c", ("-mavx2", "-mfma"), frozenset({"avx2", "fma"})),
    # the A8 kernels compute sensimix/a8.py's float sequences bit for bit: no FMA contraction
    NativeBuild("a8gemm-vnni", "a8gemm.c", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2",
                                            "-ffp-contract=off"),
                frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})),
    NativeBuild("a8gemm-avx2", "a8gemm.c", ("-mavx2", "-ffp-contract=off"), frozenset({"avx2"})),
    # fp64 sums of exact fp32 products: an explicit FMA rounds as a multiply then an add would
    NativeBuild("a8attn-avx2", "a8attn.c", ("-mavx2", "-mfma", "-ffp-contract=off"), frozenset({"avx2", "fma"})),
)


def find(source: str, flags: tuple[str, ...]) -> NativeBuild | None:
    """The row of :data:`BUILDS` for ``source`` built with ``flags``, if there is one."""
    return next((b for b in BUILDS if b.source == source and b.flags == tuple(flags)), None)


def by_name(name: str) -> NativeBuild:
    for build in BUILDS:
        if build.name == name:
            return build
    raise KeyError(f"no native build named {name!r}; the builds are: {', '.join(b.name for b in BUILDS)}")


def source_path(build: NativeBuild) -> Path:
    return CSRC / build.source


_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*"([A-Za-z0-9_.-]+)"', re.M)


def local_includes(source: bytes) -> list[str]:
    """The ``#include "x.h"`` headers of a source (csrc/ files; the system's come with the compiler), sorted."""
    return sorted({m.decode() for m in _INCLUDE.findall(source)})


def bundle(source: bytes, headers: dict[str, bytes]) -> bytes:
    """What a build is made of, as one byte string: the source, then each local header's name and bytes."""
    return source + b"".join(b"\0" + name.encode() + b"\0" + headers[name] for name in sorted(headers))


def read_bundle(source_path: Path) -> bytes:
    """:func:`bundle` of a source file and the headers beside it that it includes (``setup.py``'s view)."""
    source = source_path.read_bytes()
    return bundle(source, {h: (source_path.parent / h).read_bytes() for h in local_includes(source)})


def library_file(build: NativeBuild, source: bytes) -> str:
    """``<name>-<key>.so``: the key hashes the source with its headers (:func:`bundle`), every flag and the ABI
    version."""
    text = "\0".join([*COMMON_FLAGS, *build.flags, f"abi={build.abi}"]).encode()
    key = hashlib.sha256(source + b"\0" + text).hexdigest()[:16]
    return f"{build.name}-{key}.so"


def compiler() -> list[str] | None:
    """The C compiler command ($CC may carry arguments), or None when there is none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def compile_command(cc: list[str], build: NativeBuild, source: str | Path, out: str | Path) -> list[str]:
    """The one command line both the install-time and the run-time build use."""
    return [*cc, *COMMON_FLAGS, *build.flags, str(source), "-o", str(out)]


def first_error(stderr: str) -> str:
    """The compiler's first ``error:`` line (not the notes after it), or its last line."""
    lines = stderr.strip().splitlines() or ["(no message)"]
    return next((line for line in lines if " error:" in line), lines[-1])[:300]
