"""Helpers shared by the unit test modules (their fixtures are in conftest.py; no test module imports another).

:func:`load_script` for the tests of scripts/ (tools, not library code: they are run, not imported), and the rows
a CPU benchmark run times.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from sensimix import kernels

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# scripts/
# ---------------------------------------------------------------------------------------------------
def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, to call its ``main`` in this process (cheaper than a subprocess)."""
    spec = importlib.util.spec_from_file_location(f"sensimix_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------
# the benchmark's rows
# ---------------------------------------------------------------------------------------------------
ORT_ROWS = [f"{g}-ort-{p}{b}" for g in ("bert", "bert3") for p in ("fp32", "int8") for b in ("", "-bucketed")]


def cpu_bench_rows() -> list[str]:
    """Every row of a CPU benchmark run, in order. SensiMix (2+1)'s other kernels are this CPU's: each other exact
    1-bit kernel it runs fast (and ``float``), ``dense`` (the other exact 8-bit kernel), ``int16`` where it runs."""
    default = kernels.default_binary_kernel(CPU)
    fast_binary = [n for n, k in kernels.BINARY_KERNELS.items() if n not in ("reference", default)
                   and k.unavailable(CPU) is None and (k.fast_on(CPU) or n == "float")]
    int16 = ["sensimix-2+1-fp32-8bit-int16"] if kernels.INDEX8_KERNELS["int16"].unavailable(CPU) is None else []
    return ["bert-fp32", "bert-torch-int8", *ORT_ROWS[:4], "bert3-fp32", "bert3-torch-int8", *ORT_ROWS[4:],
            "bert-runtime-fp32-skip", "sensimix-2+1-fp32", "sensimix-2+1-fast", "sensimix-2+1-fast-padded",
            "sensimix-2+1-bf16", *(f"sensimix-2+1-fp32-1bit-{n}" for n in fast_binary), "sensimix-2+1-fp32-8bit-dense",
            *int16, "sensimix-3+3-fp32", "sensimix-3+3-fast"]
