"""The packed inference runtime: same logits as the QAT model, packed weights, clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from sensimix import kernels, runtime
from sensimix.export import export_checkpoint
from sensimix.modeling import from_bert
from sensimix.runtime import CheckpointError, SensiMixForSequenceClassification, expected_tensors

# odd intermediate size (100: not a multiple of 8 or 32) exercises the padded bit paths
GEOMETRY = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=100,
                max_position_embeddings=32, type_vocab_size=2)


def build_qat(layers: int = 4, eightbit: int = 2, seed: int = 0):
    """A tiny QAT model rounded to fp16 (what the checkpoint stores), every 1-bit FFN binarized, eval mode."""
    qat = from_bert(BertConfig(**GEOMETRY, num_hidden_layers=layers), num_hidden_layers=layers,
                    num_8bit_layers=eightbit, seed=seed)
    qat = qat.half().float()
    qat.set_binarized_layers(qat.config.mixed_layers)
    return qat.eval()


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[object, Path]:
    qat = build_qat()
    return qat, export_checkpoint(qat, tmp_path_factory.mktemp("ckpt") / "sensimix")


@pytest.fixture
def copy_of(packed, tmp_path) -> Path:
    return Path(shutil.copytree(packed[1], tmp_path / "copy"))


def batch(seed: int = 1, bsz: int = 5, seq: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, GEOMETRY["vocab_size"], (bsz, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    mask[3, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def qat_logits(qat, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return qat(**inputs).logits


def run(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("token_type_ids"))


# ---------------------------------------------------------------------------------------------------
# same computation as the QAT model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_kernel", ["int8", "float", "fp8", "reference"])
@pytest.mark.parametrize("index8_kernel", ["dense", "dequant"])
def test_fp32_logits_equal_qat_eval(packed, binary_kernel: str, index8_kernel: str) -> None:
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, binary_kernel=binary_kernel,
                                                              index8_kernel=index8_kernel)
    inputs = batch()
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert got.shape == (5, 2) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5


def test_defaults_without_mask_or_token_types(packed) -> None:
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder)
    assert (model.binary_kernel, model.index8_kernel, model.dtype) == ("int8", "dense", torch.float32)
    ids = batch()["input_ids"]
    assert (run(model, {"input_ids": ids}) - qat_logits(qat, {"input_ids": ids})).abs().max().item() <= 1e-5


def test_binary_ffn_is_not_trivially_skipped(packed) -> None:
    # guard against a runtime that matches only because the 1-bit FFN contributes nothing: flipping one weight
    # bit of the mixed layer must change the logits
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, binary_kernel="float")
    inputs = batch()
    before = run(model, inputs)
    model.layers[-1].ffn.output.weight[:, 0] *= -1
    assert (run(model, inputs) - before).abs().max().item() > 1e-3


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_half_precision_is_close(packed, dtype: torch.dtype, rel: float) -> None:
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, dtype=dtype)
    inputs = batch()
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= rel * want.abs().max().item()


def test_int8_activation_kernel_is_opt_in_and_close(packed) -> None:
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, index8_kernel="int8")
    inputs = batch()
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert (got - want).abs().max().item() <= 0.01 * want.abs().max().item()


def test_gelu_skip_is_exact_on_reachable_preactivations() -> None:
    # the 1-bit intermediate's pre-activation is an integer plus an fp16 bias: 0 or |z| >= 2^-24
    ints = torch.arange(-40, 41, dtype=torch.float32)
    biases = torch.tensor([0.0, 2 ** -24, -(2 ** -24), 0.5, -0.5, 1e-3, -7.25, 3.0], dtype=torch.float16).float()
    z = (ints[:, None] + biases[None, :]).flatten()
    assert torch.equal(torch.where(F.gelu(z) > 0, 1, -1), torch.where(z > 0, 1, -1))


# ---------------------------------------------------------------------------------------------------
# weights stay packed
# ---------------------------------------------------------------------------------------------------
def test_weights_stay_packed(packed) -> None:
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, index8_kernel="dequant")
    assert model.embeddings.word.weight_q.dtype == torch.int8
    assert model.embeddings.position.weight_q.dtype == torch.int8
    layer0, layer3 = model.layers[0], model.layers[3]
    assert layer0.attention.query.weight.dtype == torch.int8
    assert layer0.ffn.intermediate.weight.dtype == torch.int8
    assert layer3.ffn.intermediate.weight.dtype == torch.int8  # ±1 operand of the int8 kernel
    fp32_params = sum(p.numel() * 4 for p in qat.parameters())
    assert model.weight_bytes() < 0.4 * fp32_params
    big = [n for n, t in model.named_buffers() if t.is_floating_point() and t.numel() >= 100 * 64]
    assert not big, f"fp tensors as large as the embedding table: {big}"


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def test_pytorch_model_bin_fallback(packed, copy_of) -> None:
    qat, _ = packed
    (copy_of / "model.safetensors").unlink()
    model = SensiMixForSequenceClassification.from_pretrained(copy_of)
    inputs = batch()
    assert (run(model, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_three_plus_three_and_all_8bit(tmp_path) -> None:
    for layers, eightbit in ((6, 3), (2, 2), (2, 0)):
        qat = build_qat(layers, eightbit, seed=layers + eightbit)
        folder = export_checkpoint(qat, tmp_path / f"m{layers}{eightbit}")
        model = SensiMixForSequenceClassification.from_pretrained(folder)
        inputs = batch(seed=layers)
        assert (run(model, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_expected_tensors_match_export(packed) -> None:
    qat, folder = packed
    tensors = load_file(str(folder / "model.safetensors"))
    spec = expected_tensors(qat.config)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == spec


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_not_a_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        SensiMixForSequenceClassification.from_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        SensiMixForSequenceClassification.from_pretrained(tmp_path)


def test_plain_bert_folder_is_refused(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    del cfg["sensimix_format"]
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json has no 'sensimix_format'.*not a SensiMix packed checkpoint"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json is not valid JSON"),
    (json.dumps({"sensimix_format": "packed-v9"}), "sensimix_format 'packed-v9' is not supported"),
    (json.dumps({"sensimix_format": "packed-v1", "num_hidden_layers": 2, "num_8bit_layers": 5}),
     "config.json: num_8bit_layers"),
])
def test_bad_config(copy_of, text: str, match: str) -> None:
    (copy_of / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_truncated_safetensors(copy_of) -> None:
    path = copy_of / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read .* truncated or corrupt"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_broken_safetensors_header(copy_of) -> None:
    path = copy_of / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_truncated_pytorch_model_bin(copy_of) -> None:
    (copy_of / "model.safetensors").unlink()
    path = copy_of / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load it with torch.load"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_no_weights_file(copy_of) -> None:
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


BITS = "bert.encoder.layer.3.intermediate.dense.weight_bits"


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop(BITS), f"missing tensor\\(s\\) {BITS}"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor\\(s\\) extra"),
    (lambda t: t.update({"bert.encoder.layer.0.attention.self.query.weight_q":
                         torch.zeros(64, 64, dtype=torch.float16)}),
     "attention.self.query.weight_q has dtype torch.float16, expected torch.int8"),
    (lambda t: t.update({BITS: torch.zeros(100, 9, dtype=torch.uint8)}),
     f"{BITS} has shape \\[100, 9\\], expected \\[100, 8\\]"),
    (lambda t: t.update({"classifier.bias": torch.tensor([float("nan"), 0.0], dtype=torch.float16)}),
     "classifier.bias contains NaN"),
    (lambda t: t.update({"bert.embeddings.word_embeddings.weight_range": torch.tensor([1.0, -1.0]).half()}),
     "word_embeddings.weight_range = .* needs lo <= hi"),
])
def test_tampered_tensors(copy_of, change, match: str) -> None:
    rewrite_tensors(copy_of, change)
    with pytest.raises(CheckpointError, match="model\\.safetensors: .*" + match):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_config_geometry_mismatch(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["vocab_size"] = 101
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match="word_embeddings.weight_q has shape \\[100, 64\\], expected \\[101, 64\\]"):
        SensiMixForSequenceClassification.from_pretrained(copy_of)


def test_bad_inputs_raise_before_any_kernel(packed) -> None:
    model = SensiMixForSequenceClassification.from_pretrained(packed[1])
    ids = batch()["input_ids"]
    with pytest.raises(ValueError, match="sequence length 33 .* max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie in \\[0, 100\\) \\(vocab_size"):
        model(ids.clone().fill_(100))
    with pytest.raises(ValueError, match="token_type_ids must lie in \\[0, 2\\)"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="attention_mask has shape \\[5, 3\\]"):
        model(ids, attention_mask=torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a \\[batch, seq_len\\] tensor"):
        model(ids[0])
    with pytest.raises(ValueError, match="int64 or int32 token ids"):
        model(ids.float())


def test_bad_load_options(packed) -> None:
    folder = packed[1]
    with pytest.raises(ValueError, match="unknown binary kernel"):
        SensiMixForSequenceClassification.from_pretrained(folder, binary_kernel="nope")
    with pytest.raises(ValueError, match="dtype must be"):
        SensiMixForSequenceClassification.from_pretrained(folder, dtype=torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SensiMixForSequenceClassification.from_pretrained(folder, device="cuda")


# ---------------------------------------------------------------------------------------------------
# the fast precision and skipping padded tokens
# ---------------------------------------------------------------------------------------------------
def ragged_batch(seed: int = 4, bsz: int = 9, seq: int = 24) -> dict[str, torch.Tensor]:
    """Lengths from 1 to seq (one unpadded row), two segments, padding at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, GEOMETRY["vocab_size"], (bsz, seq), generator=g)
    lengths = torch.tensor([seq, 1, 2, 5, 9, 13, 17, 20, 23][:bsz])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": types}


def test_fast_precision_wiring(packed) -> None:
    model = SensiMixForSequenceClassification.from_pretrained(packed[1], dtype="fast")
    assert model.precision == "fast" and not model.exact and model.dtype == torch.float32
    assert model.index8_kernel == runtime.fast_index8_kernel("cpu") and model.binary_kernel == "int8"
    assert model.skip_padding
    fused = model.index8_kernel != "dense"
    assert all((layer.attention.qkv is not None) == fused for layer in model.layers)
    exact = SensiMixForSequenceClassification.from_pretrained(packed[1])
    assert exact.precision == "fp32" and exact.exact and not exact.skip_padding
    assert exact.layers[0].attention.qkv is None, "the exact path keeps the QAT model's three GEMMs"


@pytest.mark.parametrize("index8_kernel", ["bf16", "fbgemm"])
def test_fast_logits_close_to_exact(packed, index8_kernel: str) -> None:
    # bf16 rounds each GEMM operand to 8 significant bits (~2^-8 relative error per product, ~2^-8/sqrt(K) on a
    # sum of random-sign terms); fbgemm rounds activations to 1/255 of their range. Through the two 8-bit
    # layers, LayerNorms and the pooler, 1% of the logit scale covers both with a wide margin (measured on
    # these tiny random models: <= 3e-4), while a wrong Q/K/V order, a lost bias, c term or GELU is O(1).
    # The 1-bit FFN is exact given its input (next test); a sign flip of its input would show up here too.
    if kernels.INDEX8_KERNELS[index8_kernel].unavailable(torch.device("cpu")):
        pytest.skip(kernels.INDEX8_KERNELS[index8_kernel].unavailable(torch.device("cpu")))
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, dtype="fast", index8_kernel=index8_kernel)
    for inputs in (batch(), ragged_batch()):
        got, want = run(model, inputs), qat_logits(qat, inputs)
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 0.01 * want.abs().max().item()


def test_fast_keeps_the_one_bit_ffn_exact(packed) -> None:
    # same input -> bitwise the same output: int8 +-1 GEMM, int32 sums, fp32 bias, fp32 residual and LayerNorm
    exact = SensiMixForSequenceClassification.from_pretrained(packed[1])
    fast = SensiMixForSequenceClassification.from_pretrained(packed[1], dtype="fast")
    x = torch.randn(3, 7, GEOMETRY["hidden_size"], generator=torch.Generator().manual_seed(0))
    x[0, 0, :5] = 0.0  # sign(0) = -1 on both paths
    with torch.inference_mode():
        for n in exact.config.mixed_layers:
            assert torch.equal(fast.layers[n].ffn(x), exact.layers[n].ffn(x))
            assert torch.equal(fast.layers[n].ffn(x.view(21, -1)), exact.layers[n].ffn(x).view(21, -1))


def test_fast_attention_close_to_exact(packed) -> None:
    # fused Q/K/V, bf16 SDPA: within bf16 rounding of the exact attention block (LayerNorm output ~ O(1))
    exact = SensiMixForSequenceClassification.from_pretrained(packed[1])
    fast = SensiMixForSequenceClassification.from_pretrained(packed[1], dtype="fast")
    x = torch.randn(4, 9, GEOMETRY["hidden_size"], generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 5:] = False
    with torch.inference_mode():
        got, want = fast.layers[0].attention(x, mask), exact.layers[0].attention(x, mask)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 0.05
    assert (got - want).abs().mean().item() < 0.01


@pytest.mark.parametrize("span_step", [32, 4])
def test_skip_padding_leaves_exact_logits_unchanged(packed, monkeypatch, span_step: int) -> None:
    # span_step 4 puts the ragged batch's sequences in 6 attention groups
    monkeypatch.setattr(runtime.Packing, "SPAN_STEP", span_step)
    qat, folder = packed
    padded = SensiMixForSequenceClassification.from_pretrained(folder)
    skipped = SensiMixForSequenceClassification.from_pretrained(folder, skip_padding=True)
    assert skipped.exact and skipped.skip_padding
    inputs = ragged_batch()
    packing = runtime.Packing.of(inputs["attention_mask"])
    assert len(packing.groups) == (6 if span_step == 4 else 1)
    assert len(packing.index) == int(inputs["attention_mask"].sum())
    got, want = run(skipped, inputs), run(padded, inputs)
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item() + 1e-7
    assert (got - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_packing_layout() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    packing = runtime.Packing.of(mask)
    assert sorted(packing.index.tolist()) == mask.reshape(-1).nonzero().squeeze(1).tolist()
    assert torch.equal(packing.index[packing.cls], torch.arange(4) * 5), "cls: each row's first token, in order"
    assert torch.equal(packing.positions, packing.index % 5)
    assert sum(g.count for g in packing.groups) == 11 and sum(g.rows for g in packing.groups) == 4
    for g in packing.groups:
        assert g.gather.shape == (g.rows * g.span,) and g.mask.shape == (g.rows, 1, 1, g.span)
        assert g.mask.reshape(-1).sum() == g.count
    # nothing to skip, or no attended [CLS] to pool: the padded path runs (None)
    assert runtime.Packing.of(torch.ones(2, 4, dtype=torch.long)) is None
    assert runtime.Packing.of(torch.tensor([[0, 1, 1], [1, 1, 0]])) is None


def test_skip_padding_falls_back_without_a_cls_token(packed) -> None:
    # a left-padded row has no attended first token: the model keeps the padded path, same logits
    folder = packed[1]
    padded = SensiMixForSequenceClassification.from_pretrained(folder)
    skipped = SensiMixForSequenceClassification.from_pretrained(folder, skip_padding=True)
    inputs = batch()
    inputs["attention_mask"][2, :3] = 0
    assert torch.equal(run(skipped, inputs), run(padded, inputs))
    ids = {"input_ids": inputs["input_ids"]}
    assert torch.equal(run(skipped, ids), run(padded, ids))


def test_fast_index8_fallbacks(monkeypatch, caplog) -> None:
    fbgemm = kernels.INDEX8_KERNELS["fbgemm"]
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: False)
    if fbgemm.unavailable(torch.device("cpu")) is None:
        assert runtime.fast_index8_kernel("cpu") == "fbgemm"
    monkeypatch.setattr(type(fbgemm), "unavailable", lambda self, device: "no quantized engine (test)")
    with caplog.at_level("INFO", logger="sensimix.runtime"):
        assert runtime.fast_index8_kernel("cpu") == "dense"
    assert "no native bf16 GEMM" in caplog.text
    assert "'fbgemm' unavailable (no quantized engine (test))" in caplog.text
    assert "using the exact 'dense' kernel" in caplog.text
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: True)
    assert runtime.fast_index8_kernel("cpu") == "bf16"


def test_fast_falls_back_to_dense_and_stays_exact(packed, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "fast_index8_kernel", lambda device: "dense")
    qat, folder = packed
    model = SensiMixForSequenceClassification.from_pretrained(folder, dtype="fast")
    assert model.index8_kernel == "dense" and model.layers[0].attention.qkv is None and model.exact
    inputs = ragged_batch()
    assert (run(model, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_fbgemm_weights_are_counted(packed) -> None:
    if kernels.INDEX8_KERNELS["fbgemm"].unavailable(torch.device("cpu")):
        pytest.skip("fbgemm unavailable")
    model = SensiMixForSequenceClassification.from_pretrained(packed[1], dtype="fast", index8_kernel="fbgemm")
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())
    cfg = model.config
    eight_bit = cfg.num_hidden_layers * 4 * cfg.hidden_size ** 2 + cfg.num_8bit_layers * 2 * cfg.hidden_size * \
        cfg.intermediate_size
    assert model.weight_bytes() >= buffers + eight_bit  # int8 prepacked operands, not buffers


def test_fuse_qkv_needs_a_fusable_kernel(packed) -> None:
    with pytest.raises(ValueError, match="fuse_qkv=True, but the index8 kernel 'dequant' cannot fuse"):
        SensiMixForSequenceClassification.from_pretrained(packed[1], index8_kernel="dequant", fuse_qkv=True)
    fused = SensiMixForSequenceClassification.from_pretrained(packed[1], fuse_qkv=True)  # dense: exact, fused
    qat = packed[0]
    inputs = batch()
    assert fused.layers[0].attention.qkv is not None
    assert (run(fused, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5
