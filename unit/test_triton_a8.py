"""The ``a8-triton`` kernel (sensimix.kernels.a8triton): bit for bit what :mod:`sensimix.a8` computes.

* in Triton's interpreter (``TRITON_INTERPRET=1``; test_triton.py's subprocess runs the ``a8_triton`` tests): the
  rounding, the GEMM with each epilogue, the LayerNorm and the GELU at odd shapes (1 and numbers that are no
  multiple of 16) and on special rows (zero, NaN, inf, tiny, huge, ties, subnormal), against ``sensimix.a8``;
  a whole A8 model against its QAT model (``torch.equal`` of logits); the LayerNorm's hand-off of its rounding;
* compiled for sm_80 and sm_90 without a GPU (``triton.compile`` to PTX): no FMA, IEEE divisions and square roots,
  the rounding's add/subtract pairs kept, int8 tensor-core instructions;
* on a GPU (``gpu`` mark, scripts/gpu_check.py): the same against ``sensimix.a8`` on the CPU, BERT's shapes, and the
  packed model on the card against the QAT model on the CPU: the encoder's output bit for bit, the logits (fp32
  GEMMs of the pooler and classifier, cuBLAS's summation order) within 1e-5 with every prediction equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import CUDA, ROOT, Launches, build_qat, interpreter_pythonpath, logits_of, needs_interpreter, ragged_inputs

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import a8, kernels
from sensimix.export import export_checkpoint
from sensimix.kernels import a8triton
from sensimix.kernels import a8triton_kernels as jit
from sensimix.quant import index8_quantize
from sensimix.sources import offline_bert

KERNEL = kernels.INDEX8_KERNELS["a8-triton"]
SHAPES = [(1, 1, 1), (3, 5, 7), (17, 33, 65), (2, 130, 3), (65, 70, 129)]  # (M, K, N); K = 130 loops over BLOCK_K


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of a zero included), NaN where the other has NaN (a GPU's NaN payload may
    differ from the CPU's)."""
    got, want = got.cpu(), want.cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    nan = want.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    if not got.is_floating_point():
        return torch.equal(got, want)
    bits = torch.int32 if got.dtype == torch.float32 else torch.int64
    return torch.equal(got[~nan].view(bits), want[~nan].view(bits))


def special_rows(k: int = 37) -> torch.Tensor:
    """Rows each rule has a branch for: random, zero, NaN, +-inf, tiny (below 2^-100: the zero row; just above),
    huge, a range that overflows (NaN row), constant, negative, ties of rint, subnormal values, -0."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(15, k, generator=g)
    rows[1] = 0.0
    rows[2, 3] = float("nan")
    rows[3, 0] = float("inf")
    rows[4, k - 1] = float("-inf")
    rows[5] = 1e-31 * torch.sign(rows[5])  # d = 2e-31 < 2^-100
    rows[6] = 1e-30 * torch.sign(rows[6])  # d = 2e-30: live, scale ~8e-33
    rows[7] = rows[7] * 1e30
    rows[8, 0], rows[8, 1] = 3e38, -3e38  # d = inf
    rows[9] = 2.5
    rows[10] = -rows[10].abs() - 0.1
    rows[11] = (torch.arange(k) % 256).float() + 0.5  # d = 255.5: x * inv lands near ties
    rows[11, 0], rows[11, 1] = 0.0, 255.0
    rows[12, :4] = torch.tensor([1.0, 1e-40, -1e-42, 1e-38])
    rows[13] = -0.0
    rows[14] = rows[14] * 1e-20
    return rows


def weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q, lo, hi = index8_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05 + 0.01)
    return q, torch.stack([lo, hi]).to(torch.float16)


def check_rounding(x: torch.Tensor, device: str) -> None:
    want = a8.quantize_rows(x)
    op = a8triton.quantize(x.to(device)).cpu()
    k = x.shape[1]
    zero, scale, total = a8triton._stats(op, k)
    assert torch.equal(op[:, :k].to(torch.int32) + 128, want.q.to(torch.int32))
    assert torch.equal(zero, want.zero) and torch.equal(total, want.total) and same_bits(scale, want.scale)


def check_linears(x: torch.Tensor, n: int, device: str, bias: bool = True) -> None:
    """linear, linear_act (GELU, ReLU), the GELU's operand and linear_add_norm against sensimix.a8, bit for bit."""
    k = x.shape[1]
    q, weight_range = weight(n, k)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2)).half() if bias else None
    p = KERNEL.prepare([(q.to(device), weight_range.to(device), None if b is None else b.float().to(device))],
                       torch.float32)
    xd = x.to(device)
    want = a8.linear(x, q, weight_range, b)
    assert same_bits(KERNEL.linear(xd, p), want)
    assert same_bits(KERNEL.linear_act(xd, p, "gelu"), a8.gelu(want))
    assert same_bits(KERNEL.linear_act(xd, p, "relu"), torch.relu(want))
    op = KERNEL.linear_act_operand(xd, p, "gelu").cpu()
    rows = a8.quantize_rows(a8.gelu(want))
    assert torch.equal(op[:, :n].to(torch.int32) + 128, rows.q.to(torch.int32))
    assert same_bits(a8triton._stats(op, n)[1], rows.scale)
    g = torch.Generator().manual_seed(3)
    residual, w, beta = torch.randn(x.shape[0], n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    got = KERNEL.linear_add_norm(xd, p, residual.to(device), w.to(device), beta.to(device), 1e-12)
    assert same_bits(got, a8.layer_norm(want + residual, w, beta, 1e-12))


def check_fused_parts(device: str) -> None:
    """Q, K and V as one GEMM, each part with its own range (one of them constant: s = 0)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 24, generator=g)
    parts = [weight(8, 24, 1), weight(5, 24, 2), (torch.full((3, 24), 7, dtype=torch.int8),
                                                   torch.tensor([0.5, 0.5], dtype=torch.float16))]
    biases = [torch.randn(q.shape[0], generator=g).half() for q, _ in parts]
    p = KERNEL.prepare([(q.to(device), r.to(device), b.float().to(device)) for (q, r), b in zip(parts, biases)],
                       torch.float32)
    want = torch.cat([a8.linear(x, q, r, b) for (q, r), b in zip(parts, biases)], dim=1)
    assert same_bits(KERNEL.linear(x.to(device), p), want)


def check_layer_norm_and_gelu(device: str) -> None:
    g = torch.Generator().manual_seed(5)
    for n in (1, 7, 100, 768):
        x = torch.randn(9, n, generator=g) * 3
        x[1] = 0.5  # constant: var 0
        x[2, 0] = float("nan")
        x[3] = x[3] * 1e20  # var overflows fp32: rstd 0
        x[4] = x[4] * 1e-30
        w, b = torch.randn(n, generator=g).half().float(), torch.randn(n, generator=g).half().float()
        got = a8triton.layer_norm(x.to(device), w.to(device), b.to(device), 1e-12, hand_off=False)
        assert same_bits(got, a8.layer_norm(x, w, b, 1e-12)), n
    special = torch.tensor([0.0, -0.0, 1e-30, 1e-40, -1e-40, 12.72, 12.73, -12.73, 12.74, -30.0, 30.0, 3e38,
                            float("inf"), float("-inf"), float("nan"), -5.0, 5.0])
    x = torch.cat([special, torch.randn(4000, generator=g) * 4])
    assert same_bits(a8triton.gelu(x.to(device)), a8.gelu(x))


# ---------------------------------------------------------------------------------------------------
# in Triton's interpreter
# ---------------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_a8_triton_odd_shapes_in_interpreter(m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + k))
    check_rounding(x, "cpu")
    check_linears(x, n, "cpu", bias=m != 3)


@needs_interpreter
def test_a8_triton_special_rows_in_interpreter() -> None:
    x = special_rows()
    check_rounding(x, "cpu")
    check_linears(x, 21, "cpu")
    check_fused_parts("cpu")


@needs_interpreter
def test_a8_triton_layer_norm_and_gelu_in_interpreter() -> None:
    check_layer_norm_and_gelu("cpu")


@needs_interpreter
@pytest.mark.parametrize("layers,eightbit,skip_padding,fuse_qkv", [(4, 2, True, True), (3, 3, False, False)])
def test_a8_triton_model_is_the_qat_model_s_bits_in_interpreter(tmp_path, layers, eightbit, skip_padding, fuse_qkv):
    qat = build_qat(layers, eightbit, seed=3, activation_quant="a8")
    folder = export_checkpoint(qat, tmp_path / "a8")
    inputs = ragged_inputs()
    with torch.inference_mode():
        want = qat(**inputs).logits
    packed = Packed.from_pretrained(folder, index8_kernel="a8-triton", skip_padding=skip_padding, fuse_qkv=fuse_qkv)
    assert packed.plan.index8_kernel == "a8-triton" and packed.plan.exact
    assert torch.equal(logits_of(packed, inputs), want)


@needs_interpreter
def test_a8_triton_layer_norm_hands_its_rounding_to_the_next_linear_in_interpreter(tmp_path, monkeypatch) -> None:
    qat = build_qat(4, 2, seed=3, activation_quant="a8")
    packed = Packed.from_pretrained(export_checkpoint(qat, tmp_path / "a8"), index8_kernel="a8-triton")
    inputs = ragged_inputs()
    counts = []
    for hand_off in (True, False):
        if not hand_off:
            monkeypatch.setattr(a8triton._HANDOFF, "take", lambda x, k: None)
        spy = Launches(jit.quantize_kernel)
        monkeypatch.setattr(jit, "quantize_kernel", spy)
        logits = logits_of(packed, inputs)
        counts.append(spy.count)
        monkeypatch.setattr(jit, "quantize_kernel", spy.kernel)
        if hand_off:
            first = logits
    # without the hand-off, each Q/K/V input (3 layers fused, the last layer's K/V) and each 8-bit FFN's input (2)
    # is rounded on its own: 6 passes more, the same bits
    assert counts[1] - counts[0] == 6 and torch.equal(first, logits)


# ---------------------------------------------------------------------------------------------------
# compiled for a GPU without one: the PTX rounds as specified
# ---------------------------------------------------------------------------------------------------
PTX_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sensimix.kernels import a8triton
    from sensimix.kernels import a8triton_kernels as jit

    def compile(fn, types, consts, cap, warps):
        sig = dict(types, **{k: "constexpr" for k in consts})
        c = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cap, 32),
                           options=dict(a8triton.LAUNCH_OPTIONS, num_warps=warps))
        ptx = c.asm["ptx"]
        ops = sorted(set(re.findall(r"^\\s*([a-z][\\w.]*)", ptx, re.M)))
        return {"ops": ops, "round_add": ptx.count("0f4B400000"), "round_sub": ptx.count("0fCB400000")}

    F, I8, I32 = "*fp32", "*i8", "*i32"
    gemm = dict(a_ptr=I8, stride_a="i32", zero_ptr=I32, scale_ptr=F, total_ptr=I32, stride_s="i32", w_ptr=I8,
                stride_w="i32", params_ptr=F, bias_ptr=F, res_ptr=F, stride_res="i32", out_ptr=F, stride_out="i32",
                part_ptr=F, M="i32", N="i32", K="i32")
    tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    quant = dict(x_ptr=F, stride_x="i32", q_ptr=I8, stride_q="i32", zero_ptr=I32, scale_ptr=F, total_ptr=I32,
                 stride_s="i32", part_ptr=F, n_parts="i32", M="i32", K="i32")
    norm = dict(x_ptr=F, stride_x="i32", w_ptr=F, b_ptr=F, eps="fp32", y_ptr=F, stride_y="i32", q_ptr=I8,
                stride_q="i32", zero_ptr=I32, scale_ptr=F, total_ptr=I32, stride_s="i32", M="i32", N="i32")
    out = {
        "gemm_gelu_90": compile(jit.gemm_kernel, gemm, dict(HAS_BIAS=True, HAS_RES=False, ACT=1, RANGE=True, **tiles),
                                90, 8),
        "gemm_res_80": compile(jit.gemm_kernel, gemm, dict(HAS_BIAS=True, HAS_RES=True, ACT=0, RANGE=False, **tiles),
                               80, 8),
        "quantize_90": compile(jit.quantize_kernel, quant, dict(ROWS=2, BLOCK=1024, BLOCK_P=32, HAS_PARTS=False), 90,
                               4),
        "layer_norm_90": compile(jit.layer_norm_kernel, norm, dict(ROWS=4, BLOCK=1024, QUANT=True), 90, 4),
    }
    print("PTX-JSON " + json.dumps(out))
""")


def test_a8_triton_ptx_rounds_as_specified() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled in the normal run (the interpreter replaces triton.jit)")
    where, why = interpreter_pythonpath()
    if where is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must compile the A8 Triton kernels: {why}")
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    run = subprocess.run([sys.executable, "-c", PTX_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("PTX-JSON ")), None)
    assert run.returncode == 0 and line, (run.stdout + run.stderr)[-4000:]
    found = json.loads(line.split(" ", 1)[1])
    for name, ptx in found.items():
        ops = ptx["ops"]
        assert not [o for o in ops if o.startswith("fma") and "f32" in o], (name, "FMA contraction")
        assert not [o for o in ops if o.startswith(("div.full", "div.approx", "sqrt.approx", "rsqrt", "rcp.approx",
                                                    "ex2.approx", "lg2.approx"))], (name, ops)
        assert not [o for o in ops if ".ftz" in o], (name, "a flush of subnormals")
        assert ptx["round_add"] == ptx["round_sub"], (name, "rint's (v + 1.5 2^23) - 1.5 2^23 was rewritten")
        assert (ptx["round_add"] > 0) == name.startswith(("quantize", "layer_norm")), name
    assert "div.rn.f32" in found["quantize_90"]["ops"] and "sqrt.rn.f32" in found["layer_norm_90"]["ops"]
    assert "div.rn.f64" in found["layer_norm_90"]["ops"]
    assert any(o.startswith("wgmma.mma_async") and "s32.s8.s8" in o for o in found["gemm_gelu_90"]["ops"])
    assert any(o.startswith("mma.sync") and "s32.s8.s8.s32" in o for o in found["gemm_res_80"]["ops"])


# ---------------------------------------------------------------------------------------------------
# refusals (no Triton needed)
# ---------------------------------------------------------------------------------------------------
def test_a8_triton_is_the_cuda_default_and_refuses_what_it_cannot_run(monkeypatch) -> None:
    assert kernels._A8_PREFERENCE[0] == "a8-triton"
    assert not KERNEL.fast_on(torch.device("cpu"))  # the interpreter is for tests: never a CPU default
    assert kernels.default_index8_kernel("cpu", "a8") != "a8-triton"
    monkeypatch.setattr(a8triton, "triton_available", lambda device=None: False)
    assert "needs triton" in KERNEL.unavailable(torch.device("cpu")) if a8triton.triton is None else \
        "runs on CUDA" in KERNEL.unavailable(torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot run on cpu"):
        kernels.index8_kernel("a8-triton", "cpu", "a8")
    assert a8triton.operand_width(1) == 32 and a8triton.operand_width(768) == 784
    with pytest.raises(ValueError, match="784 bytes per row, got 700"):
        KERNEL.operand(torch.zeros(2, 700, dtype=torch.int8), 768)
    with pytest.raises(ValueError, match="not torch.float16"):
        KERNEL.operand(torch.zeros(2, 768, dtype=torch.float16), 768)
    with pytest.raises(RuntimeError, match="no gradient"):
        KERNEL.operand(torch.zeros(2, 768, requires_grad=True), 768)


# ---------------------------------------------------------------------------------------------------
# on a GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [*SHAPES, (3392, 768, 2304), (3392, 768, 3072), (3392, 3072, 768), (64, 384, 1536)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a8_triton_on_gpu_is_a8_py_s_bits(m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k + n)) * 2
    check_rounding(x, "cuda")
    check_linears(x, n, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a8_triton_on_gpu_special_rows_layer_norm_and_gelu() -> None:
    x = special_rows()
    check_rounding(x, "cuda")
    check_linears(x, 21, "cuda")
    check_fused_parts("cuda")
    check_layer_norm_and_gelu("cuda")


def pooled_and_logits(model, inputs: dict[str, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pooler's input: each sequence's last hidden state of [CLS], the logits), on the CPU."""
    seen = []
    hook = model.bert.pooler.dense.register_forward_pre_hook(lambda module, args: seen.append(args[0].cpu()))
    try:
        logits = logits_of(model, inputs, device)
    finally:
        hook.remove()
    return seen[0], logits


def check_card_parity(qat, packed, inputs: dict[str, torch.Tensor]) -> None:
    """The encoder on the card computes the QAT model's bits (the pooler's input, torch.equal); the pooler and
    classifier are fp32 GEMMs (sensimix.a8: their summation order is cuBLAS's there), so logits within 1e-5 and every
    prediction equal."""
    want_pooled, want = pooled_and_logits(qat, inputs, "cpu")
    got_pooled, got = pooled_and_logits(packed, inputs, "cuda")
    assert same_bits(got_pooled, want_pooled)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("kernel", ["a8-triton", "a8-torch"])
@pytest.mark.parametrize("skip_padding", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a8_packed_model_on_gpu_is_the_qat_model_s_bits(tmp_path, kernel: str, skip_padding: bool) -> None:
    qat = build_qat(4, 2, seed=3, activation_quant="a8")
    packed = Packed.from_pretrained(export_checkpoint(qat, tmp_path / "a8"), device="cuda", index8_kernel=kernel,
                                    skip_padding=skip_padding)
    check_card_parity(qat, packed, ragged_inputs())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or offline_bert() is None, reason="needs a CUDA GPU and the packaged MiniLM-L6")
def test_a8_minilm_on_gpu_is_the_qat_model_s_bits() -> None:
    from sensimix.export import convert
    from sensimix.qat import from_bert
    from sensimix.sources import load_tokenizer

    source = offline_bert()
    qat = from_bert(source, num_hidden_layers=3, num_8bit_layers=2, num_labels=2, seed=0, activation_quant="a8")
    qat.set_binarized_layers([2])
    qat.eval()
    words = "the a film movie was is not very good bad great awful story acting plot boring fun".split()
    g = torch.Generator().manual_seed(0)
    sentences = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(3, 60, (64,), generator=g)]
    enc = load_tokenizer(source)(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    packed = convert(qat, device="cuda")
    assert packed.plan.index8_kernel == "a8-triton"
    check_card_parity(qat, packed, {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
