"""Kernels vs the pure-torch reference: exact ±1 products, 8-bit linears, dispatch, optional backends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sensimix import kernels
from sensimix.kernels import reference
from sensimix.kernels.cpu import int_mm, pad_for_int_mm
from sensimix.kernels.triton_kernels import triton_available
from sensimix.quant import index8_quantize, pack_signs, sign, unpack_signs

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (M, K, N): odd K (not a multiple of 8 or 32), odd M/N, M <= 16 (cuBLASLt int8 wants M > 16), BERT-like K
SHAPES = [(1, 7, 3), (5, 100, 96), (17, 64, 17), (33, 200, 50), (16, 768, 40), (70, 3072, 24)]


def cpu_binary_kernels() -> list[str]:
    return [name for name, k in kernels.BINARY_KERNELS.items() if k.unavailable(torch.device("cpu")) is None]


def problem(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations with exact zeros (sign(0) = -1), packed weights, and biases that hit acc + b == 0 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, ::5] = 0.0
    bits = pack_signs(torch.randn(n, k, generator=g))
    # integers and half-integers in [-6, 6] make ties (acc + b == 0 -> sign -1) common; fp16-representable
    bias = (torch.randint(-12, 13, (n,), generator=g) / 2).to(torch.float32)
    return x, bits, bias


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
    w, params = kern.prepare(q, weight_range, torch.float32)
    assert torch.equal(kern.linear(x, w, params, bias), reference.index8_linear(x, q, weight_range, bias))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_dynamic_int8_index8_is_close_and_flagged_approximate(m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel("int8", "cpu")
    assert not kern.exact
    w, params = kern.prepare(q, weight_range, torch.float32)
    got, want = kern.linear(x, w, params, bias), reference.index8_linear(x, q, weight_range, bias)
    scale = (x.abs().amax(dim=1, keepdim=True) * weight_range.float().abs().max() * k ** 0.5)
    assert ((got - want).abs() / scale).max() < 0.02  # 8-bit activations: ~1% of the output scale
    assert not torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_index8_in_half_precision(dtype: torch.dtype) -> None:
    x, q, weight_range, bias = index8_problem(8, 100, 30)
    for name in ("dense", "dequant"):
        kern = kernels.index8_kernel(name, "cpu")
        w, params = kern.prepare(q, weight_range, dtype)
        got = kern.linear(x.to(dtype), w, params, bias.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), reference.index8_linear(x, q, weight_range, bias), rtol=0.02, atol=0.02)


@needs_cuda
@pytest.mark.parametrize("name", ["dense", "dequant", "int8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_index8_kernels_on_cuda(name: str, m: int, k: int, n: int) -> None:
    x, q, weight_range, bias = index8_problem(m, k, n)
    kern = kernels.index8_kernel(name, "cuda")
    w, params = kern.prepare(q.cuda(), weight_range.cuda(), torch.float16)
    got = kern.linear(x.cuda().half(), w, params, bias.cuda().half()).float().cpu()
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
    w, params = kern.prepare(q, torch.stack([lo, hi]).to(torch.float16), torch.float32)
    assert torch.equal(kern.linear(torch.ones(2, 6), w, params, None), torch.full((2, 4), 1.5))


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------
def test_cpu_defaults_are_exact_fast_paths() -> None:
    assert kernels.default_binary_kernel("cpu") == "int8"
    assert kernels.default_index8_kernel("cpu") == "dense"
    assert kernels.binary_kernel(None, "cpu").name == "int8"
    assert kernels.index8_kernel("auto", "cpu").exact


def test_unknown_kernel_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown binary kernel 'popcnt'.*int8, fp8"):
        kernels.binary_kernel("popcnt", "cpu")
    with pytest.raises(ValueError, match="unknown index8 kernel 'fp4'.*dense"):
        kernels.index8_kernel("fp4", "cpu")


@pytest.mark.skipif(triton_available(torch.device("cpu")), reason="triton's interpreter is on")
def test_unavailable_kernel_says_why() -> None:
    with pytest.raises(ValueError, match="binary kernel 'xnor' cannot run on cpu: .*triton"):
        kernels.binary_kernel("xnor", "cpu")


def test_package_imports_without_triton() -> None:
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, sensimix.kernels as k, sensimix.runtime\n"
            "print(k.BINARY_KERNELS['xnor'].unavailable(torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs triton" in out.stdout


def test_sign_of_unpacked_weights_roundtrip() -> None:
    w = torch.randn(5, 13)
    assert torch.equal(unpack_signs(pack_signs(w), 13), sign(w))
