"""Builds the C kernels into the package when it is installed (``pip install .``, ``pip install -e .``, a wheel).

They are plain shared libraries that :mod:`sensimix.kernels.native` loads with ctypes, not Python extension
modules: each row of ``sensimix/kernels/native_builds.py`` is one optional extension, compiled by the same command
line as a run-time build into ``sensimix/kernels/_native/<name>-<key>.so`` (the key hashes the source and its
flags). A row that fails to build (no C compiler, a compiler without ``-mavx512vnni``) is skipped with a warning
and the install goes on; at run time that kernel says why once and the next exact kernel runs. Everything else
about the package is in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
PACKAGE = "sensimix.kernels._native"  # the folder the libraries go to (not a Python package: no __init__.py)


def _native_builds():
    """sensimix/kernels/native_builds.py by its path: importing sensimix would import torch."""
    spec = importlib.util.spec_from_file_location("_sensimix_native_builds",
                                                  ROOT / "sensimix" / "kernels" / "native_builds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


NB = _native_builds()
ROWS = {build.name.replace("-", "_"): build for build in NB.BUILDS}


class BuildNativeLibraries(build_ext):
    """build_ext for plain shared libraries: our own file names and compile command, no Python headers."""

    def get_ext_filename(self, fullname: str) -> str:
        *package, last = fullname.split(".")
        build = ROWS[last]
        return os.path.join(*package, NB.library_file(build, NB.read_bundle(ROOT / "sensimix" / "kernels" / "csrc" /
                                                                            build.source)))

    def build_extension(self, ext: Extension) -> None:
        build = ROWS[ext.name.rsplit(".", 1)[-1]]
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = NB.compiler()
        if cc is None:
            raise CompileError(f"{build.name}: no C compiler found (looked for $CC, cc, gcc)")
        tmp = out.with_name(f".{out.name}.tmp")
        cmd = NB.compile_command(cc, build, ROOT / "sensimix" / "kernels" / "csrc" / build.source, tmp)
        print(" ".join(cmd), flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompileError(f"{build.name}: `{cmd[0]}` could not run: {exc}") from exc
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise CompileError(f"{build.name}: {NB.first_error(done.stderr)}")
        tmp.chmod(0o755)  # whatever the umask: the runtime refuses libraries others can write
        os.replace(tmp, out)

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the libraries go to the checkout's sensimix/kernels/_native, replacing older builds."""
        folder = ROOT / Path(*PACKAGE.split("."))
        folder.mkdir(mode=0o755, exist_ok=True)
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name)).name
            if (Path(self.build_lib) / Path(*PACKAGE.split(".")) / built).exists():
                build = ROWS[ext.name.rsplit(".", 1)[-1]]
                for old in folder.glob(f"{build.name}-*.so"):
                    if old.name != built:
                        old.unlink()
        super().copy_extensions_to_source()


setup(
    ext_modules=[Extension(f"{PACKAGE}.{key}", sources=[f"sensimix/kernels/csrc/{build.source}"], optional=True)
                 for key, build in ROWS.items()],
    cmdclass={"build_ext": BuildNativeLibraries},
)
