"""The C A8 kernels (csrc/a8gemm.c, a8attn.c) against sensimix/a8.py, bit for bit: both builds by name (a8-vnni where
this CPU has AVX512-VNNI, a8-avx2 on every AVX2 CPU), odd shapes, special rows, 1 to 3 threads."""

from __future__ import annotations

import math

import pytest
import torch

from sensimix import a8, kernels
from sensimix.kernels import a8native
from sensimix.quant import index8_quantize

BUILDS = [pytest.param(n, marks=pytest.mark.skipif(a8native.unavailable_reason(n) is not None,
                                                   reason=f"{n}: {a8native.unavailable_reason(n)}"))
          for n in a8native.BUILDS]
needs_attention = pytest.mark.skipif(a8native.attention_unavailable() is not None,
                                     reason=f"{a8native.attention_unavailable()}")
TORCH = kernels.INDEX8_KERNELS["a8-torch"]
# (M, K, N): 1 from below, sizes off every vector width (4, 8, 16, 64), the model's own, one past a block of 96 rows
SHAPES = [(1, 1, 1), (2, 3, 5), (5, 13, 17), (6, 64, 64), (7, 65, 63), (13, 100, 129), (97, 384, 1536),
          (64, 768, 2304), (200, 1536, 384), (3, 3072, 7)]


def problem(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    if m > 2:
        x[1] = 0.0                      # the zero row
        x[2, :: max(1, k // 3)] = 0.0   # exact zeros
    w = torch.randn(n, k, generator=g) * 0.05
    q, lo, hi = index8_quantize(w)
    part = (q, torch.stack([lo, hi]).half(), torch.randn(n, generator=g).half())
    return x, part


def operand_fields(op: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    kp = -(-k // 4) * 4
    tail = op[:, kp:kp + 12].contiguous()
    return op[:, :k], tail[:, :4].view(torch.int32)[:, 0], tail[:, 4:8].view(torch.float32)[:, 0], \
        tail[:, 8:12].view(torch.int32)[:, 0]


@pytest.mark.parametrize("build", BUILDS)
def test_rows_are_rounded_as_the_definition_rounds_them(build):
    kern = kernels.INDEX8_KERNELS[build]
    for k in (1, 3, 8, 15, 16, 17, 100, 768):
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(k)) * 5
        x[0] = 0.0
        x[1, 0] = math.nan
        x[2, -1] = -math.inf
        x[3] = 2.0 ** -103  # the tiny row (d < 2^-100): zero
        x[4, 0] = 0.5 * 255 / 3  # a value on a rounding tie
        q, zero, scale, total = operand_fields(kern.quantize(x, k), k)
        want = a8.quantize_rows(x)
        assert torch.equal(q, want.q) and torch.equal(zero, want.zero) and torch.equal(total, want.total)
        torch.testing.assert_close(scale, want.scale, rtol=0, atol=0, equal_nan=True)  # NaN rows: NaN scale


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("threads", [1, 3])
def test_linear_add_norm_and_the_gelu_operand_are_the_definition_s_bits(build, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    kern = kernels.INDEX8_KERNELS[build]
    for i, (m, k, n) in enumerate(SHAPES):
        x, part = problem(m, k, n, seed=i)
        ours, ref = kern.prepare([part], torch.float32), TORCH.prepare([part], torch.float32)
        with torch.inference_mode():
            assert torch.equal(kern.linear(x, ours), TORCH.linear(x, ref)), (m, k, n)
            res = torch.randn(m, n, generator=torch.Generator().manual_seed(i))
            w, b = torch.randn(n).half().float(), torch.randn(n).half().float()
            assert torch.equal(kern.linear_add_norm(x, ours, res, w, b, 1e-12),
                               TORCH.linear_add_norm(x, ref, res, w, b, 1e-12)), (m, k, n)
            op = kern.linear_act_operand(x, ours, "gelu")
            want = a8.quantize_rows(a8.gelu(TORCH.linear(x, ref)))
            q, zero, scale, total = operand_fields(op.reshape(-1, op.shape[-1]), n)
            assert torch.equal(q, want.q) and torch.equal(zero, want.zero) and torch.equal(total, want.total)
            # and the next linear reads that operand as it reads the GELU's fp32 rows
            x2, part2 = problem(m, n, 11, seed=i + 50)
            nxt, nxt_ref = kern.prepare([part2], torch.float32), TORCH.prepare([part2], torch.float32)
            assert torch.equal(kern.linear(op, nxt), TORCH.linear(a8.gelu(TORCH.linear(x, ref)), nxt_ref))


@pytest.mark.parametrize("build", BUILDS)
def test_fused_q_k_v_keep_each_part_s_range(build):
    kern = kernels.INDEX8_KERNELS[build]
    x, p1 = problem(20, 48, 48, seed=1)
    _, p2 = problem(20, 48, 48, seed=2)
    _, p3 = problem(20, 48, 32, seed=3)
    fused = kern.prepare([p1, p2, p3], torch.float32)
    apart = torch.cat([TORCH.linear(x, TORCH.prepare([p], torch.float32)) for p in (p1, p2, p3)], dim=-1)
    assert torch.equal(kern.linear(x, fused), apart)


@pytest.mark.parametrize("build", BUILDS)
def test_gelu_and_layer_norm_in_c_are_the_definition_s_bits(build):
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(50_000, generator=g) * 6, torch.tensor([0.0, -0.0, 12.7, -12.8, 1e-30, -1e-30])])
    assert torch.equal(a8native.gelu(x, build), a8.gelu(x))
    for n in (1, 7, 8, 384, 769):
        rows = torch.randn(33, n, generator=g) * 4 + 2
        w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        assert torch.equal(a8native.layer_norm(rows, w, b, 1e-12, build), a8.layer_norm(rows, w, b, 1e-12))


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_of_packed_sequences_is_the_definition_s_bits(threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(9)
    for heads, d, lens in [(12, 64, [5, 17, 128, 1, 64]), (4, 8, [3, 1, 9]), (2, 20, [7]), (3, 5, [1, 2, 33])]:
        total, width = sum(lens), heads * d
        qkv = torch.randn(total, 3, heads, d, generator=g) * 2
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0)[:-1].tolist()])
        got = a8native.packed_attention(qkv[:, 0], qkv[:, 1:], starts, torch.tensor(lens), d ** -0.5)
        want = torch.empty(total, width)
        for st, n in zip(starts.tolist(), lens):
            q, k, v = (qkv[st:st + n, i].transpose(0, 1) for i in range(3))
            want[st:st + n] = a8.attention(q, k, v, None, d ** -0.5).transpose(0, 1).reshape(n, width)
        assert torch.equal(got, want)
        first = a8native.packed_attention(qkv[starts, 0], qkv[:, 1:], starts, torch.tensor(lens), d ** -0.5,
                                          first_only=True)
        assert torch.equal(first, want[starts])


@needs_attention
def test_a_nan_score_makes_its_row_nan_in_c_as_in_the_definition():
    # max over a row with a NaN is NaN (torch.amax); the C max once skipped a NaN that was not the row's first score
    g = torch.Generator().manual_seed(10)
    heads, d, lens = 2, 8, [6, 9]
    qkv = torch.randn(sum(lens), 3, heads, d, generator=g)
    qkv[4, 1, 0, 3] = float("nan")  # a key of sequence 0, head 0, not its first
    starts = torch.tensor([0, 6])
    got = a8native.packed_attention(qkv[:, 0], qkv[:, 1:], starts, torch.tensor(lens), d ** -0.5)
    want = torch.empty(sum(lens), heads * d)
    for st, n in zip(starts.tolist(), lens):
        q, k, v = (qkv[st:st + n, i].transpose(0, 1) for i in range(3))
        want[st:st + n] = a8.attention(q, k, v, None, d ** -0.5).transpose(0, 1).reshape(n, heads * d)
    assert want[:6, :d].isnan().all() and not want[6:].isnan().any()
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True)


def test_a_kernel_of_the_other_arithmetic_is_refused():
    with pytest.raises(ValueError, match="A8 checkpoint"):
        kernels.index8_kernel("dequant", "cpu", "a8")
    with pytest.raises(ValueError, match="fp32 activations"):
        kernels.index8_kernel("a8-torch", "cpu", "fp32")
    assert kernels.index8_kernel(None, "cpu", "a8").activations == "a8"
