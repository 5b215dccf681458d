"""The CUDA code paths, proven on the CPU as far as torch allows; the tests marked ``gpu`` do the rest on a GPU.

On the CPU, torch runs ``torch._scaled_mm`` through oneDNN (slowly) and Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1``). So the plan a CUDA device gets -- fp16 activations, dense fp16 8-bit weights, the FP8
1-bit kernel with its fused-bias epilogue and its Triton sign pass, Q/K/V fused, padding skipped with the
:class:`~sensimix.inference.Packing` staged beforehand -- runs here end to end, and only speed is left to the device:

* dispatch: the plan :func:`make_plan` gives a (pretend) sm_90 / sm_89 / sm_80 / sm_75 device, and its CPU twin;
* that plan's runtime vs the QAT model (fp16 tolerance) and vs the exact fp32 path (the same predictions);
* the FP8 kernel vs :mod:`sensimix.kernels.reference`, bit for bit: fp32 outputs, fp16 outputs with the bias fused
  into the GEMM, bf16 outputs with the fp32 bias added after it (one rounding; two would be caught);
* ``sign_operand``: the torch fallback, and the Triton kernel in the interpreter;
* the Triton tests in the interpreter, in a subprocess with the triton (3.6.0, as on the GPU image) and the numpy
  (2.2.6: Triton 3.6's interpreter fails in kernels with loops on numpy >= 2.4) that scripts/install.sh puts in
  ``.venv/triton-interpreter`` (counts asserted);
* the package and both test suites without ``datasets`` (the GPU image has none);
* the device check (scripts/gpu_check.py): its budget, its files, its preflight, the card's name.

On a GPU, ``pytest unit -m gpu`` (scripts/gpu_check.py's first step) runs the ``gpu`` tests: every exact 1-bit
kernel, the FP8 exactness tables at BERT's shapes, the compiled Triton sign pass, and the device-default runtime vs
the QAT model.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_inference import GEOMETRY
from test_kernels import SHAPES, check_binary_kernel, problem
from transformers import BertConfig

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import devices, kernels
from sensimix.export import convert, export_checkpoint
from sensimix.inference import make_plan
from sensimix.kernels import cuda as cuda_kernels
from sensimix.kernels import reference, triton_kernels
from sensimix.kernels.cuda import FP8, fp8_supported
from sensimix.kernels.triton_kernels import sign_operand, triton_available
from sensimix.qat import from_bert
from sensimix.measure import make_batches, run_inference
from sensimix.vv.procedure import sensimix_precision

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
CPU = torch.device("cpu")
INTERPRETER = triton_available(CPU)  # triton importable and TRITON_INTERPRET=1
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="Triton kernels run on CPU only in Triton's interpreter (TRITON_INTERPRET=1 with triton "
                            "importable): test_interpreter_runs_the_kernel_tests runs these in a subprocess")
needs_fp8_cpu = pytest.mark.skipif(not fp8_supported(CPU), reason="this torch has no float8 / torch._scaled_mm")
OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PLAN_FIELDS = ("precision", "dtype", "binary_kernel", "index8_kernel", "fuse_qkv", "skip_padding")


def plan_fields(plan) -> tuple:
    return tuple(getattr(plan, f) for f in PLAN_FIELDS)


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


@pytest.fixture
def spies(monkeypatch) -> SimpleNamespace:
    scaled_mm = Calls(torch._scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    sign = Calls(cuda_kernels.sign_operand)
    monkeypatch.setattr(cuda_kernels, "sign_operand", sign)
    triton_sign = None
    if triton_kernels.triton is not None:
        triton_sign = Launches(triton_kernels._sign_operand_kernel)
        monkeypatch.setattr(triton_kernels, "_sign_operand_kernel", triton_sign)
    return SimpleNamespace(scaled_mm=scaled_mm, sign=sign, triton_sign=triton_sign)


# ---------------------------------------------------------------------------------------------------
# dispatch: what a CUDA device gets, and its CPU twin
# ---------------------------------------------------------------------------------------------------
def pretend_cuda(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.skipif(CUDA, reason="pretends a CUDA device: only where there is none")
@pytest.mark.parametrize("capability,binary", [((9, 0), "fp8"), ((8, 9), "fp8"), ((8, 0), "int8"), ((7, 5), "float")])
def test_what_a_cuda_device_gets_and_its_cpu_twin(monkeypatch, capability, binary: str) -> None:
    pretend_cuda(monkeypatch, capability)
    plan, half = make_plan("cuda"), make_plan("cuda", "fp16")
    assert plan.device == torch.device("cuda", 0)
    assert plan_fields(plan) == ("fp32", torch.float32, binary, "dense", True, True) and plan.exact
    # `fast` on CUDA is the exact path too: fp16 flips too many trained-model predictions (plan.fast_index8_kernel)
    assert plan_fields(make_plan("cuda", "fast"))[1:] == plan_fields(plan)[1:]
    assert plan_fields(half) == ("fp16", torch.float16, binary, "dense", True, True) and not half.exact
    assert sensimix_precision("auto", "cuda") == "fast"  # what VVRun / the acceptance suite time on CUDA
    monkeypatch.undo()
    for cuda_plan, precision in ((plan, "fp32"), (half, "fp16")):  # dense: CUDA's 8-bit default
        twin = make_plan("cpu", precision, binary_kernel=binary, index8_kernel="dense")
        assert plan_fields(twin) == plan_fields(cuda_plan) and twin.device == CPU


# ---------------------------------------------------------------------------------------------------
# the CUDA plan's runtime, on the CPU
# ---------------------------------------------------------------------------------------------------
SEQ = 24
LENGTHS = [24, 1, 2, 3, 5, 8, 9, 13, 16, 17, 20, 23]  # one unpadded row, one [CLS]-only row, padding at the end


def ragged_inputs(seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, GEOMETRY["vocab_size"], (len(LENGTHS), SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    types = ((torch.arange(SEQ)[None, :] >= torch.tensor(LENGTHS)[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": types}


def logits_of(model, inputs: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def build_qat_model(intermediate_size: int):
    """test_inference's tiny (2+2) QAT model (nonzero fp16 biases, every 1-bit FFN binarized) with this FFN width."""
    geometry = {**GEOMETRY, "intermediate_size": intermediate_size}
    qat = from_bert(BertConfig(**geometry, num_hidden_layers=4), num_hidden_layers=4, num_8bit_layers=2, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in qat.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    qat.set_binarized_layers(qat.config.mixed_layers)
    return qat.eval()


# 100: N and K not multiples of 16 (the FP8 GEMM pads them; its sliced output takes the sign pass's torch fallback);
# 128: BERT-like multiples of 16 (the sign pass is the Triton kernel where triton runs)
@pytest.fixture(scope="module", params=[100, 128], ids=["ffn100", "ffn128"])
def qat_model(request):
    """A QAT model with a classifier that splits ``ragged_inputs`` into both classes with wide margins (a random head
    gives every row the same class, and equal predictions would prove nothing)."""
    qat, inputs = build_qat_model(request.param), ragged_inputs()
    with torch.no_grad():
        pooled = qat.bert(**inputs).pooler_output
        centred = pooled - pooled.mean(0)
        u = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        proj = (centred @ u).sort().values
        b = len(proj)
        gaps = proj[1:] - proj[:-1]
        i = b // 4 + int(gaps[b // 4:3 * b // 4].argmax())  # the widest gap in the middle half
        cut = float(proj[i] + proj[i + 1]) / 2 + float(pooled.mean(0) @ u)
        scale = 4.0 / float(gaps[i])
        qat.classifier.weight.copy_(torch.stack([u, -u]) * scale)
        qat.classifier.bias.copy_(torch.tensor([-cut, cut]) * scale)
    qat.round_float_tensors_to_fp16_()  # what the checkpoint stores
    return qat.eval(), inputs


def triton_sign_launches(qat) -> int:
    """Sign passes per forward that run the Triton kernel: one per mixed layer when its FFN width needs no padding."""
    return len(qat.config.mixed_layers) if qat.config.intermediate_size % 16 == 0 else 0


def test_the_qat_model_splits_the_batch(qat_model) -> None:
    qat, inputs = qat_model
    want = logits_of(qat, inputs)
    assert set(want.argmax(-1).tolist()) == {0, 1}
    margin = (want[:, 0] - want[:, 1]).abs().min().item()
    assert margin > 5 * 0.01 * want.abs().max().item(), "margins far above the fp16 tolerance: no flaky argmax"


@needs_fp8_cpu
def test_cuda_plan_fp8_runtime_on_cpu_matches_qat_and_exact(qat_model, spies) -> None:
    qat, inputs = qat_model
    model = convert(qat, "cpu", "fp16", binary_kernel="fp8", index8_kernel="dense")
    assert plan_fields(model.plan) == ("fp16", torch.float16, "fp8", "dense", True, True)
    spies.scaled_mm.calls.clear()
    got = logits_of(model, inputs)
    gemms, signs = list(spies.scaled_mm.calls), len(spies.sign.calls)
    triton_signs = spies.triton_sign.count if spies.triton_sign is not None else 0
    want = logits_of(qat, inputs)
    exact = logits_of(convert(qat, "cpu", "fp32"), inputs)
    assert (exact - want).abs().max().item() <= 1e-5
    assert (got - want).abs().max().item() <= 0.01 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), exact.argmax(-1)) and torch.equal(exact.argmax(-1), want.argmax(-1))
    # the CUDA code ran: both 1-bit linears of every mixed layer on _scaled_mm, each with its fp16 bias fused and
    # an fp16 output; one sign pass per mixed layer (the Triton kernel in the interpreter, else torch ops)
    mixed = len(qat.config.mixed_layers)
    assert len(gemms) == 2 * mixed
    for args, kwargs in gemms:
        assert args[0].dtype == FP8 and kwargs["out_dtype"] == torch.float16
        assert kwargs["bias"] is not None and kwargs["bias"].dtype == torch.float16
    assert signs == mixed
    assert triton_signs == (triton_sign_launches(qat) if INTERPRETER else 0)


@needs_fp8_cpu
def test_cuda_plan_fp8_from_pretrained_with_staged_packing(qat_model, tmp_path) -> None:
    # as VVRun stages CUDA batches: each carries the Packing of its mask, made on the CPU beforehand
    qat, inputs = qat_model
    folder = export_checkpoint(qat, tmp_path / "sensimix")
    model = Packed.from_pretrained(folder, device="cpu", precision="fp16", binary_kernel="fp8", index8_kernel="dense")
    assert plan_fields(model.plan) == ("fp16", torch.float16, "fp8", "dense", True, True)
    staged = make_batches(inputs, batch_size=5, device="cpu", packing=True)
    assert all("packing" in b for b in staged)
    exact = run_inference(Packed.from_pretrained(folder), make_batches(inputs, batch_size=5), warmup_batches=0)
    fast = run_inference(model, staged, warmup_batches=1)
    assert torch.equal(fast.predictions, exact.predictions) and fast.num_examples == len(LENGTHS)
    with torch.inference_mode():  # the staged packing is the one the model makes itself: the same logits
        b = staged[0]
        kwargs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        assert torch.equal(model(**kwargs, packing=b["packing"]).logits, model(**kwargs).logits)
    # the CUDA default (and `fast`) plan on its CPU twin: exact, within fp32 reordering of the QAT model's logits
    default = Packed.from_pretrained(folder, device="cpu", precision="fp32", binary_kernel="fp8", index8_kernel="dense")
    assert default.exact
    got = run_inference(default, staged, warmup_batches=0)
    assert torch.equal(got.predictions, exact.predictions)
    with torch.inference_mode():
        want = qat(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        logits = default(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert (logits - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=gpu)])
def test_the_bf16x3_kernel_keeps_the_exact_paths_logits(qat_model, tmp_path, device: str) -> None:
    # the exact path's 8-bit GEMMs on bf16 tensor cores (three exact bf16 parts of each activation): on CPU its
    # twin (the same operands, an fp32 GEMM), on CUDA cuBLAS with fp32 accumulation and output
    qat, inputs = qat_model
    folder = export_checkpoint(qat, tmp_path / "sensimix")
    model = Packed.from_pretrained(folder, device=device, index8_kernel="bf16x3")
    assert model.plan.index8_kernel == "bf16x3" and model.plan.fuse_qkv and not model.plan.exact
    got = logits_of(model, inputs, device)
    exact = logits_of(Packed.from_pretrained(folder), inputs)
    assert (got - exact).abs().max().item() <= 1e-5 * max(1.0, exact.abs().max().item())
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_staged_packing_goes_only_to_a_model_that_skips_padding(qat_model, tmp_path) -> None:
    # CUDA batches carry their Packing (staged by VVRun); a model told to keep padding (the benchmark's "padding
    # kept" row) must not be handed it: a packing passed in wins over the plan. The H200 benchmark's "padding kept"
    # row ran packed before this (3.4 ms, the same as the packed row).
    qat, inputs = qat_model
    folder = export_checkpoint(qat, tmp_path / "sensimix")
    staged = make_batches(inputs, batch_size=5, packing=True)
    for skip in (False, True):
        model = Packed.from_pretrained(folder, skip_padding=skip)
        seen, forward = [], model.forward

        def spy(*args, _forward=forward, _seen=seen, **kwargs):
            _seen.append(kwargs.get("packing"))
            return _forward(*args, **kwargs)

        model.forward = spy
        run_inference(model, staged, warmup_batches=0)
        assert len(seen) == len(staged)
        assert all((p is not None) == skip for p in seen), f"skip_padding={skip}"


# ---------------------------------------------------------------------------------------------------
# the FP8 kernel vs the reference, bit for bit
# ---------------------------------------------------------------------------------------------------
TABLE_SHAPES = [(1, 7, 3), (5, 100, 96), (17, 64, 17), (33, 200, 50), (16, 768, 40), (64, 3072, 24), (128, 768, 48)]
CUDA_TABLE_SHAPES = TABLE_SHAPES + [(256, 768, 3072), (256, 3072, 768)]  # BERT-base's FFN shapes


def table_problem(m: int, k: int, n: int, seed: int = 0):
    """x with exact zeros (sign(0) = -1), packed weights, and fp16-valued biases with full mantissas (acc + b needs
    up to 22 bits: exact in fp32, so only the final rounding can differ)."""
    x, bits, _ = problem(m, k, n, seed)
    bias = (torch.randn(n, generator=torch.Generator().manual_seed(seed + 7)) * 4).half().float()
    return x, bits, bias


def same_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements are bitwise equal (+0.0 and -0.0 differ)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    return int((a.contiguous().view(ints) == b.contiguous().view(ints)).sum())


@functools.lru_cache(maxsize=8)
def table_reference(m: int, k: int, n: int, bias: bool) -> torch.Tensor:
    """The reference's fp32 ``sign(x) sign(W)^T + b`` of :func:`table_problem` (int64 GEMM on the CPU: computed once)."""
    x, bits, b = table_problem(m, k, n)
    return reference.binary_linear(x, bits, k, b if bias else None)


def fp8_exactness(device: str, m: int, k: int, n: int, out: torch.dtype, bias: bool = True) -> tuple[int, int]:
    """(outputs of the FP8 kernel's ``linear`` equal bit for bit to the reference rounded once to ``out``, outputs)."""
    kern = kernels.binary_kernel("fp8", device)
    x, bits, b = table_problem(m, k, n)
    b = b if bias else None
    want = table_reference(m, k, n, bias).to(out)
    got = kern.linear(x.to(device), kern.prepare_weight(bits.to(device), k), None if b is None else b.to(device), k,
                      out).cpu()
    assert got.dtype == out and got.shape == (m, n)
    return same_bits(got, want), m * n


@needs_fp8_cpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out", list(OUT_DTYPES))
@pytest.mark.parametrize("m,k,n", TABLE_SHAPES)
def test_fp8_linear_is_the_reference_rounded_once(m: int, k: int, n: int, out: str, bias: bool) -> None:
    equal, total = fp8_exactness("cpu", m, k, n, OUT_DTYPES[out], bias)
    assert equal == total, f"{total - equal} of {total} outputs differ from the reference rounded once"


@needs_fp8_cpu
def test_fp8_fuses_the_fp16_bias_only(spies) -> None:
    # fp16 outputs: the stored fp16 bias rides in the GEMM's epilogue (fp32 acc + b, rounded once). bf16 and fp32
    # outputs: the GEMM returns fp32 and the fp32 bias is added after it (one rounding to bf16, none to fp32).
    kern = kernels.binary_kernel("fp8", "cpu")
    x, bits, bias = table_problem(9, 100, 40)
    w = kern.prepare_weight(bits, 100)
    seen = {}
    for name, out in OUT_DTYPES.items():
        spies.scaled_mm.calls.clear()
        kern.linear(x, w, bias, 100, out)
        (_, kwargs), = spies.scaled_mm.calls
        seen[name] = (kwargs["bias"] is not None, kwargs["out_dtype"])
    assert seen == {"fp16": (True, torch.float16), "bf16": (False, torch.float32), "fp32": (False, torch.float32)}


@needs_fp8_cpu
def test_a_second_rounding_would_be_caught() -> None:
    # what a bf16 epilogue would compute (the bias rounded to bf16, then acc + b rounded again) differs from the
    # reference on many outputs, so the bitwise tables above can tell one rounding from two
    x, bits, bias = table_problem(64, 768, 48)
    acc = reference.binary_matmul(x, bits, 768).float()
    once = (acc + bias).to(torch.bfloat16)
    twice = (acc + bias.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert same_bits(twice, once) < 0.99 * once.numel()


@needs_fp8_cpu
@pytest.mark.parametrize("m,k,n", [(64, 3072, 40), (33, 200, 50), (1, 7, 3)])
def test_fp8_sign_from_the_fused_fp16_gemm_is_exact(m: int, k: int, n: int) -> None:
    # linear_sign rounds acc + b to fp16 in the GEMM (above 2048 fp16 integers are spaced 2 apart), then takes the
    # sign: rounding never crosses zero, and acc + b == 0 (half-integer biases make ties) stays -1
    kern = kernels.binary_kernel("fp8", "cpu")
    x, bits, bias = problem(m, k, n)
    s = kern.linear_sign(x, kern.prepare_weight(bits, k), kern.prepare_sign_bias(bias), k)
    assert s.dtype == FP8 and s.shape == (m, n)
    assert torch.equal(s.float(), reference.binary_linear_sign(x, bits, k, bias))


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
INTERPRETER_DIR = ROOT / ".venv" / "triton-interpreter"  # scripts/install.sh: triton==3.6.0 numpy==2.2.6
# the tests that launch a Triton kernel on the CPU in the interpreter: the XNOR GEMM, the sign pass on its own, and
# through the FP8 kernel's linear_sign (its exactness tests and the CUDA plan's runtime)
INTERPRETER_TESTS = ("xnor", "triton_kernel", "triton_gemm", "fp8_sign", "cuda_plan_fp8", "exact_on_cpu and fp8")
INTERPRETER_RUN = ["unit/test_kernels.py", "unit/test_cuda_paths.py", "-m", "not gpu",
                   "-k", f"({' or '.join(f'({t})' for t in INTERPRETER_TESTS)}) and not on_cuda"]
INTERPRETER_MIN_PASSED = 45  # 51 when written; a selection that shrinks fails here


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
    assert counts.get("passed", 0) >= INTERPRETER_MIN_PASSED, tail


# ---------------------------------------------------------------------------------------------------
# no `datasets` (the GPU image has none)
# ---------------------------------------------------------------------------------------------------
def test_imports_and_collection_without_datasets() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["datasets"] = None  # `import datasets` now raises ImportError, as on the GPU image
        import sensimix, sensimix.vv, sensimix.train, sensimix.kernels, sensimix.inference
        from sensimix import data
        try:
            data._read_hub(data.task_spec("sst-2"), "dev")
        except ImportError as exc:
            assert "sensimix[hub]" in str(exc), exc
        else:
            raise AssertionError("the hub reader ran without datasets")
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                              "--kotca-device", "cpu", "acceptance", "unit"]))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "test_inference_time_ratio" in run.stdout and "test_cuda_paths.py" in run.stdout
    assert re.search(r"\d+ tests collected", run.stdout), run.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------
# the device check: naming, budget, files, preflight
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"), ("NVIDIA H200", "nvidia-h200"),
                                       (" Tesla V100-SXM2-16GB ", "tesla-v100-sxm2-16gb"),
                                       ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13-64-core-processor"),
                                       ("???", "unknown-device")])
def test_card_slug(monkeypatch, name: str, slug: str) -> None:
    monkeypatch.setattr(devices, "device_name", lambda device: name)
    assert devices.card_slug("cuda") == slug


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# full: within the 600 s a device command may run (timeout_s=590), with the start inside the 15 device minutes
@pytest.mark.parametrize("mode,budget_s", [("full", 560), ("short", 180)])
def test_gpu_check_fits_its_budget_and_the_tools_limits(tmp_path, mode: str, budget_s: int) -> None:
    gc = gpu_check()
    cfg = gc.Config.from_env({"MODE": mode, "OUT": str(tmp_path)})
    steps = gc.plan_steps(cfg, "nvidia-h100-80gb-hbm3")
    assert [s.name for s in steps] == ["unit", "acceptance", "benchmark"]  # acceptance before the benchmark
    assert cfg.deadline <= budget_s
    # the worst case: every step runs to its limit (kill included); the deadline still holds and no step is
    # starved below its reserve
    elapsed = gc.step_limit(cfg, "preflight", 0, [s.name for s in steps])
    for i, step in enumerate(steps):
        limit = gc.step_limit(cfg, step.name, elapsed, [s.name for s in steps[i + 1:]])
        assert limit >= cfg.settings.reserve[step.name]
        elapsed += limit
    assert elapsed <= cfg.deadline
    files = gc.result_files(tmp_path, "nvidia-h100-80gb-hbm3")
    assert len(files) <= gc.MAX_FILES == 8
    for path in files.values():
        rel = path.relative_to(tmp_path)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert "nvidia-h100-80gb-hbm3" in str(rel)
    acceptance = next(s for s in steps if s.name == "acceptance").argv
    assert acceptance[acceptance.index("--kotca-device") + 1] == "cuda"
    if mode == "full":  # the certified count (the CUDA default) x 3 trials, with the accuracy criterion
        assert "--kotca-examples" not in acceptance and acceptance[acceptance.index("--kotca-trials") + 1] == "3"
        assert "not accuracy" not in acceptance
    else:
        assert acceptance[acceptance.index("--kotca-examples") + 1] == "8192"


def test_gpu_check_keeps_the_finished_benchmarks_of_an_interrupted_session() -> None:
    # the acceptance step loads gpu_check as a pytest plugin: at SIGINT a benchmark with no finished round would
    # make pytest-benchmark fail writing the JSON (and lose the KOTCA report); it is dropped, the others are kept
    gc = gpu_check()

    class Bench:
        def __init__(self, name: str, rounds: int) -> None:
            self.name, self.rounds = name, rounds

        def __bool__(self) -> bool:
            return self.rounds > 0

    done, cut = Bench("test_bert_fp32_inference", 1), Bench("test_sensimix_inference", 0)
    bs = SimpleNamespace(benchmarks=[done, cut])
    hook = gc.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace(_benchmarksession=bs)), 2)
    next(hook)  # the part before pytest-benchmark's own sessionfinish
    assert bs.benchmarks == [done]
    acceptance = next(s for s in gc.plan_steps(gc.Config.from_env({}), "card") if s.name == "acceptance").argv
    assert acceptance[acceptance.index("gpu_check") - 1] == "-p"


def test_preflight_names_what_is_missing_and_stops_in_seconds(tmp_path) -> None:
    env = dict(os.environ, DEVICE="cuda", GPU_DIR=str(tmp_path / "no-carry"), OUT=str(tmp_path / "out"),
               PY=sys.executable)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    seconds = time.monotonic() - t0
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    missing = [ln for ln in out.splitlines() if ln.startswith("MISSING: ")]
    assert sum("no-carry" in ln for ln in missing) == 6  # one line per carried file
    if not CUDA:
        assert any(ln.startswith("MISSING: CUDA") for ln in missing)
    assert "nothing was run" in out and "=== unit" not in out
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 2 and left[0].startswith("gpu-check-") and left[1].startswith("summary-")
    assert seconds < 60, f"the preflight took {seconds:.0f} s"


# ---------------------------------------------------------------------------------------------------
# on a GPU (pytest unit -m gpu; skipped elsewhere)
# ---------------------------------------------------------------------------------------------------
def needs_cuda_kernel(name: str) -> None:
    reason = kernels.BINARY_KERNELS[name].unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", ["fp8", "int8", "float", "xnor"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_binary_kernels_exact_on_gpu(name: str, m: int, k: int, n: int) -> None:
    needs_cuda_kernel(name)
    check_binary_kernel(name, torch.device("cuda"), m, k, n)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("out", list(OUT_DTYPES))
@pytest.mark.parametrize("m,k,n", CUDA_TABLE_SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp8_linear_on_gpu_is_the_reference_rounded_once(m: int, k: int, n: int, out: str, bias: bool) -> None:
    # on the GPU the fp16 bias rides in cuBLASLt's epilogue: it must round once, as oneDNN does on the CPU
    needs_cuda_kernel("fp8")
    equal, total = fp8_exactness("cuda", m, k, n, OUT_DTYPES[out], bias)
    assert equal == total, f"{total - equal} of {total} outputs differ from the reference rounded once"


@pytest.mark.parametrize("m,k,n", [(256, 3072, 768), (64, 3072, 40), (33, 200, 50)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fp8_sign_on_gpu_is_exact(m: int, k: int, n: int) -> None:
    needs_cuda_kernel("fp8")
    kern = kernels.binary_kernel("fp8", "cuda")
    x, bits, bias = problem(m, k, n)
    s = kern.linear_sign(x.cuda(), kern.prepare_weight(bits.cuda(), k), kern.prepare_sign_bias(bias.cuda()), k)
    assert s.dtype == FP8 and torch.equal(s.float().cpu(), reference.binary_linear_sign(x, bits, k, bias))


@pytest.mark.parametrize("src,out", [("fp16", "fp8"), ("fp16", "fp16"), ("fp16", "bf16"), ("fp32", "fp8")])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sign_operand_triton_kernel_on_gpu(spies, src: str, out: str) -> None:
    if spies.triton_sign is None:
        pytest.skip("triton is not installed")
    check_triton_sign("cuda", SIGN_IN[src], SIGN_OUT[out], spies.triton_sign)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_runtime_on_gpu_matches_qat(qat_model, spies, tmp_path) -> None:
    # the device's default plan (what VVRun times) vs the QAT model and the exact path, and the staged packing
    qat, inputs = qat_model
    model = convert(qat, "cuda")
    fp8 = kernels.BINARY_KERNELS["fp8"].unavailable(torch.device("cuda")) is None
    assert plan_fields(model.plan)[:2] == ("fp32", torch.float32)  # fast = exact on CUDA too
    assert model.plan.binary_kernel == ("fp8" if fp8 else kernels.default_binary_kernel("cuda"))
    assert model.plan.fuse_qkv and model.plan.skip_padding
    spies.scaled_mm.calls.clear()
    got = logits_of(model, inputs, "cuda")
    gemms = len(spies.scaled_mm.calls)
    triton_signs = spies.triton_sign.count if spies.triton_sign is not None else None
    want = logits_of(qat, inputs)
    exact_cpu = logits_of(convert(qat, "cpu", "fp32"), inputs)
    exact_gpu = logits_of(convert(qat, "cuda", "fp32"), inputs, "cuda")
    assert (got - want).abs().max().item() <= 1e-4
    assert (exact_gpu - want).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), exact_cpu.argmax(-1)) and torch.equal(exact_gpu.argmax(-1), want.argmax(-1))
    if fp8:
        assert gemms == 2 * len(qat.config.mixed_layers)
        if triton_signs is not None:
            assert triton_signs == triton_sign_launches(qat), "the compiled Triton sign pass ran"
    folder = export_checkpoint(qat, tmp_path / "sensimix")
    loaded = Packed.from_pretrained(folder, device="cuda")
    staged = make_batches(inputs, batch_size=5, device="cuda", packing=True)
    result = run_inference(loaded, staged, warmup_batches=1, device="cuda")
    assert torch.equal(result.predictions, exact_cpu.argmax(-1))
