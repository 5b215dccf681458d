"""Helpers of the safe-writes tests (unit/test_io.py, unit/test_writers.py): processes that race or die.

They load ``sensimix/io/folders.py`` and the sibling it imports on their own (they need only the standard
library), so each child process starts in milliseconds instead of importing torch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import sensimix.io.folders as sio

IO_FILE = Path(sio.__file__)
PRELUDE = f"""\
import importlib.util, os, sys, time, types
from pathlib import Path
pkg = types.ModuleType("sio_pkg")  # io/ as a package of its own: folders.py and the sibling it imports, no torch
pkg.__path__ = [{str(IO_FILE.parent)!r}]
sys.modules["sio_pkg"] = pkg
spec = importlib.util.spec_from_file_location("sio_pkg.folders", {str(IO_FILE)!r})
sio = importlib.util.module_from_spec(spec)
sys.modules["sio_pkg.folders"] = sio
spec.loader.exec_module(sio)
"""


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def make_version(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(text)
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# a writer that dies between the two renames of an overwrite (the fallback path: no renameat2)
DIES_BETWEEN_RENAMES = """\
sio._renameat2 = lambda src, dst, flags: False  # the fallback path
real = os.replace
def replace(src, dst):
    if ".tmp." in Path(src).name:  # the old version is already hidden away: die before the new one lands
        os._exit(9)
    real(src, dst)
sio.os.replace = replace
with sio.atomic_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "config.json").write_text("new")
"""
