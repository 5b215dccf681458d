"""The int16 8-bit kernel (``sensimix.kernels.int16``, C + AVX2): its rounding, its exact integer GEMM, its threads,
the FFN's fused GELU operand, and that ``precision="fast"`` never takes it."""

from __future__ import annotations

import pytest
import torch

from sensimix import kernels
from sensimix.export import export_checkpoint
from sensimix.inference import make_plan
from sensimix.inference.plan import fast_index8_kernel
from sensimix.kernels import int16, reference
from sensimix.quant import index8_quantize

CPU = torch.device("cpu")
REASON = kernels.INDEX8_KERNELS["int16"].unavailable(CPU)
needs_int16 = pytest.mark.skipif(REASON is not None, reason=f"int16 kernel: {REASON}")
LEVELS = 16383  # 15-bit activations: see csrc/int16gemm.c


def rounded_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding, in torch: s = max|x_row| / 16383, A = round-half-even(x * (1 / s))."""
    amax = x.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / LEVELS, torch.ones_like(amax))
    a = torch.round(x * (1 / s)[:, None]).clamp(-LEVELS, LEVELS)
    return a, s


def index8_parts(n_parts: tuple[int, ...], k: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(n_parts):
        w = torch.randn(n, k, generator=g) * (0.05 + 0.2 * i) + (0.3 if i == 1 else 0.0)  # part 1: large c
        q, lo, hi = index8_quantize(w)
        parts.append((q, torch.stack([lo, hi]).to(torch.float16), torch.randn(n, generator=g).half().float()))
    return parts


def integer_reference(x: torch.Tensor, parts: list) -> torch.Tensor:
    """What the kernel computes, in float64 from its own rounded activations: sa * (s Q + c) . A + b."""
    a, sa = rounded_rows(x)
    outs = []
    for q, weight_range, bias in parts:
        w_hat = reference.index8_linear(torch.eye(q.shape[1]), q, weight_range).t().double()
        outs.append(sa.double()[:, None] * (a.double() @ w_hat.t()) + bias.double())
    return torch.cat(outs, dim=1)


@needs_int16
@pytest.mark.parametrize("m,k", [(1, 1), (3, 7), (5, 16), (9, 33), (4, 768), (2, 3072)])
def test_rows_are_rounded_to_15_bits_as_defined(m: int, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]
    x[0, : min(k, 3)] = torch.tensor([0.5, -0.5, 2.5])[: min(k, 3)] * float(x[0].abs().max()) / LEVELS  # ties
    a, sa, rs = int16.quantize_rows(x)
    want, s = rounded_rows(x)
    assert a.dtype == torch.int16 and a.shape[0] % 6 == 0 and a.shape[1] == k + k % 2
    assert torch.equal(a[:m, :k].float(), want) and torch.equal(sa, s)
    assert (a[:m, k:] == 0).all()  # the odd column a pair reads is zero
    assert torch.equal(rs, want.sum(dim=1).to(torch.int32))
    assert int(a[:m, :k].abs().max()) == LEVELS  # the largest |x| of a row is the full scale


@needs_int16
def test_zero_and_non_finite_rows() -> None:
    x = torch.randn(4, 40)
    x[0] = 0.0
    x[1, 5] = float("nan")
    x[2, 39] = float("inf")
    a, sa, rs = int16.quantize_rows(x)
    assert float(sa[0]) == 1.0 and (a[0] == 0).all() and int(rs[0]) == 0
    assert torch.isnan(sa[1]) and torch.isnan(sa[2]) and torch.isfinite(sa[3])
    kern = kernels.INDEX8_KERNELS["int16"]
    y = kern.linear(x, kern.prepare(index8_parts((9,), 40), torch.float32))
    # like the exact GEMM: a NaN or an infinity in a row makes that row's outputs NaN, and no other row's
    assert torch.isnan(y[1:3]).all() and torch.isfinite(y[[0, 3]]).all()


@needs_int16
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k,n", [(0, 64, 3), (1, 1, 1), (7, 33, 17), (13, 768, 40), (200, 96, 33),
                                   (6, 2049, 16), (31, 3072, 9), (401, 40, 20)])
def test_integer_gemm_is_exact_up_to_its_fp32_epilogue(threads: int, m: int, k: int, n: int) -> None:
    # row blocks (6 per micro-kernel, up to 96 per block the threads take in turn; 401 rows: 5 blocks, the last
    # ragged), tail rows and tail columns of a 16-column panel, odd K, and K past one 1,024-product int32 chunk
    g = torch.Generator().manual_seed(m * 31 + k)
    x = torch.randn(m, k, generator=g) * 3 + 0.25
    parts = index8_parts((n,), k, seed=k)
    kern = kernels.INDEX8_KERNELS["int16"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kern.linear(x, kern.prepare(parts, torch.float32))
    finally:
        torch.set_num_threads(before)
    assert got.shape == (m, n) and got.dtype == torch.float32
    want = integer_reference(x, parts)
    # fp32 epilogue: the int32 sums converted and scaled; 1e-6 of the magnitudes involved is ~16 ulp
    a, sa = rounded_rows(x)
    q, weight_range, bias = parts[0]
    lo, hi = weight_range.float()
    s = float((hi - lo) / 255)
    scale = sa.double()[:, None] * (s * a.double().abs() @ q.double().abs().t() + abs(128 * s + float(lo))
                                    * a.double().sum(dim=1, keepdim=True).abs())
    assert ((got.double() - want).abs() <= 1e-6 * (scale + bias.double().abs()) + 1e-7).all()


@needs_int16
@pytest.mark.parametrize("k", [1024, 3072])
def test_no_int32_overflow_at_full_scale(k: int) -> None:
    # every product at its largest (16383 * -128) over a whole chunk: the int32 partial sums must not wrap
    x = torch.ones(7, k)
    q = torch.full((5, k), -128, dtype=torch.int8)
    weight_range = torch.tensor([-1.0, 1.0], dtype=torch.float16)
    kern = kernels.INDEX8_KERNELS["int16"]
    got = kern.linear(x, kern.prepare([(q, weight_range, None)], torch.float32))
    want = reference.index8_linear(x, q, weight_range)  # every W_hat = -1: y = -k
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@needs_int16
def test_fused_parts_keep_their_own_ranges_and_stay_within_the_rounding_bound() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 96, generator=g)
    parts = index8_parts((20, 12, 9), 96, seed=5)
    kern = kernels.INDEX8_KERNELS["int16"]
    assert kern.fusable and not kern.exact
    got = kern.linear(x, kern.prepare(parts, torch.float32))
    assert got.shape == (45, 41)
    torch.testing.assert_close(got.double(), integer_reference(x, parts), rtol=0, atol=2e-5)
    # against the exact layer: each x moves by at most half a step (max|x_row| / 32766) times sum_k |W_hat_nk|
    exact = torch.cat([reference.index8_linear(x, q, r, b) for q, r, b in parts], dim=1)
    w_abs = torch.cat([reference.index8_linear(torch.eye(96), q, r).t().abs().sum(dim=1) for q, r, _ in parts])
    bound = x.abs().amax(dim=1, keepdim=True) / (2 * LEVELS) * w_abs + 1e-5 * exact.abs() + 1e-5
    err = (got - exact).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # activations really are rounded: the kernel is approximate


@needs_int16
def test_int16_refuses_what_it_cannot_compute() -> None:
    kern = kernels.INDEX8_KERNELS["int16"]
    p = kern.prepare(index8_parts((4,), 8), torch.float32)
    with pytest.raises(ValueError, match="fp32 activations"):
        kern.linear(torch.randn(2, 8).half(), p)
    with pytest.raises(RuntimeError, match="computes no gradient"):
        kern.linear(torch.randn(2, 8, requires_grad=True), p)
    with pytest.raises(ValueError, match="fp32 activations"):
        kern.prepare(index8_parts((4,), 8), torch.float16)
    assert "CPU only" in kern.unavailable(torch.device("cuda"))


def test_fast_never_rounds_activations_int16_is_asked_for_by_name() -> None:
    # int16 kept every prediction of well-trained (2+1) models but not of CI's weakly trained one: fast stays exact
    exact = kernels.default_index8_kernel(CPU)
    assert fast_index8_kernel(CPU) == exact and make_plan("cpu", "fast").exact
    if REASON is None:
        named = make_plan("cpu", "fast", index8_kernel="int16")
        assert named.index8_kernel == "int16" and not named.exact and "approximate" in named.describe()


@needs_int16
def test_a_model_on_int16_is_close_to_exact(tmp_path) -> None:
    from transformers import BertConfig

    from sensimix import SensiMixForSequenceClassification as Packed
    from sensimix.qat import from_bert

    geometry = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=100,
                    max_position_embeddings=32, type_vocab_size=2)
    qat = from_bert(BertConfig(**geometry, num_hidden_layers=3), num_hidden_layers=3, num_8bit_layers=2, seed=0)
    qat.set_binarized_layers(qat.config.mixed_layers)
    folder = export_checkpoint(qat.eval(), tmp_path / "sm")
    model = Packed.from_pretrained(folder, precision="fast", index8_kernel="int16")
    assert model.plan.index8_kernel == "int16" and "approximate" in model.plan.describe()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (6, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits  # the FFN through the fused GELU operand
        want = Packed.from_pretrained(folder).eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert model.to("cpu").plan.index8_kernel == "int16"


@needs_int16
@pytest.mark.parametrize("tiny", [1e-33, 1e-38, 1e-44])
def test_rows_of_tiny_values_stay_finite_and_right(tiny: float) -> None:
    # max|x| so small that 1 / (max|x| / 16383) overflows fp32: the row is scaled in double instead of turning
    # its zeros into NaN or full-scale values
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g)
    x[1] = x[1] / x[1].abs().max() * tiny
    x[1, ::7] = 0.0
    parts = index8_parts((11,), 50)
    a, sa, rs = int16.quantize_rows(x)
    assert int(a[1].abs().max()) == LEVELS and (a[1, :50:7] == 0).all()
    assert torch.equal(rs, a[:3].sum(dim=1).to(torch.int32))
    kern = kernels.INDEX8_KERNELS["int16"]
    got = kern.linear(x, kern.prepare(parts, torch.float32))
    exact = reference.index8_linear(x, *parts[0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], exact[1], rtol=1e-6, atol=1e-6)  # the bias alone, to fp32 precision


def erf_gelu64(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    return 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))


@needs_int16
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k,n", [(0, 16, 8), (1, 5, 3), (7, 33, 101), (100, 64, 200), (13, 1100, 40),
                                   (307, 24, 50)])
def test_fused_gelu_operand_is_the_rounded_erf_gelu(threads: int, m: int, k: int, n: int) -> None:
    # linear_act_operand(x, up, "gelu"): the GEMM, the erf GELU and the rounding for the next linear in one call;
    # decoded, its rows are the 15-bit rounding of the exact GELU of the kernel's own GEMM (a tie may round apart)
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * 2
    parts = index8_parts((n,), k, seed=n)
    kern = kernels.INDEX8_KERNELS["int16"]
    p = kern.prepare(parts, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        op = kern.linear_act_operand(x, p, "gelu")
    finally:
        torch.set_num_threads(before)
    assert op.dtype == torch.int16 and op.shape == (m, int16.operand_width(n))
    a, sa, rs = int16.operand_rows(op, n)
    want = erf_gelu64(integer_reference(x, parts))  # float64
    want_a, want_s = rounded_rows(want.float())
    assert torch.allclose(sa, want_s, rtol=1e-5, atol=0)
    assert ((a[:m, :n].float() - want_a).abs() <= 1).all()
    assert torch.equal(rs, a[:m, :n].sum(dim=1).to(torch.int32))
    assert ((a[:m, :n].double() * sa.double()[:, None] - want).abs() <= 0.5 * sa.double()[:, None] * 1.01 + 1e-6).all()


@needs_int16
def test_the_next_linear_reads_the_operand_as_its_decoded_values() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 48, generator=g) * 3
    x[4] = float("nan")
    kern = kernels.INDEX8_KERNELS["int16"]
    up = kern.prepare(index8_parts((70,), 48, seed=1), torch.float32)
    down = kern.prepare(index8_parts((48,), 70, seed=2), torch.float32)
    op = kern.linear_act_operand(x.view(4, 5, 48), up, "gelu")  # any leading shape, kept
    assert op.shape == (4, 5, int16.operand_width(70))
    a, sa, _ = int16.operand_rows(op, 70)
    decoded = a[:20, :70].float() * sa[:, None]
    got = kern.linear(op, down)
    assert got.shape == (4, 5, 48)
    want = kern.linear(decoded, down).view(4, 5, 48)  # re-rounding the decoded rows gives the same integers
    assert torch.isnan(got.view(20, 48)[4]).all() and torch.isnan(want.view(20, 48)[4]).all()
    keep = torch.arange(20) != 4
    torch.testing.assert_close(got.view(20, 48)[keep], want.view(20, 48)[keep], rtol=0, atol=1e-5)
    # a copy of the operand (its storage no longer holds the kernel's whole row blocks) reads the same
    torch.testing.assert_close(kern.linear(op.clone(), down), got, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="has 74 columns per row, got 80"):
        kern.linear(torch.zeros(3, 80, dtype=torch.int16), down)
    assert kern.linear_act_operand(x, up, "relu").dtype == torch.float32  # only the GELU is fused


@needs_int16
def test_rows_do_not_depend_on_threads_and_reused_work_space_keeps_earlier_results() -> None:
    # the threads take blocks of rows from a shared counter (which thread computes a row varies from call to call)
    # and the GELU blocks live in a reused per-thread work space: every row must come out bit for bit the same,
    # and a later call must not touch an earlier call's result
    g = torch.Generator().manual_seed(11)
    x1, x2 = torch.randn(777, 96, generator=g), torch.randn(500, 96, generator=g) * 5
    kern = kernels.INDEX8_KERNELS["int16"]
    up = kern.prepare(index8_parts((130,), 96, seed=3), torch.float32)
    before = torch.get_num_threads()
    results, first = [], None
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            results.append((kern.linear(x1, up), kern.linear_act_operand(x1, up, "gelu")))
            first = first or [t.clone() for t in results[0]]
        kern.linear_act_operand(x2, up, "gelu")
    finally:
        torch.set_num_threads(before)
    for got in results:
        assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])


@needs_int16
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 33, 20), (250, 64, 48), (13, 100, 768)])
def test_fused_residual_layernorm_is_linear_add_then_layernorm(threads: int, m: int, k: int, n: int) -> None:
    # linear_add_norm: the GEMM, the residual add and LayerNorm in one call (the output projections); against the
    # kernel's own linear followed by torch's add and LayerNorm, for fp32 rows and for the kernel's GELU operand
    g = torch.Generator().manual_seed(m + n)
    x, residual = torch.randn(m, k, generator=g) * 2, torch.randn(m, 2 * n, generator=g)[:, ::2]  # strided rows
    weight, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    residual[0, 0] = float("nan")
    kern = kernels.INDEX8_KERNELS["int16"]
    up = kern.prepare(index8_parts((k,), k, seed=5), torch.float32)
    p = kern.prepare(index8_parts((n,), k), torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for given in (x, kern.linear_act_operand(x, up, "gelu")):
            got = kern.linear_add_norm(given.view(1, m, -1), p, residual.reshape(1, m, n), weight, bias, 1e-12)
            want = torch.nn.functional.layer_norm(kern.linear(given, p) + residual, (n,), weight, bias, 1e-12)
            assert got.shape == (1, m, n)
            assert torch.isnan(got[0, 0]).all() and not torch.isnan(got[0, 1:]).any()
            torch.testing.assert_close(got[0, 1:], want[1:], rtol=1e-5, atol=2e-5)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="5 rows of activations but 4 residual rows"):
        kern.linear_add_norm(torch.randn(5, k), p, torch.randn(4, n), weight, bias, 1e-12)
