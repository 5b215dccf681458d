"""The A8 arithmetic's definition (sensimix/a8.py): hand-computed cases of every rule, its accuracy against the
float operations it stands for, and its training gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sensimix import a8
from sensimix.quant import index8_affine, index8_dequantize, index8_quantize, ste_fp16


def rows_of(*values: list[float]) -> a8.Rows:
    return a8.quantize_rows(torch.tensor(values, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------
# the row rule
# ---------------------------------------------------------------------------------------------------
def test_a_row_by_hand():
    # lo = -1, hi = 2, d = 3, inv = 85, zero = rint(85) = 85; x * 85 = -85, 0, 42.5 (half to even: 42), 170
    r = rows_of([-1.0, 0.0, 0.5, 2.0])
    assert r.q.tolist() == [[0, 85, 127, 255]] and r.q.dtype == torch.uint8
    assert r.zero.tolist() == [85] and r.total.tolist() == [-85 + 0 + 42 + 170]
    assert r.scale.item() == torch.tensor(3.0 / 255, dtype=torch.float32).item()
    assert r.centred().tolist() == [[-85.0, 0.0, 42.0, 170.0]]


def test_zero_is_exact_and_ranges_include_zero():
    r = rows_of([0.5, 1.0, 2.0], [-3.0, -1.5, 0.0])  # all positive: lo = 0; all negative: hi = 0
    assert r.zero.tolist() == [0, 255]
    # 0.5 * 127.5 = 63.75 -> 64, 127.5 -> 128 (half to even); -1.5 * 85 = -127.5 -> -128, + 255 = 127
    assert r.q.tolist() == [[64, 128, 255], [0, 127, 255]]
    assert r.dequantized()[1, 2].item() == 0.0


def test_the_zero_row_the_tiny_row_and_the_non_finite_rows():
    r = rows_of([0.0] * 4, [2.0 ** -101, 0.0, -(2.0 ** -102), 0.0], [1.0, math.nan, 0.0, 0.0],
                [1.0, math.inf, 0.0, 0.0], [3e38, -3e38, 0.0, 0.0])
    assert r.q.sum().item() == 0 and r.zero.tolist() == [0] * 5 and r.total.tolist() == [0] * 5
    assert r.scale[:2].tolist() == [0.0, 0.0]  # d < 2^-100: the zero row
    assert all(math.isnan(s) for s in r.scale[2:].tolist())  # NaN, inf, a range above fp32's: NaN outputs


def test_rows_are_independent_and_clamped():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 33, generator=g) * torch.logspace(-3, 3, 50)[:, None]
    whole = a8.quantize_rows(x)
    single = [a8.quantize_rows(x[i:i + 1]) for i in range(50)]
    assert torch.equal(whole.q, torch.cat([s.q for s in single]))
    assert ((whole.centred() * whole.scale[:, None] - x).abs() <= whole.scale[:, None] * 0.5 * (1 + 1e-5)).all()


# ---------------------------------------------------------------------------------------------------
# the linear
# ---------------------------------------------------------------------------------------------------
def test_the_integer_product_is_exact_at_its_worst_case():
    # every partial sum is an integer: 3 chunks of 512 columns of 255 * -128, far beyond fp32's 2^24
    c = torch.full((2, 1536), 255.0)
    q = torch.full((3, 1536), -128, dtype=torch.int8)
    assert a8.int_matmul(c, q).tolist() == [[-255 * 128 * 1536] * 3] * 2
    g = torch.Generator().manual_seed(1)
    c = torch.randint(-255, 256, (7, 1100), generator=g).float()
    q = torch.randint(-128, 128, (5, 1100), generator=g, dtype=torch.int8)
    assert torch.equal(a8.int_matmul(c, q).long(), c.long() @ q.long().t())


def test_the_epilogue_order_by_hand():
    # ((f32(A) * s + f32(total) * c) * scale) + b with A = 10, total = -4, s = 0.5, c = 0.25, scale = 2, b = 1
    rows = a8.Rows(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32), torch.tensor([2.0]),
                   torch.tensor([-4], dtype=torch.int32))
    y = a8.linear_epilogue(torch.tensor([[10.0]]), rows, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([1.0]))
    assert y.item() == ((10 * 0.5 + -4 * 0.25) * 2) + 1  # = 9


def test_the_epilogue_order_where_other_orders_round_differently():
    # fp32 operands (found by search) where scaling each term before the sum, folding the bias in before the
    # scale, or multiplying s * scale first each round to another value: only the specified order gives this one
    A, T = 70124, 821
    s, c, scale, b = (torch.tensor([v]) for v in (0.003428080352023244, -0.4590264856815338, 0.0026362359058111906,
                                                  0.62654048204422))
    rows = a8.Rows(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32), scale,
                   torch.tensor([T], dtype=torch.int32))
    y = a8.linear_epilogue(torch.tensor([[float(A)]]), rows, s, c, b).item()
    fa, ft = torch.tensor([float(A)]), torch.tensor([float(T)])
    assert y == (((fa * s + ft * c) * scale) + b).item() == 0.2667732536792755
    others = [fa * s * scale + ft * c * scale + b, (fa * s + (ft * c + b / scale)) * scale,
              fa * (s * scale) + ft * (c * scale) + b]
    assert all(o.item() != y for o in others), "the operands must tell the orders apart"


def test_the_linear_is_the_float_linear_of_the_rounded_operands():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(40, 96, generator=g), torch.randn(24, 96, generator=g) * 0.1, torch.randn(24, generator=g)
    q, lo, hi = index8_quantize(w)
    y = a8.linear(x, q, torch.stack([lo, hi]).half(), b.half())
    rows = a8.quantize_rows(x)
    ref = F.linear(rows.dequantized().double(), index8_dequantize(q, lo, hi).double(), b.half().double())
    assert (y.double() - ref).abs().max().item() < 1e-5  # the same value; the epilogue rounds five times
    assert (y - F.linear(x, w, b)).abs().max().item() > 1e-3  # and it is the 8-bit model, not the float one


# ---------------------------------------------------------------------------------------------------
# LayerNorm, GELU, exp, attention
# ---------------------------------------------------------------------------------------------------
def test_layer_norm_is_torch_s_to_float_rounding_and_its_root_is_ieee():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(64, 384, generator=g) * 3 + 1, torch.randn(384, generator=g), torch.randn(384, generator=g)
    assert (a8.layer_norm(x, w, b, 1e-12) - F.layer_norm(x, (384,), w, b, 1e-12)).abs().max().item() < 2e-5
    # the hand case: [1, 3] -> mean 2, var 1, rstd 1 / sqrt(1 + eps) = 1 in fp32
    assert a8.layer_norm(torch.tensor([[1.0, 3.0]]), torch.ones(2), torch.zeros(2), 1e-12).tolist() == [[-1.0, 1.0]]


def test_gelu_follows_the_erf_gelu_and_keeps_every_sign():
    x = torch.linspace(-15, 15, 300_001)
    y = a8.gelu(x)
    assert (y.double() - F.gelu(x.double())).abs().max().item() < 1e-6
    assert torch.equal(y > 0, x > 0)  # the 1-bit FFN's exact skip of the GELU relies on sign(GELU(x)) = sign(x)
    assert y[x > 12.8].eq(x[x > 12.8]).all() and y[x < -12.8].eq(0).all()
    tiny = y[(y != 0)].abs().min().item()
    assert tiny >= 2.0 ** -126, "no subnormal result (a GPU would flush it)"
    special = a8.gelu(torch.tensor([math.nan, math.inf, -math.inf, 0.0]))
    assert math.isnan(special[0]) and special[1] == math.inf and special[3] == 0.0


def test_the_exp_is_accurate_and_flushes_below_minus_80():
    d = -torch.rand(200_000, generator=torch.Generator().manual_seed(4)) * 79.9
    e = a8.softmax_exp(d)
    ref = torch.exp(d.double())
    assert ((e.double() - ref) / ref).abs().max().item() < 3e-7
    assert a8.softmax_exp(torch.tensor([-80.5, -math.inf, 0.0])).tolist() == [0.0, 0.0, 1.0]


def test_attention_matches_sdpa_and_ignores_masked_keys():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (7, 9, 9))
    keep = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 5:] = False
    out = a8.attention(q, k, v, keep, 0.25)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)).abs().max().item() < 2e-6
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 5:], v2[1, :, 5:] = 1e30, -7.0  # what a masked key holds changes nothing
    assert torch.equal(a8.attention(q, k2, v2, keep, 0.25)[1], out[1])


# ---------------------------------------------------------------------------------------------------
# training: exact forward, straight-through backward
# ---------------------------------------------------------------------------------------------------
def test_the_training_linear_computes_the_deployed_value_and_the_float_gradients():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 20, generator=g, requires_grad=True)
    w = (torch.randn(8, 20, generator=g) * 0.2).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    y = a8.ste_linear(x, w, b)
    q, lo, hi = index8_quantize(w.detach())
    assert torch.equal(y.detach(), a8.linear(x.detach(), q, torch.stack([lo, hi]).half(), b.detach().half()))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    rows = a8.quantize_rows(x.detach())
    w_hat = index8_dequantize(q, lo, hi)
    assert torch.allclose(x.grad, gy @ w_hat, atol=1e-6)  # straight through the rounding of x
    assert torch.allclose(w.grad, gy.reshape(-1, 8).t() @ rows.dequantized(), atol=1e-5)
    assert torch.allclose(b.grad, gy.reshape(-1, 8).sum(0), atol=1e-6)
    s, c = index8_affine(lo, hi)
    assert (w_hat - (s * q.float() + c)).abs().max() < 1e-6  # W_hat = s Q + c: the weight the epilogue uses


@pytest.mark.parametrize("which", ["layer_norm", "gelu", "attention"])
def test_specified_functions_take_the_float_twin_s_gradient(which):
    g = torch.Generator().manual_seed(7)
    if which == "layer_norm":
        args = [torch.randn(6, 32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)]
        spec = lambda *t: a8.eval_layer_norm(*t, 1e-12)  # noqa: E731
        twin = lambda x, w, b: F.layer_norm(x, (32,), ste_fp16(w), ste_fp16(b), 1e-12)  # noqa: E731
    elif which == "gelu":
        args, spec, twin = [torch.randn(6, 32, generator=g)], a8.eval_gelu, F.gelu
    else:
        args = [torch.randn(2, 3, 5, 8, generator=g) for _ in range(3)]
        spec = lambda q, k, v: a8.eval_attention(q, k, v, None, 0.3)  # noqa: E731
        twin = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)  # noqa: E731
    leaves = [a.requires_grad_() for a in args]
    out = spec(*leaves)
    assert torch.equal(out.detach(), spec(*[a.detach() for a in args]))  # the forward is the specified one
    gy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(twin(*leaves), leaves, gy)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
