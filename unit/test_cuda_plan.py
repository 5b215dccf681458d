"""The plan a CUDA device gets, and its runtime proven on the CPU as far as torch allows (``gpu`` tests: on a GPU).

On the CPU, torch runs ``torch._scaled_mm`` through oneDNN (slowly) and Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1``). So the plan a CUDA device gets -- fp16 activations, dense fp16 8-bit weights, the FP8
1-bit kernel with its fused-bias epilogue and its Triton sign pass, Q/K/V fused, padding skipped with the
:class:`~sensimix.inference.Packing` staged beforehand -- runs here end to end, and only speed is left to the device:

* dispatch: the plan :func:`make_plan` gives a (pretend) sm_90 / sm_89 / sm_80 / sm_75 device, and its CPU twin;
* that plan's runtime vs the QAT model (fp16 tolerance) and vs the exact fp32 path (the same predictions);
* on a GPU (``pytest unit -m gpu``, scripts/gpu_check.py's first step): the device-default runtime vs the QAT model.

The FP8 kernel's exactness: test_fp8.py; the Triton kernels: test_triton.py; the device check: test_gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CPU, CUDA, INTERPRETER, LENGTHS, gpu, logits_of, needs_fp8_cpu

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import kernels
from sensimix.export import convert, export_checkpoint
from sensimix.inference import make_plan
from sensimix.kernels.cuda import FP8
from sensimix.measure import make_batches, run_inference
from sensimix.vv.procedure import sensimix_precision

PLAN_FIELDS = ("precision", "dtype", "binary_kernel", "index8_kernel", "fuse_qkv", "skip_padding")


def plan_fields(plan) -> tuple:
    return tuple(getattr(plan, f) for f in PLAN_FIELDS)


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
# on a GPU (pytest unit -m gpu; skipped elsewhere)
# ---------------------------------------------------------------------------------------------------
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
