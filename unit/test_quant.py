"""Exact tests of the quantization primitives (sensimix.quant)."""

import pytest
import torch

from sensimix import quant


@pytest.mark.parametrize("shape", [(7,), (31, 17), (4, 768), (3, 5, 9)])
def test_index8_round_trip_error_is_at_most_half_a_step(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q, lo, hi = quant.index8_quantize(w)
    assert q.dtype == torch.int8
    w_hat = quant.index8_dequantize(q, lo, hi)
    s = (hi - lo) / 255
    # lo/hi are fp16-rounded, so allow that rounding on top of the s/2 bound
    slack = (w.min() - lo).abs() + (w.max() - hi).abs()
    assert (w - w_hat).abs().max() <= s / 2 + slack + 1e-7


def test_index8_dequantize_in_place_is_the_out_of_place_formula_bit_for_bit():
    w = torch.randn(64, 33) * 0.07 + 0.01
    q, lo, hi = quant.index8_quantize(w)
    kept = q.clone()
    want = ((q.float() - quant.QMIN) * quant.index8_step(lo, hi) + lo.float())
    assert torch.equal(quant.index8_dequantize(q, lo, hi), want) and torch.equal(q, kept)
    as_float = q.float()  # a float Q is copied, never overwritten
    assert torch.equal(quant.index8_dequantize(as_float, lo, hi), want) and torch.equal(as_float, kept.float())
    lo_g = lo.clone().requires_grad_()
    graded = quant.index8_dequantize(q, lo_g, hi)
    graded.sum().backward()
    assert torch.equal(graded.detach(), want) and lo_g.grad is not None


def test_index8_extremes_land_on_minus128_and_127():
    w = torch.tensor([-0.5, -0.25, 0.0, 0.125, 0.75])  # fp16-exact extremes
    q, lo, hi = quant.index8_quantize(w)
    assert q.min().item() == -128 and q.max().item() == 127
    assert q[0].item() == -128 and q[-1].item() == 127
    assert lo.item() == -0.5 and hi.item() == 0.75
    w_hat = quant.index8_dequantize(q, lo, hi)
    assert w_hat[0].item() == pytest.approx(-0.5) and w_hat[-1].item() == pytest.approx(0.75)


def test_index8_uses_255_steps():
    w = torch.linspace(-1, 1, 256)
    q, _, _ = quant.index8_quantize(w)
    assert torch.equal(q, torch.arange(-128, 128, dtype=torch.int8))


def test_index8_rounds_to_nearest_with_ties_to_even_by_hand():
    # lo = 0, hi = 255: the step is exactly 1, so (w - lo) / s is w itself; a 1%-of-a-step bias (floor(x + 0.49)),
    # ties away from zero or a floor would each move one of these
    w = torch.tensor([0.0, 3.495, 3.505, 2.5, 3.5, 254.5, 255.0])
    q, lo, hi = quant.index8_quantize(w)
    assert (lo.item(), hi.item()) == (0.0, 255.0)
    assert (q.int() + 128).tolist() == [0, 3, 4, 2, 4, 254, 255]


def test_index8_constant_tensor_is_guarded():
    w = torch.full((4, 4), 0.375)
    q, lo, hi = quant.index8_quantize(w)
    assert torch.isfinite(q.float()).all() and (q == -128).all()
    assert torch.equal(quant.index8_dequantize(q, lo, hi), w)


def test_index8_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        quant.index8_quantize(torch.arange(4))


def test_sign_maps_zero_to_minus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert quant.sign(x).tolist() == [-1, -1, -1, 1, 1]


@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 32, 33, 100, 768])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_pack_unpack_is_lossless(k, lead):
    torch.manual_seed(k)
    x = torch.randn(*lead, k)
    packed = quant.pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, (k + 7) // 8)
    assert torch.equal(quant.unpack_signs(packed, k), quant.sign(x))


def test_pack_bit_order_is_little_endian_and_padding_zero():
    x = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, -1, 1, 1, -1])
    packed = quant.pack_signs(x)
    assert packed.tolist() == [0b00000001, 0b00000011]


def test_unpack_refuses_wrong_k():
    packed = quant.pack_signs(torch.randn(4, 20))  # 3 bytes
    with pytest.raises(ValueError, match="cannot hold k=25"):
        quant.unpack_signs(packed, 25)
    with pytest.raises(ValueError, match="k=16"):
        quant.unpack_signs(packed, 16)  # would fit in 2 bytes: a mismatched k, not padding


def test_pack_refuses_empty_last_dim():
    with pytest.raises(ValueError, match="empty"):
        quant.pack_signs(torch.empty(3, 0))


def test_index8_ste_gradient_is_identity():
    w = torch.randn(5, 6, requires_grad=True)
    g = torch.randn(5, 6)
    quant.ste_index8(w).backward(g)
    assert torch.equal(w.grad, g)


def test_sign_input_ste_gradient_is_identity():
    x = torch.randn(10, requires_grad=True) * 3
    x.retain_grad()
    g = torch.randn(10)
    quant.ste_sign_input(x).backward(g)
    assert torch.equal(x.grad, g)


def test_sign_weight_ste_is_hardtanh():
    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    g = torch.arange(1.0, 8.0)
    out = quant.ste_sign_weight(w)
    assert out.tolist() == [-1, -1, -1, -1, 1, 1, 1]
    out.backward(g)
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]


def test_abwr():
    w = torch.tensor([[1.0, -1.0], [0.0, 3.0]])
    assert quant.abwr(w).item() == pytest.approx((0 + 0 + 1 + 4) / 4)
