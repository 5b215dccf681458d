"""Kernels vs the pure-torch reference: exact ±1 products, 8-bit linears, dispatch, optional backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import problem

from sensimix import kernels
from sensimix.kernels import reference
from sensimix.kernels.torch_ops import int_mm, pad_for_int_mm
from sensimix.kernels.triton_kernels import triton_available
from sensimix.quant import index8_quantize, pack_signs

CUDA = torch.cuda.is_available()


def needs_cuda(test):
    """Marked ``gpu`` too: the GPU check runs ``pytest unit -m gpu``, and these are the kernels' CUDA tests."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))

# (M, K, N): odd K (not a multiple of 8 or 32), odd M/N, M <= 16 (cuBLASLt int8 wants M > 16), BERT-like K
SHAPES = [(1, 7, 3), (5, 100, 96), (17, 64, 17), (33, 200, 50), (16, 768, 40), (70, 3072, 24)]


def cpu_binary_kernels() -> list[str]:
    return [name for name, k in kernels.BINARY_KERNELS.items() if k.unavailable(torch.device("cpu")) is None]


def test_reference_binary_matmul_counts_agreements() -> None:
    x = torch.tensor([[0.5, -1.0, 0.0, 2.0, -0.0]])  # signs: + - - + -
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-3.0, -1.0, -2.0, 0.1, -0.2]])
    got = reference.binary_matmul(x, pack_signs(w), 5)
    assert got.dtype == torch.int64
    assert got.tolist() == [[-1, 3]]  # 2 agree - 3 disagree; 4 agree - 1 disagree


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_xnor_popcount_identity(m: int, k: int, n: int) -> None:
    x, bits, _ = problem(m, k, n)
    assert torch.equal(reference.xnor_popcount_matmul(pack_signs(x), bits, k), reference.binary_matmul(x, bits, k))


@pytest.mark.parametrize("name", cpu_binary_kernels())
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_binary_kernel_exact_on_cpu(name: str, m: int, k: int, n: int) -> None:
    check_binary_kernel(name, torch.device("cpu"), m, k, n)


@needs_cuda
@pytest.mark.parametrize("name", ["fp8", "int8", "float", "xnor"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_binary_kernel_exact_on_cuda(name: str, m: int, k: int, n: int) -> None:
    reason = kernels.BINARY_KERNELS[name].unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    check_binary_kernel(name, torch.device("cuda"), m, k, n)


def check_binary_kernel(name: str, device: torch.device, m: int, k: int, n: int) -> None:
    kern = kernels.binary_kernel(name, device)
    x, bits, bias = problem(m, k, n)
    want_int = reference.binary_matmul(x, bits, k)
    w = kern.prepare_weight(bits.to(device), k)
    xd, bd = x.to(device), bias.to(device)

    acc = kern.dot(kern.binarize(xd, k), w, k)
    assert torch.equal(acc.cpu().to(torch.int64), want_int), "±1 dot products must be exact integers"
    y = kern.linear(xd, w, bd, k, torch.float32)
    assert torch.equal(y.cpu(), reference.binary_linear(x, bits, k, bias)), "integer + fp32 bias, rounded once"
    s = kern.linear_sign(xd, w, kern.prepare_sign_bias(bd), k)
    assert s.dtype == kern.operand_dtype and s.shape[0] == m
    # the ±1 operand feeds the next 1-bit linear directly (the FFN output); check it against the reference chain
    bits2 = pack_signs(torch.randn(11, n, generator=torch.Generator().manual_seed(1)))
    w2 = kern.prepare_weight(bits2.to(device), n)
    chained = kern.linear(s, w2, None, n, torch.float32)
    want_sign = reference.binary_linear_sign(x, bits, k, bias)
    assert torch.equal(chained.cpu(), reference.binary_linear(want_sign, bits2, n))
    # 3-D activations keep their leading dims
    y3 = kern.linear(xd.view(1, m, k), w, bd, k, torch.float32)
    assert y3.shape == (1, m, n)


@pytest.mark.parametrize("name", cpu_binary_kernels())
def test_binary_linear_fp16_output_is_rounded_reference(name: str) -> None:
    kern = kernels.binary_kernel(name, "cpu")
    x, bits, bias = problem(9, 100, 40)
    y = kern.linear(x, kern.prepare_weight(bits, 100), bias, 100, torch.float16)
    assert y.dtype == torch.float16
    assert torch.equal(y, reference.binary_linear(x, bits, 100, bias).to(torch.float16))


def test_int8_padding_for_cuda_shape_rules() -> None:
    # cuBLASLt int8 wants K, N multiples of 8 and M > 16: zero padding must not change the [M, N] result
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (3, 13), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (9, 13), generator=g, dtype=torch.int8).t()  # column-major [K, N]
    ap, bp = pad_for_int_mm(a, b)
    assert ap.shape == (17, 16) and bp.shape == (16, 16)
    assert bp.stride(0) == 1, "B stays column-major"
    want = a.long() @ b.long()
    assert torch.equal(torch._int_mm(ap, bp)[:3, :9].long(), want)
    assert torch.equal(int_mm(a, b).long(), want)


@pytest.mark.skipif(not (triton_available(torch.device("cpu")) and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernel runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("m,k,n", SHAPES[:4])
def test_xnor_triton_kernel_in_interpreter(m: int, k: int, n: int) -> None:
    check_binary_kernel("xnor", torch.device("cpu"), m, k, n)


# ---------------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------------
def index8_problem(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    q, lo, hi = index8_quantize(torch.randn(n, k, generator=g) * 0.05 + 0.01)
    weight_range = torch.stack([lo, hi]).to(torch.float16)
    bias = torch.randn(n, generator=g).to(torch.float16).float()
    return x, q, weight_range, bias


@pytest.mark.parametrize("name", ["dense", "dequant"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_exact_index8_kernels_equal_reference(name: str, m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel(name, "cpu")
    assert kern.exact
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    assert torch.equal(kern.linear(x, p), reference.index8_linear(x, q, weight_range, bias))


def test_dequant_kernel_is_exact_across_inference_mode_grad_and_threads() -> None:
    """The per-call kernel reuses a scratch buffer: a buffer made under inference_mode must not be written
    outside it, two threads must not share one, and a weight autograd saved must not be overwritten."""
    kern = kernels.index8_kernel("dequant", "cpu")
    problems = [index8_problem(m, k, n) for m, k, n in ((9, 64, 48), (3, 48, 64))]
    prepared = [kern.prepare([(q, r, b)], torch.float32) for _, q, r, b in problems]
    want = [reference.index8_linear(x, q, r, b) for x, q, r, b in problems]
    with torch.inference_mode():
        assert torch.equal(kern.linear(problems[0][0], prepared[0]), want[0])
    with torch.no_grad():
        assert torch.equal(kern.linear(problems[0][0], prepared[0]), want[0])
    x = problems[0][0].clone().requires_grad_()
    out = kern.linear(x, prepared[0])
    kern.linear(problems[1][0], prepared[1])  # a later call must not change the weight saved for backward
    out.sum().backward()
    w_hat = reference.index8_linear(torch.eye(64), *problems[0][1:3], None)  # rows = columns of W^T
    assert torch.allclose(x.grad, torch.ones(9, 48) @ w_hat.T, atol=1e-5)

    def work(i: int) -> bool:
        with torch.inference_mode():
            return all(torch.equal(kern.linear(problems[i % 2][0], prepared[i % 2]), want[i % 2]) for _ in range(50))
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dynamic_int8_index8_is_close_and_flagged_approximate(m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel("int8", "cpu")
    assert not kern.exact
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    got, want = kern.linear(x, p), reference.index8_linear(x, q, weight_range, bias)
    scale = (x.abs().amax(dim=1, keepdim=True) * weight_range.float().abs().max() * k ** 0.5)
    assert ((got - want).abs() / scale).max() < 0.02  # 8-bit activations: ~1% of the output scale
    assert not torch.equal(got, want)


def _fp32_grade(got: torch.Tensor, x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor,
                bias: torch.Tensor) -> float:
    """The largest error against an fp64 GEMM of the QAT model's W_hat, relative to sum |x| |W_hat| per output."""
    w = reference.index8_linear(torch.eye(q.shape[1]), q, weight_range, None).double()  # [K, N] = W_hat^T
    want = x.double() @ w + bias.double()
    return float(((got.double() - want).abs() / (x.abs().double() @ w.abs()).clamp_min(1e-300)).max())


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16x3_index8_is_fp32_grade_and_flagged_approximate(m: int, k: int, n: int) -> None:
    # the CPU twin of the CUDA kernel: the same bf16 operands, an fp32 GEMM of them
    x, q, weight_range, bias = index8_problem(m, k, n)
    x = x * 100  # the exact three-way split does not depend on the scale
    kern = kernels.index8_kernel("bf16x3", "cpu")
    assert not kern.exact and not kern.fast_on(torch.device("cpu"))
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    got = kern.linear(x, p)
    exact = reference.index8_linear(x, q, weight_range, bias)
    assert _fp32_grade(got, x, q, weight_range, bias) < 1e-6
    assert _fp32_grade(exact, x, q, weight_range, bias) < 1e-6  # the bar is what the exact GEMM itself meets
    # fused: two linears with their own ranges in one GEMM give each one's outputs
    x2, q2, r2, b2 = index8_problem(m, k, n + 3, seed=1)
    fused = kern.prepare([(q, weight_range, bias), (q2, r2, b2)], torch.float32)
    both = kern.linear(x, fused)
    assert torch.allclose(both[:, :n], got, rtol=0, atol=1e-6 * float(got.abs().max()) + 1e-30)
    assert _fp32_grade(both[:, n:], x, q2, r2, b2) < 1e-6
    assert torch.isnan(kern.linear(torch.full((1, k), float("nan")), p)).all()


@needs_cuda
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16x3_index8_on_cuda_is_fp32_grade(m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel("bf16x3", "cuda")
    p = kern.prepare([(q.cuda(), weight_range.cuda(), bias.cuda())], torch.float32)
    got = kern.linear(x.cuda(), p).cpu()
    assert _fp32_grade(got, x, q, weight_range, bias) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_index8_in_half_precision(dtype: torch.dtype) -> None:
    x, q, weight_range, bias = index8_problem(8, 100, 30)
    for name in ("dense", "dequant"):
        kern = kernels.index8_kernel(name, "cpu")
        p = kern.prepare([(q, weight_range, bias)], dtype)
        got = kern.linear(x.to(dtype), p)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), reference.index8_linear(x, q, weight_range, bias), rtol=0.02, atol=0.02)


@needs_cuda
@pytest.mark.parametrize("name", ["dense", "dequant", "int8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_index8_kernels_on_cuda(name: str, m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel(name, "cuda")
    p = kern.prepare([(q.cuda(), weight_range.cuda(), bias.cuda())], torch.float16)
    got = kern.linear(x.cuda().half(), p).float().cpu()
    torch.testing.assert_close(got, reference.index8_linear(x, q, weight_range, bias), rtol=0.03, atol=0.05)


def test_index8_embedding_gathers_then_dequantizes_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    q, lo, hi = index8_quantize(torch.randn(50, 12, generator=g))
    weight_range = torch.stack([lo, hi]).to(torch.float16)
    ids = torch.tensor([[0, 49, 3], [7, 7, 0]])
    got = kernels.index8_embedding(ids, q, weight_range, torch.float32)
    assert torch.equal(got, reference.index8_embedding(ids, q, weight_range))


def test_index8_constant_tensor() -> None:
    # hi == lo: every index is -128 and the weight is the constant lo
    q, lo, hi = index8_quantize(torch.full((4, 6), 0.25))
    kern = kernels.index8_kernel("dequant", "cpu")
    p = kern.prepare([(q, torch.stack([lo, hi]).to(torch.float16), None)], torch.float32)
    assert torch.equal(kern.linear(torch.ones(2, 6), p), torch.full((2, 4), 1.5))


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------
def test_cpu_defaults_are_exact_fast_paths(monkeypatch) -> None:
    from sensimix.kernels import torch_ops

    assert kernels.default_index8_kernel("cpu") == "dequant" and kernels.index8_kernel("auto", "cpu").exact
    # torch._int_mm is a real int8 GEMM only with VNNI/AMX; elsewhere it is a slow loop and fp32 +-1 wins
    monkeypatch.setattr(torch_ops, "cpu_has_vnni", lambda: True)
    assert kernels.default_binary_kernel("cpu") == "int8" and kernels.binary_kernel(None, "cpu").name == "int8"
    from sensimix import devices

    monkeypatch.setattr(torch_ops, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_vnni", lambda: False)
    popcount_ok = kernels.BINARY_KERNELS["popcount"].unavailable(torch.device("cpu")) is None
    fbgemm_ok = kernels.quantized_engine().engine is not None
    assert kernels.default_binary_kernel("cpu") == ("popcount" if popcount_ok else "fbgemm" if fbgemm_ok else "float")
    if "avx2" in devices.cpu_features() and (shutil.which("cc") or shutil.which("gcc")):
        assert popcount_ok, "an AVX2 CPU with a C compiler must run the popcount kernel"
    assert all(k.exact for k in kernels.BINARY_KERNELS.values())


@pytest.mark.parametrize("runs,expected", [({"a8-vnni", "a8-avx2"}, "a8-vnni"), ({"a8-avx2"}, "a8-avx2"),
                                           (set(), "a8-torch")], ids=["vnni-cpu", "avx2-only-cpu", "neither"])
def test_the_a8_default_is_the_fastest_exact_kernel_the_device_runs(monkeypatch, runs, expected) -> None:
    """The preference docs/benchmark.md states, on each kind of machine simulated here (the other tests compare
    with default_index8_kernel itself, so a swapped preference would pass them)."""
    from sensimix.kernels import a8native

    monkeypatch.setattr(a8native, "unavailable_reason", lambda name: None if name in runs else f"no {name} here")
    assert kernels.default_index8_kernel("cpu", "a8") == expected
    assert kernels.index8_kernel(None, "cpu", "a8").name == expected
    triton = type(kernels.INDEX8_KERNELS["a8-triton"])
    monkeypatch.setattr(triton, "unavailable", lambda self, d: None if torch.device(d).type == "cuda" else "CUDA only")
    monkeypatch.setattr(triton, "fast_on", lambda self, d: torch.device(d).type == "cuda")
    assert kernels.default_index8_kernel("cuda", "a8") == "a8-triton"
    assert kernels.default_index8_kernel("cpu", "a8") == expected


def test_unknown_kernel_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown binary kernel 'popcnt'.*fp8, int8"):
        kernels.binary_kernel("popcnt", "cpu")
    with pytest.raises(ValueError, match="unknown index8 kernel 'fp4'.*dense"):
        kernels.index8_kernel("fp4", "cpu")


@pytest.mark.skipif(triton_available(torch.device("cpu")), reason="triton's interpreter is on")
def test_unavailable_kernel_says_why() -> None:
    with pytest.raises(ValueError, match="binary kernel 'xnor' cannot run on cpu: .*triton"):
        kernels.binary_kernel("xnor", "cpu")


def test_package_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, sensimix.kernels as k, sensimix.inference\n"
            "print(k.BINARY_KERNELS['xnor'].unavailable(torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs triton" in out.stdout


# ---------------------------------------------------------------------------------------------------
# the fast CPU 8-bit kernels: fbgemm dynamic int8, bf16
# ---------------------------------------------------------------------------------------------------
FBGEMM_REASON = kernels.INDEX8_KERNELS["fbgemm"].unavailable(torch.device("cpu"))
needs_fbgemm = pytest.mark.skipif(FBGEMM_REASON is not None, reason=f"fbgemm kernel unavailable: {FBGEMM_REASON}")


def activation_step(x: torch.Tensor) -> float:
    """fbgemm's activation quantization step: per tensor, asymmetric, range widened to include 0."""
    levels = 127 if kernels.quantized_engine().reduce_range else 255
    return float(x.max().clamp_min(0) - x.min().clamp_max(0)) / levels


def fbgemm_bound(x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor) -> torch.Tensor:
    """Worst-case error of x W_hat^T when only x is rounded to fbgemm's grid: each x_k moves by at most step/2,
    and W_hat = s*Q + c where c * rowsum(x) uses the unrounded x, so |err_n| <= step/2 * s * sum_k |Q_nk|.
    Plus 1e-5 of the |x|.|W_hat| scale for the fp32 arithmetic (rowsum, requantization, bias)."""
    lo, hi = weight_range.float()
    s = float((hi - lo) / 255)
    w = reference.index8_linear(torch.eye(q.shape[1]), q, weight_range).t()  # W_hat [N, K]
    fp32 = 1e-5 * (x.abs() @ w.abs().t())
    return activation_step(x) / 2 * s * q.float().abs().sum(dim=1) * 1.001 + fp32 + 1e-6


@needs_fbgemm
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fbgemm_index8_within_activation_rounding_bound(m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel("fbgemm", "cpu")
    assert not kern.exact
    want = reference.index8_linear(x, q, weight_range, bias)
    for p in (kern.prepare([(q, weight_range, bias)], torch.float32),):  # the bias in fbgemm's epilogue
        assert p.bias is None
        got = kern.linear(x, p)
        params = p.params
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert ((got - want).abs() <= fbgemm_bound(x, q, weight_range)).all()
    if m * n >= 400:
        # typical error: rounding errors uniform in +-step/2 (std step/sqrt(12)) times s * |Q_n|_2; its RMS over
        # the outputs stays near 1 sigma. 7-bit activations (reduce_range where it is not needed) would be 2.
        s = float(params[0])
        sigma = activation_step(x) / 12 ** 0.5 * s * q.float().norm(dim=1)
        assert ((got - want) / sigma).pow(2).mean().sqrt() < 1.5


@needs_fbgemm
def test_fbgemm_adds_the_weight_offset_term() -> None:
    # W_hat = s*Q + c with c = 128*s + lo: a weight tensor centred away from 0 has a large c, and the kernel is
    # right only with the c * rowsum(x) term (dropping it breaks the bound by far)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 96, generator=g) + 0.5
    q, lo, hi = index8_quantize(torch.randn(24, 96, generator=g) * 0.05 + 0.3)
    weight_range = torch.stack([lo, hi]).to(torch.float16)
    kern = kernels.index8_kernel("fbgemm", "cpu")
    p = kern.prepare([(q, weight_range, None)], torch.float32)
    s, c = (float(v) for v in p.params)
    assert c > 0.2
    got, want = kern.linear(x, p), reference.index8_linear(x, q, weight_range)
    bound = fbgemm_bound(x, q, weight_range)
    assert ((got - want).abs() <= bound).all()
    assert ((got - c * x.sum(dim=1, keepdim=True) - want).abs() > 10 * bound).all()


@needs_fbgemm
def test_fbgemm_rounds_only_the_activations() -> None:
    # activations already on fbgemm's grid (integers 0..255 times a step, with 0 in range) are not rounded: the
    # only error left is fp32 arithmetic
    g = torch.Generator().manual_seed(3)
    levels = 127 if kernels.quantized_engine().reduce_range else 255
    x = torch.randint(0, levels + 1, (9, 40), generator=g).float() * 0.01
    x[0, 0], x[0, 1] = 0.0, levels * 0.01
    q, lo, hi = index8_quantize(torch.randn(7, 40, generator=g))
    weight_range = torch.stack([lo, hi]).to(torch.float16)
    kern = kernels.index8_kernel("fbgemm", "cpu")
    p = kern.prepare([(q, weight_range, None)], torch.float32)
    want = reference.index8_linear(x, q, weight_range)
    torch.testing.assert_close(kern.linear(x, p), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["fbgemm", "bf16", "dense", "dequant"])
def test_fused_index8_equals_its_parts(name: str) -> None:
    # Q, K, V fused into one GEMM: each part keeps its own range (per-row scales for fbgemm)
    kern = kernels.INDEX8_KERNELS[name]
    if kern.unavailable(torch.device("cpu")):
        pytest.skip(kern.unavailable(torch.device("cpu")))
    assert kern.fusable
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 48, generator=g)
    parts = []
    for n, spread, offset in ((20, 0.05, 0.02), (12, 0.5, -0.3), (9, 0.01, 0.0)):
        q, lo, hi = index8_quantize(torch.randn(n, 48, generator=g) * spread + offset)
        parts.append((q, torch.stack([lo, hi]).to(torch.float16), torch.randn(n, generator=g).half().float()))
    got = kern.linear(x, kern.prepare(parts, torch.float32)).float()
    assert got.shape == (13, 41)
    want = torch.cat([reference.index8_linear(x, q, r, bias) for q, r, bias in parts], dim=1)
    if name == "fbgemm":
        bound = torch.cat([fbgemm_bound(x, q, r) for q, r, _ in parts], dim=1)
    elif name == "bf16":
        bound = torch.cat([bf16_bound(x, q, r, bias, y) for (q, r, bias), y in
                           zip(parts, want.split([20, 12, 9], dim=1))], dim=1)
    else:  # exact kernels: the same dequantized weights, one fp32 GEMM
        bound = 1e-5 * want.abs() + 1e-5
    assert ((got - want).abs() <= bound).all()


def test_unfusable_kernels_say_so() -> None:
    x, q, weight_range, bias = index8_problem(3, 8, 4)
    for name in ("int8", "reference"):
        assert not kernels.INDEX8_KERNELS[name].fusable
        with pytest.raises(ValueError, match=f"'{name}' cannot fuse"):
            kernels.INDEX8_KERNELS[name].prepare([(q, weight_range, bias)] * 2, torch.float32)


def bf16_bound(x: torch.Tensor, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor | None,
               want: torch.Tensor) -> torch.Tensor:
    """bf16 keeps 8 significant bits, so one rounding moves a value by <= 2^-8 of it (2^-9 is the average, which
    small K reached 1.9x of: unit/test_kernel_shapes.py): x and W_hat move each product by <= 2 * 2^-8 of
    |x_k W_nk|, the bf16 bias by 2^-8 |b|, the bf16 output by 2^-8 |y|; accumulation is fp32 (1e-5 margin)."""
    w = reference.index8_linear(torch.eye(q.shape[1]), q, weight_range).t()
    products = x.abs() @ w.abs().t()
    b = 0 if bias is None else bias.abs()
    return 2 ** -7 * products * 1.01 + 2 ** -8 * (b + want.abs()) * 1.01 + 1e-5 * products + 1e-6


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_index8_within_rounding_bound(m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel("bf16", "cpu")
    assert not kern.exact and kern.out_dtype == torch.bfloat16
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    assert p.weight.dtype == torch.bfloat16 and p.bias.dtype == torch.bfloat16
    want = reference.index8_linear(x, q, weight_range, bias)
    got = kern.linear(x, p)
    assert got.dtype == torch.bfloat16, "stays bf16 for the next bf16 op"
    assert ((got.float() - want).abs() <= bf16_bound(x, q, weight_range, bias, want)).all()


@pytest.mark.parametrize("fused_epilogue", [True, False])
def test_bf16_linear_act_gelu(monkeypatch, fused_epilogue: bool) -> None:
    # GELU in oneDNN's GEMM epilogue, or F.linear + F.gelu where that op is missing: same bound either way
    # (GELU's slope is within [-0.17, 1.13], so it scales the linear's error by at most 1.13)
    from sensimix.kernels import onednn

    if not fused_epilogue:
        monkeypatch.setattr(onednn, "onednn_linear_ok", lambda: False)
    elif not onednn.onednn_linear_ok():
        pytest.skip("oneDNN linear_pointwise unavailable")
    x, q, weight_range, bias = index8_problem(33, 200, 50)
    kern = kernels.index8_kernel("bf16", "cpu")
    assert kern.fuses_activation("gelu", torch.device("cpu")) == fused_epilogue
    p = kern.prepare([(q, weight_range, bias)], torch.float32)
    lin = reference.index8_linear(x, q, weight_range, bias)
    want = torch.nn.functional.gelu(lin)
    got = kern.linear_act(x, p, "gelu").float()
    bound = 1.13 * bf16_bound(x, q, weight_range, bias, lin) + 2 ** -8 * want.abs() * 1.01
    assert ((got - want).abs() <= bound).all()
    plain = kern.linear(x, p).float()
    assert ((plain - lin).abs() <= bf16_bound(x, q, weight_range, bias, lin)).all()


def test_int8_binary_operand_is_the_sign_bit() -> None:
    # the int8 kernel's activation operand is b = (x > 0) in {0, 1}: sign(x) = 2b - 1, corrected in the kernel
    kern = kernels.binary_kernel("int8", "cpu")
    x, bits, bias = problem(6, 37, 11)
    xs = kern.binarize(x, 37)
    assert xs.dtype == torch.int8 and torch.equal(xs, (x > 0).to(torch.int8))
    h = kern.linear_sign(x, kern.prepare_weight(bits, 37), kern.prepare_sign_bias(bias), 37)
    assert torch.equal(h, (reference.binary_linear_sign(x, bits, 37, bias) > 0).to(torch.int8))


# ---------------------------------------------------------------------------------------------------
# torch's quantized engine: probed once, and its absence is a reason, not a crash
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_engine_probe():
    from sensimix.kernels import fbgemm

    fbgemm.quantized_engine.cache_clear()
    yield fbgemm
    fbgemm.quantized_engine.cache_clear()  # the next caller re-probes the real torch


@needs_fbgemm
def test_quantized_engine_probe_picks_an_unsaturated_range() -> None:
    from sensimix.kernels import fbgemm as cpu

    qe = kernels.quantized_engine()
    assert qe.engine in cpu.FBGEMM_ENGINES and qe.reason is None
    assert cpu._probe_error(qe.engine, qe.reduce_range) < 0.02
    # the probe is sensitive: activations rounded to 8 bits give errors ~1e-4 of |x|.|W|, clipped int16 pair
    # sums ~0.5; both settings must be far from the 0.02 threshold on this CPU
    assert min(cpu._probe_error(qe.engine, rr) for rr in (False, True)) < 0.002


def test_quantized_ops_missing_make_fbgemm_unavailable(monkeypatch, fresh_engine_probe) -> None:
    cpu = fresh_engine_probe
    monkeypatch.delattr(torch, "_make_per_tensor_quantized_tensor", raising=False)
    qe = cpu.quantized_engine()
    assert qe.engine is None and "no quantized" in qe.reason
    with pytest.raises(ValueError, match="index8 kernel 'fbgemm' cannot run on cpu: .*no quantized"):
        kernels.index8_kernel("fbgemm", "cpu")


def test_quantized_engine_failing_self_test_is_a_reason(monkeypatch, fresh_engine_probe) -> None:
    cpu = fresh_engine_probe
    if not any(e in torch.backends.quantized.supported_engines for e in cpu.FBGEMM_ENGINES):
        pytest.skip("no fbgemm engine in this torch build")

    def broken(*args, **kwargs):
        raise RuntimeError("quantized tensors were removed")

    monkeypatch.setattr(cpu, "_prepack", broken)
    qe = cpu.quantized_engine()
    assert qe.engine is None and "failed its self-test: RuntimeError: quantized tensors were removed" in qe.reason
    cpu.quantized_engine.cache_clear()
    monkeypatch.setattr(cpu, "_probe_error", lambda engine, reduce_range: 0.5)  # saturates either way
    qe = cpu.quantized_engine()
    assert qe.engine is None and "accuracy self-test" in qe.reason


def test_dispatch_lists_the_new_kernels() -> None:
    assert {"fbgemm", "bf16"} <= set(kernels.INDEX8_KERNELS)
    assert not kernels.INDEX8_KERNELS["fbgemm"].exact and not kernels.INDEX8_KERNELS["bf16"].exact
    if CUDA:
        assert "CPU only" in kernels.INDEX8_KERNELS["fbgemm"].unavailable(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------------
# the AVX2 XNOR-popcount kernel (C; the native build behind it: unit/test_native.py)
# ---------------------------------------------------------------------------------------------------
POPCOUNT_REASON = kernels.BINARY_KERNELS["popcount"].unavailable(torch.device("cpu"))
needs_popcount = pytest.mark.skipif(POPCOUNT_REASON is not None, reason=f"popcount kernel: {POPCOUNT_REASON}")


@needs_popcount
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k,n", [(1, 9000, 5), (4, 256, 8), (9, 8000, 17), (130, 257, 33), (0, 64, 3),
                                   (301, 40, 9)])
def test_popcount_kernel_row_splits_and_long_rows(threads: int, m: int, k: int, n: int) -> None:
    # blocks of up to 64 rows the threads take in turn (4 per micro-kernel, plus a zero-padded tail), and rows
    # longer than 31 vectors (7,936 bits), where the byte counters are folded before they can overflow
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_binary_kernel("popcount", torch.device("cpu"), m, k, n)
    finally:
        torch.set_num_threads(before)


@needs_popcount
def test_popcount_packing_is_the_checkpoint_bit_order() -> None:
    from sensimix.kernels.popcount import pack_rows, row_bytes

    x = torch.tensor([[1.0, -1.0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 2.0, 3.0, -4.0]])
    got = pack_rows(x, 11)
    assert got.shape == (1, row_bytes(11)) == (1, 32)
    want = pack_signs(x)  # bit = x > 0 (NaN, 0 and -0 are -1), 8 per byte, little-endian
    assert torch.equal(got[:, :2], want) and not got[:, 2:].any(), "padding bytes are zero"
    strided = torch.randn(6, 40)[:, ::2]  # non-contiguous rows are packed as their values
    assert torch.equal(pack_rows(strided, 20)[:, :3], pack_signs(strided))


@needs_popcount
def test_popcount_refuses_operands_of_another_layout() -> None:
    kern = kernels.BINARY_KERNELS["popcount"]
    w = kern.prepare_weight(pack_signs(torch.randn(4, 300)), 300)
    with pytest.raises(ValueError, match="packed sign bits with 64 bytes per row"):
        kern.dot(torch.zeros(2, 32, dtype=torch.uint8), w, 300)
    with pytest.raises(ValueError, match=r"expected activations \[M, 300\], got \[2, 600\]"):
        kern.linear(torch.randn(2, 600), w, None, 300, torch.float32)  # never reinterpreted as 4 rows of 300


@needs_popcount
def test_popcount_kernel_in_threads_is_exact() -> None:
    kern = kernels.BINARY_KERNELS["popcount"]
    x, bits, bias = problem(67, 768, 300)
    w = kern.prepare_weight(bits, 768)
    want = reference.binary_linear(x, bits, 768, bias)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: kern.linear(x, w, bias, 768, torch.float32), range(16)))
    assert all(torch.equal(r, want) for r in results)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_linear_act_in_place_is_the_activation_module(act: str) -> None:
    from transformers.activations import ACT2FN

    kern = kernels.index8_kernel("dequant", "cpu")
    g = torch.Generator().manual_seed(0)
    q, lo, hi = index8_quantize(torch.randn(24, 40, generator=g))
    p = kern.prepare([(q, torch.stack([lo, hi]).half(), torch.randn(24, generator=g))], torch.float32)
    x = torch.randn(7, 40, generator=g)
    assert torch.equal(kern.linear_act(x, p, act), ACT2FN[act](kern.linear(x, p)))
    xg = x.clone().requires_grad_(True)  # autograd keeps the pre-activation: never overwritten in place
    kern.linear_act(xg, p, act).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
