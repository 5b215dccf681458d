"""Helpers shared by the unit test modules (their fixtures are in conftest.py; no test module imports another).

Tiny models and inputs (:data:`GEOMETRY`, :func:`build_qat`, :func:`ragged_inputs`, :func:`problem`), spies that
record which code ran (:class:`Calls`, :class:`Launches`), the marks of tests that need a device or Triton's
interpreter, and :func:`load_script` for the tests of scripts/ (tools, not library code: they are run, not imported).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import BertConfig

from sensimix import kernels
from sensimix.kernels.cuda import fp8_supported
from sensimix.kernels.triton_kernels import triton_available
from sensimix.qat import from_bert
from sensimix.quant import pack_signs

ROOT = Path(__file__).resolve().parent.parent

# a tiny BERT geometry and the words of its vocabulary (the tiny_* fixtures in conftest.py build from these)
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=52,
            max_position_embeddings=64, type_vocab_size=2)
WORDS = "the a movie film good bad great awful is was not very what who where when why how of to and it".split()

# ---------------------------------------------------------------------------------------------------
# where a test can run
# ---------------------------------------------------------------------------------------------------
CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]  # scripts/gpu_check.py runs these
INTERPRETER = triton_available(CPU)  # triton importable and TRITON_INTERPRET=1
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="Triton kernels run on CPU only in Triton's interpreter (TRITON_INTERPRET=1 with triton "
                            "importable): test_interpreter_runs_the_kernel_tests runs these in a subprocess")
needs_fp8_cpu = pytest.mark.skipif(not fp8_supported(CPU), reason="this torch has no float8 / torch._scaled_mm")
INTERPRETER_DIR = ROOT / ".venv" / "triton-interpreter"  # scripts/install.sh: triton==3.6.0 numpy==2.2.6


def interpreter_pythonpath() -> tuple[str | None, str]:
    """(a folder to put first on PYTHONPATH for a triton whose interpreter works, or "" for this environment's own;
    None when there is none) and why."""
    if os.environ.get("SENSIMIX_TRITON_DIR"):
        return os.environ["SENSIMIX_TRITON_DIR"], "$SENSIMIX_TRITON_DIR"
    if (INTERPRETER_DIR / "triton").is_dir():
        return str(INTERPRETER_DIR), str(INTERPRETER_DIR.relative_to(ROOT))
    if importlib.util.find_spec("triton") is not None:
        import numpy

        if tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4):
            return "", "this environment's triton"
        return None, (f"this environment's triton runs its interpreter with numpy {numpy.__version__} (>= 2.4 "
                      f"breaks kernels with loops); run scripts/install.sh for {INTERPRETER_DIR.relative_to(ROOT)}")
    return None, f"no triton: scripts/install.sh installs it into {INTERPRETER_DIR.relative_to(ROOT)}"


# ---------------------------------------------------------------------------------------------------
# tiny models and inputs
# ---------------------------------------------------------------------------------------------------
# odd intermediate size (100: not a multiple of 8 or 32) exercises the padded bit paths
GEOMETRY = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=100,
                max_position_embeddings=32, type_vocab_size=2)


def build_qat(layers: int = 4, eightbit: int = 2, seed: int = 0, intermediate_size: int | None = None,
              activation_quant: str | None = None):
    """A tiny QAT model of :data:`GEOMETRY` (``intermediate_size``: another FFN width; ``activation_quant="a8"``: an
    A8 model) with nonzero biases, rounded to fp16 (what the checkpoint stores), every 1-bit FFN binarized, eval
    mode."""
    geometry = {**GEOMETRY, **({} if intermediate_size is None else {"intermediate_size": intermediate_size})}
    qat = from_bert(BertConfig(**geometry, num_hidden_layers=layers), num_hidden_layers=layers,
                    num_8bit_layers=eightbit, seed=seed, activation_quant=activation_quant)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qat.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    qat.round_float_tensors_to_fp16_()
    qat.set_binarized_layers(qat.config.mixed_layers)
    return qat.eval()


SEQ = 24
LENGTHS = [24, 1, 2, 3, 5, 8, 9, 13, 16, 17, 20, 23]  # one unpadded row, one [CLS]-only row, padding at the end


def ragged_inputs(seed: int = 4) -> dict[str, torch.Tensor]:
    """A batch of :data:`LENGTHS` (right-padded to :data:`SEQ`) of :data:`GEOMETRY`'s vocabulary, two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, GEOMETRY["vocab_size"], (len(LENGTHS), SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    types = ((torch.arange(SEQ)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": types}


def logits_of(model, inputs: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """``model``'s fp32 logits on the CPU for ``inputs`` run on ``device``."""
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def problem(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations with exact zeros (sign(0) = -1), packed weights, and biases that hit acc + b == 0 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, ::5] = 0.0
    bits = pack_signs(torch.randn(n, k, generator=g))
    # integers and half-integers in [-6, 6] make ties (acc + b == 0 -> sign -1) common; fp16-representable
    bias = (torch.randint(-12, 13, (n,), generator=g) / 2).to(torch.float32)
    return x, bits, bias


# ---------------------------------------------------------------------------------------------------
# spies: which code ran
# ---------------------------------------------------------------------------------------------------
class Calls:
    """Delegates to ``fn`` and keeps each call's arguments."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


class Launches:
    """A Triton kernel's stand-in that counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.count += 1
            return launch(*args, **kwargs)

        return run


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
            *int16, "sensimix-3+3-fp32", "sensimix-3+3-fast", *a8_bench_rows()]


def a8_bench_rows() -> list[str]:
    """The A8 models' rows of a CPU run: (2+1) exact, fast, fast with padding kept, each other A8 kernel this CPU
    runs; (3+3) exact and fast."""
    default = kernels.default_index8_kernel(CPU, "a8")
    others = [n for n, k in kernels.INDEX8_KERNELS.items() if k.activations == "a8"
              and n not in (default, "a8-reference") and k.unavailable(CPU) is None]
    return ["sensimix-2+1-a8-fp32", "sensimix-2+1-a8-fast", "sensimix-2+1-a8-fast-padded",
            *(f"sensimix-2+1-a8-fp32-8bit-{n}" for n in others), "sensimix-3+3-a8-fp32", "sensimix-3+3-a8-fast"]
