"""convert / export: the packed tensors of a QAT model, the folder written, atomicity, refusals."""

import json
import os

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from sensimix import checkpoint
from sensimix import export as ex
from sensimix.qat import from_bert
from sensimix.quant import index8_dequantize, unpack_signs


@pytest.fixture
def model(tiny_bert_config):
    m = from_bert(tiny_bert_config, num_hidden_layers=3, num_8bit_layers=2, seed=0)
    m.set_binarized_layers(m.config.mixed_layers)
    return m


def test_packed_tensors_have_the_documented_dtypes(model):
    sd = ex.packed_state_dict(model)
    assert sd["bert.embeddings.word_embeddings.weight_q"].dtype == torch.int8
    assert sd["bert.embeddings.word_embeddings.weight_range"].dtype == torch.float16
    assert sd["bert.encoder.layer.0.output.dense.weight_q"].dtype == torch.int8
    bits = sd["bert.encoder.layer.2.intermediate.dense.weight_bits"]
    assert bits.dtype == torch.uint8 and bits.shape == (52, 4)  # K=32 -> 4 bytes
    bits2 = sd["bert.encoder.layer.2.output.dense.weight_bits"]
    assert bits2.shape == (32, 7)  # K=52 -> 7 bytes (padded)
    assert sd["bert.embeddings.token_type_embeddings.weight"].dtype == torch.float16
    assert sd["classifier.weight"].dtype == torch.float16
    assert not any(k.endswith(".weight") and k.replace(".weight", ".weight_q") in sd for k in sd)
    assert not any("position_ids" in k for k in sd)


def test_packed_values_reproduce_the_final_weights(model):
    sd = ex.packed_state_dict(model)
    w = model.bert.encoder.layer[1].attention.self.key.weight.detach()
    lo, hi = sd["bert.encoder.layer.1.attention.self.key.weight_range"].float()
    w_hat = index8_dequantize(sd["bert.encoder.layer.1.attention.self.key.weight_q"], lo, hi)
    assert (w - w_hat).abs().max() <= (hi - lo) / 255  # min/max are those of the final weights (bug 6)
    wb = model.bert.encoder.layer[2].output.dense.weight.detach()
    assert torch.equal(unpack_signs(sd["bert.encoder.layer.2.output.dense.weight_bits"], wb.shape[1]),
                       torch.where(wb > 0, 1.0, -1.0))


def test_rounding_to_fp16_makes_the_model_what_the_checkpoint_stores(model):
    quantized = model.quantized_weight_names()
    assert "bert.encoder.layer.2.output.dense.weight" in quantized and "classifier.weight" not in quantized
    before = model.classifier.weight.detach().clone()
    master = model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    assert model.round_float_tensors_to_fp16_() > 0
    assert torch.equal(model.classifier.weight, before.half().float())
    sd, state = ex.packed_state_dict(model), model.state_dict()
    for name, t in sd.items():
        if t.dtype == torch.float16 and name in state:  # every float tensor: the checkpoint's value exactly
            assert torch.equal(t.float(), state[name]), name
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, master)  # fp32 masters of 8-bit weights stay


def test_export_writes_the_certified_files(model, tiny_vocab, tmp_path):
    from transformers import BertTokenizer

    out = ex.export_checkpoint(model, tmp_path / "ckpt", BertTokenizer(tiny_vocab), extra_json={"m.json": {"a": 1}})
    names = set(os.listdir(out))
    assert {"config.json", "pytorch_model.bin", "model.safetensors", "vocab.txt", "tokenizer_config.json",
            "special_tokens_map.json", "m.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sensimix_format"] == checkpoint.FORMAT and cfg["num_8bit_layers"] == 2 and cfg["model_type"] == "sensimix"
    assert cfg["sensimix_checksum"]["tensors"] == checkpoint.tensors_digest(load_file(out / "model.safetensors"))
    a = torch.load(out / "pytorch_model.bin", weights_only=True)
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_export_refuses_existing_folder_unless_overwrite(model, tmp_path):
    out = tmp_path / "ckpt"
    ex.export_checkpoint(model, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ex.export_checkpoint(model, out)
    ex.export_checkpoint(model, out, overwrite=True)
    assert (out / "pytorch_model.bin").exists()


def test_interrupted_export_leaves_nothing_behind(model, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ex.export_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # no temp folder, no lock file left


def test_failed_overwrite_keeps_the_previous_checkpoint(model, tmp_path, monkeypatch):
    out = ex.export_checkpoint(model, tmp_path / "ckpt")
    before = (out / "pytorch_model.bin").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ex.export_checkpoint(model, out, overwrite=True)
    assert (out / "pytorch_model.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_binarizes_an_unfinished_schedule_with_a_warning(tiny_bert_config, tmp_path, caplog):
    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0)
    with caplog.at_level("WARNING"):
        ex.export_checkpoint(m, tmp_path / "ckpt")
    assert "binarized only layers []" in caplog.text


def test_bert_base_2_plus_1_is_at_most_the_certified_size(tmp_path):
    """The certified (2+1) was 42.2 MB; ours must not be larger (bert-base geometry, random weights)."""
    m = from_bert("random:bert-base", num_hidden_layers=3, num_8bit_layers=2, seed=0)
    m.set_binarized_layers([2])
    out = ex.export_checkpoint(m, tmp_path / "ckpt")
    size = (out / "pytorch_model.bin").stat().st_size
    assert size <= 42.25e6
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        bert = BertForSequenceClassification(BertConfig(num_labels=2))
    fp32_bytes = 4 * sum(p.numel() for p in bert.parameters())  # a lower bound of BERT's pytorch_model.bin
    assert size / fp32_bytes <= 0.0965  # 9.6% as the certified report rounds 42.2 / 438.0


def test_diverged_weights_are_refused_before_anything_is_written(model, tmp_path):
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
        model.bert.encoder.layer[0].attention.self.query.weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="2 tensor\\(s\\) hold NaN or inf .*training diverged.*Nothing was written"):
        ex.export_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_convert_gives_the_inference_model_in_memory(model, tmp_path):
    from sensimix import SensiMixForSequenceClassification

    packed = ex.convert(model.eval(), device="cpu", precision="fp32")
    assert isinstance(packed, SensiMixForSequenceClassification) and packed.exact
    assert packed.state_dict().keys() == ex.packed_state_dict(model).keys()
    folder = ex.export_checkpoint(model, tmp_path / "ckpt")
    loaded = SensiMixForSequenceClassification.from_pretrained(folder)
    ids = torch.randint(5, 120, (3, 9))
    assert torch.equal(packed(ids).logits, loaded(ids).logits)
