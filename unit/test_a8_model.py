"""An A8 checkpoint end to end: the QAT model in eval mode and the packed model compute the same bits on every
plan, the folder round-trips with its activation_quant under the checksum, and plans of the other arithmetic are
refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SEQ, build_qat, logits_of, ragged_inputs
from transformers import BertConfig

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import kernels
from sensimix.checkpoint import CheckpointError
from sensimix.config import SensiMixConfig
from sensimix.export import convert, export_checkpoint
from sensimix.inference import make_plan
from sensimix.qat import A8Gelu, A8SelfAttention, from_bert
from sensimix.sources import offline_bert

A8_KERNELS = [n for n, k in kernels.INDEX8_KERNELS.items() if k.activations == "a8" and k.unavailable("cpu") is None]


@pytest.fixture(scope="module", params=[(4, 2), (3, 0)], ids=["2+2", "0+3"])
def a8_qat(request):
    layers, eightbit = request.param
    return build_qat(layers, eightbit, seed=3, activation_quant="a8")


@pytest.fixture(scope="module")
def a8_folder(tmp_path_factory, a8_qat):
    return export_checkpoint(a8_qat, tmp_path_factory.mktemp("a8") / "model")


def test_the_qat_model_is_a8_in_its_modules(a8_qat):
    layer0 = a8_qat.bert.encoder.layer[0]
    assert isinstance(layer0.attention.self, A8SelfAttention) and layer0.attention.self.query.a8
    eightbit = a8_qat.config.num_8bit_layers > 0
    assert isinstance(layer0.intermediate.intermediate_act_fn, A8Gelu) == eightbit
    assert a8_qat.bert.embeddings.LayerNorm.a8 and a8_qat.config.describe().endswith("A8")


@pytest.mark.parametrize("kernel", A8_KERNELS)
@pytest.mark.parametrize("skip_padding, fuse_qkv", [(True, True), (False, True), (True, False)])
def test_packed_logits_are_the_qat_model_s_bits(a8_qat, a8_folder, kernel, skip_padding, fuse_qkv):
    inputs = ragged_inputs()
    with torch.inference_mode():
        want = a8_qat(**inputs).logits
    packed = Packed.from_pretrained(a8_folder, index8_kernel=kernel, skip_padding=skip_padding, fuse_qkv=fuse_qkv)
    assert packed.plan.exact and packed.plan.a8
    assert torch.equal(logits_of(packed, inputs), want)


def test_fast_is_the_exact_a8_plan_and_ignores_a_calibration_record(a8_folder):
    (a8_folder / "fast_calibration.json").write_text(json.dumps({"schema": "whatever"}))
    try:
        fast = Packed.from_pretrained(a8_folder, precision="fast")
    finally:
        (a8_folder / "fast_calibration.json").unlink()
    assert fast.plan.exact and fast.plan.index8_kernel == kernels.default_index8_kernel("cpu", "a8")
    assert torch.equal(logits_of(fast, ragged_inputs()), logits_of(Packed.from_pretrained(a8_folder),
                                                                   ragged_inputs()))


def test_the_folder_records_a8_under_the_checksum(a8_folder, tmp_path):
    raw = json.loads((a8_folder / "config.json").read_text())
    assert raw["activation_quant"] == "a8"
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in a8_folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    del raw["activation_quant"]  # read as an fp32-activation model it would compute something else
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="and activation_quant, which an A8 model sets.*checksum mismatch"):
        Packed.from_pretrained(copy)
    # the field postdates checksums: a folder that sets it without one was edited (checksum removed, field added)
    fp32 = export_checkpoint(build_qat(3, 2), tmp_path / "fp32")
    for folder, value in ((a8_folder, "a8"), (fp32, "a8"), (fp32, None)):
        raw = json.loads((folder / "config.json").read_text())
        del raw["sensimix_checksum"]
        raw["activation_quant"] = value
        (copy / "config.json").write_text(json.dumps(raw))
        for f in ("model.safetensors", "pytorch_model.bin"):
            if (folder / f).exists():
                (copy / f).write_bytes((folder / f).read_bytes())
        with pytest.raises(CheckpointError, match="sets activation_quant but has no sensimix_checksum"):
            Packed.from_pretrained(copy)


def test_an_fp32_activation_folder_does_not_write_the_field(tmp_path):
    folder = export_checkpoint(build_qat(3, 2), tmp_path / "fp32")
    assert "activation_quant" not in json.loads((folder / "config.json").read_text())
    assert not Packed.from_pretrained(folder).plan.a8


def test_plans_of_the_other_arithmetic_are_refused(a8_folder, a8_qat):
    with pytest.raises(ValueError, match="precision 'fp16' would change an A8 checkpoint"):
        Packed.from_pretrained(a8_folder, precision="fp16")
    with pytest.raises(ValueError, match="A8 checkpoint"):
        Packed.from_pretrained(a8_folder, index8_kernel="dequant")
    packed = convert(a8_qat)
    with pytest.raises(ValueError, match="activations='a8'"):
        packed.prepare(make_plan("cpu"))
    fp32 = convert(build_qat(3, 2))
    with pytest.raises(ValueError, match="fp32 activations"):
        fp32.prepare(make_plan("cpu", activations="a8"))


def test_config_validation():
    with pytest.raises(ValueError, match="activation_quant must be absent"):
        SensiMixConfig(activation_quant="a4")
    with pytest.raises(ValueError, match="hidden_act 'silu' has no A8 rule"):
        SensiMixConfig(activation_quant="a8", hidden_act="silu")
    assert SensiMixConfig(activation_quant="a8", hidden_act="relu").a8


def test_training_moves_the_loss_and_reaches_every_parameter():
    model = from_bert(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=SEQ), num_hidden_layers=3,
                      num_8bit_layers=2, activation_quant="a8", seed=0)
    model.set_binarized_layers([2])
    model.train()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 60, (16, 12), generator=g), torch.randint(0, 2, (16,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert missing == [], missing
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses  # 16 random labels: memorized, step by step


@pytest.mark.skipif(offline_bert() is None, reason="the packaged MiniLM-L6 is not installed")
def test_pretrained_minilm_a8_export_computes_the_qat_model_s_bits():
    from sensimix.sources import load_tokenizer

    source = offline_bert()
    qat = from_bert(source, num_hidden_layers=3, num_8bit_layers=2, num_labels=2, seed=0, activation_quant="a8")
    qat.set_binarized_layers([2])
    qat.eval()
    words = "the a film movie was is not very good bad great awful story acting plot boring fun".split()
    g = torch.Generator().manual_seed(0)
    sentences = [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(3, 40, (48,), generator=g)]
    enc = load_tokenizer(source)(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode():
        want = qat(**inputs).logits
    for kernel in A8_KERNELS:
        assert torch.equal(logits_of(convert(qat, device="cpu", index8_kernel=kernel), inputs), want), kernel


def test_calibrating_an_a8_folder_is_refused_in_one_line(a8_folder, caplog):
    from sensimix import cli

    assert cli.main(["calibrate", "--model", str(a8_folder), "--glue-dir", str(a8_folder)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "is an A8 checkpoint" in errors[0] and "nothing to calibrate" in errors[0]
    assert not (a8_folder / "fast_calibration.json").exists()
