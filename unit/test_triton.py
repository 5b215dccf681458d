"""The Triton kernels (``sensimix.kernels.triton_kernels``): the sign pass and the XNOR-popcount GEMM.

* ``sign_operand``: the torch fallback, and the Triton kernel in Triton's interpreter (``TRITON_INTERPRET=1``) or
  compiled on a GPU;
* the XNOR GEMM in the interpreter at odd shapes (several program ids and loop trips);
* :func:`test_interpreter_runs_the_kernel_tests`: the tests that launch a Triton kernel, run in a subprocess in the
  interpreter with the triton (3.6.0, as on the GPU image) and the numpy (2.2.6: Triton 3.6's interpreter fails in
  kernels with loops on numpy >= 2.4) that scripts/install.sh puts in ``.venv/triton-interpreter`` (counts
  asserted).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import CUDA, ROOT, Launches, interpreter_pythonpath, needs_interpreter, problem

from sensimix import kernels
from sensimix.kernels import reference, triton_kernels
from sensimix.kernels.cuda import FP8
from sensimix.kernels.triton_kernels import sign_operand

# ---------------------------------------------------------------------------------------------------
# sign_operand: the torch fallback, and the Triton kernel (interpreter here, compiled on CUDA)
# ---------------------------------------------------------------------------------------------------
SIGN_OUT = {"fp8": FP8, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
SIGN_IN = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sign_inputs(dtype: torch.dtype, n: int = 3 * 1024 + 5) -> torch.Tensor:
    """Zeros of both signs, the smallest subnormals, infinities, NaN, the extremes, then random values."""
    special = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 1e-30, float("inf"), float("-inf"), float("nan"), 65504.0,
                            -65504.0, 1.0, -1.0])
    rest = torch.randn(n - len(special), generator=torch.Generator().manual_seed(3))
    return torch.cat([special, rest]).to(dtype)

def want_sign(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(h > 0, 1.0, -1.0).to(dtype)  # NaN > 0 is False: -1, like sign(0)

@pytest.mark.parametrize("out", list(SIGN_OUT))
@pytest.mark.parametrize("src", list(SIGN_IN))
def test_sign_operand_torch_fallback_is_exact(monkeypatch, src: str, out: str) -> None:
    monkeypatch.setattr(triton_kernels, "triton_available", lambda device=None: False)
    h = sign_inputs(SIGN_IN[src])
    got = sign_operand(h, SIGN_OUT[out])
    assert got.dtype == SIGN_OUT[out] and torch.equal(got.float(), want_sign(h, SIGN_OUT[out]).float())
    assert torch.equal(sign_operand(h.view(-1, 1)[::2], SIGN_OUT[out]).float(),
                       want_sign(h.view(-1, 1)[::2], SIGN_OUT[out]).float())

def check_triton_sign(device: str, src: torch.dtype, out: torch.dtype, launches: Launches) -> None:
    for n in (1, 1024, 3 * 1024 + 5):
        h = sign_inputs(src, max(n, 12))[:n].to(device)
        before = launches.count
        got = sign_operand(h, out)
        assert launches.count == before + 1, "the Triton kernel ran"
        assert got.dtype == out and torch.equal(got.float().cpu(), want_sign(h.cpu(), out).float())
    h = sign_inputs(src).to(device).view(-1, 1)[::2]  # not contiguous: torch ops, no launch
    before = launches.count
    assert torch.equal(sign_operand(h, out).float().cpu(), want_sign(h.cpu(), out).float())
    assert launches.count == before

@needs_interpreter
@pytest.mark.parametrize("out", list(SIGN_OUT))
@pytest.mark.parametrize("src", list(SIGN_IN))
def test_sign_operand_triton_kernel_in_interpreter(spies, src: str, out: str) -> None:
    check_triton_sign("cpu", SIGN_IN[src], SIGN_OUT[out], spies.triton_sign)

@pytest.mark.parametrize("src,out", [("fp16", "fp8"), ("fp16", "fp16"), ("fp16", "bf16"), ("fp32", "fp8")])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sign_operand_triton_kernel_on_gpu(spies, src: str, out: str) -> None:
    if spies.triton_sign is None:
        pytest.skip("triton is not installed")
    check_triton_sign("cuda", SIGN_IN[src], SIGN_OUT[out], spies.triton_sign)


# ---------------------------------------------------------------------------------------------------
# the XNOR-popcount GEMM in the interpreter: odd shapes, several program ids and loop trips
# ---------------------------------------------------------------------------------------------------
XNOR_SHAPES = [(1, 1, 1), (3, 33, 5), (65, 31, 33), (33, 129, 64), (40, 257, 70), (2, 1000, 3)]


@needs_interpreter
@pytest.mark.parametrize("m,k,n", XNOR_SHAPES)
def test_xnor_triton_gemm_odd_shapes_in_interpreter(m: int, k: int, n: int) -> None:
    kern = kernels.binary_kernel("xnor", "cpu")
    x, bits, _ = problem(m, k, n)
    got = kern.dot(kern.binarize(x, k), kern.prepare_weight(bits, k), k)
    assert got.dtype == torch.int32 and torch.equal(got.long(), reference.binary_matmul(x, bits, k))


# ---------------------------------------------------------------------------------------------------
# the Triton tests in the interpreter, in a subprocess (CI's .venv keeps its numpy; triton lives apart)
# ---------------------------------------------------------------------------------------------------
# the tests that launch a Triton kernel on the CPU in the interpreter: the XNOR GEMM, the sign pass on its own, and
# through the FP8 kernel's linear_sign (its exactness tests and the CUDA plan's runtime), the A8 kernel (a8-triton)
INTERPRETER_TESTS = ("xnor", "triton_kernel", "triton_gemm", "fp8_sign", "cuda_plan_fp8", "exact_on_cpu and fp8",
                     "a8_triton and in_interpreter")
INTERPRETER_RUN = ["unit/test_kernels.py", "unit/test_fp8.py", "unit/test_triton.py", "unit/test_cuda_plan.py",
                   "unit/test_triton_a8.py", "-m", "not gpu",
                   "-k", f"({' or '.join(f'({t})' for t in INTERPRETER_TESTS)}) and not on_cuda"]
INTERPRETER_PASSED = 61  # 10 of them a8-triton's; a selection that changes fails here: update the count with it


def pytest_counts(output: str) -> dict[str, int]:
    last = [ln for ln in output.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|warnings?)",
                                                     last[-1] if last else "")}

def test_interpreter_runs_the_kernel_tests() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already inside Triton's interpreter")
    where, why = interpreter_pythonpath()
    if where is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Triton kernels in the interpreter: {why}")
        pytest.skip(why)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (where, str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
                          "-W", "ignore::DeprecationWarning", *INTERPRETER_RUN],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    counts = pytest_counts(run.stdout)
    print(f"Triton interpreter run ({why}): {counts} in {time.monotonic() - t0:.0f} s")
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert counts.get("failed", 0) == 0 and counts.get("skipped", 0) == 0, tail
    assert counts.get("passed", 0) == INTERPRETER_PASSED, tail
