"""The quantization-aware model: construction, initialisation from a BERT, STE behaviour, ILF control."""

import pytest
import torch
from transformers import BertConfig

from sensimix.qat import (
    Fp16Embedding,
    Fp16LayerNorm,
    Fp16Linear,
    FakeBinaryLinear,
    FakeIndex8Embedding,
    FakeIndex8Linear,
    SensiMixQATForSequenceClassification,
    from_bert,
)
from sensimix.quant import index8_fake_quant, sign
from sensimix.sources import SourceError


def _inputs(vocab=120, b=3, t=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    tt = torch.zeros_like(ids)
    tt[:, t // 2:] = 1
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=torch.ones_like(ids))


def test_module_roles_follow_the_split(tiny_bert_config):
    m = from_bert(tiny_bert_config, num_hidden_layers=3, num_8bit_layers=1, seed=0)
    emb = m.bert.embeddings
    assert isinstance(emb.word_embeddings, FakeIndex8Embedding) and isinstance(emb.position_embeddings, FakeIndex8Embedding)
    assert type(emb.token_type_embeddings) is Fp16Embedding  # token types stay floating point (fp16 on disk)
    assert type(emb.LayerNorm) is Fp16LayerNorm
    for i, layer in enumerate(m.bert.encoder.layer):
        assert isinstance(layer.attention.self.query, FakeIndex8Linear)
        assert isinstance(layer.attention.output.dense, FakeIndex8Linear)
        ffn = FakeBinaryLinear if i >= 1 else FakeIndex8Linear
        assert type(layer.intermediate.dense) is ffn and type(layer.output.dense) is ffn
        assert type(layer.attention.output.LayerNorm) is Fp16LayerNorm and type(layer.output.LayerNorm) is Fp16LayerNorm
    assert type(m.bert.pooler.dense) is Fp16Linear and type(m.classifier) is Fp16Linear
    assert len(m.bert.encoder.layer) == 3


def test_initialised_from_first_n_layers_of_the_teacher(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    teacher = BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    m = from_bert(tiny_bert_dir, num_hidden_layers=2, num_8bit_layers=1)
    for i in range(2):
        assert torch.equal(m.bert.encoder.layer[i].output.dense.weight, teacher.bert.encoder.layer[i].output.dense.weight)
    assert torch.equal(m.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(m.classifier.weight, teacher.classifier.weight)  # same num_labels: the head is kept


def test_loading_says_briefly_what_was_dropped(tiny_bert_dir, caplog, capfd):
    import logging

    with caplog.at_level(logging.INFO, logger="sensimix"):
        from_bert(tiny_bert_dir, num_hidden_layers=2, num_8bit_layers=1, num_labels=3)
    assert "dropped layers 2-3" in caplog.text
    assert "re-initialised" in caplog.text and "classifier.weight" in caplog.text  # 3 labels, not 2: new head
    out = capfd.readouterr()
    assert "UNEXPECTED" not in out.out + out.err  # no per-tensor table from transformers


def test_deeper_than_teacher_and_bad_sources_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match=r"num_hidden_layers .* must be in \[1, 4\]"):
        from_bert(tiny_bert_dir, num_hidden_layers=5, num_8bit_layers=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_bert(tmp_path, num_hidden_layers=1, num_8bit_layers=1)
    with pytest.raises(SourceError, match="unknown random geometry"):
        from_bert("random:bert-huge")


def test_regression_heads_and_heads_no_reader_loads_are_refused(tiny_bert_config):
    with pytest.raises(ValueError, match="num_labels must be in \\[2, 100000\\]"):
        from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, num_labels=1)
    with pytest.raises(ValueError, match="num_labels must be in \\[2, 100000\\] .*got 100001"):  # no reader loads it
        from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, num_labels=100_001)


def test_token_type_ids_reach_the_model(tiny_bert_config):
    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0).eval()
    x = _inputs()
    with torch.no_grad():
        a = m(**x).logits
        b = m(**{**x, "token_type_ids": torch.zeros_like(x["token_type_ids"])}).logits
    assert not torch.allclose(a, b)


def test_forward_matches_a_hand_computed_quantized_bert(tiny_bert_config):
    """Eval logits equal a plain BERT whose weights are replaced by their quantized values."""
    from transformers import BertForSequenceClassification

    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0).eval()
    m.set_binarized_layers([1])
    plain = BertForSequenceClassification(BertConfig(**{**tiny_bert_config.to_dict(), "num_hidden_layers": 2})).eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for name, mod in m.named_modules():
        if isinstance(mod, (FakeIndex8Linear, FakeIndex8Embedding)):
            state[f"{name}.weight"] = index8_fake_quant(mod.weight.detach())
        elif isinstance(mod, FakeBinaryLinear):
            state[f"{name}.weight"] = sign(mod.weight.detach())
    plain.load_state_dict(state)
    # binarized inputs: wrap the two FFN linears of layer 1
    layer = plain.bert.encoder.layer[1]
    for parent in (layer.intermediate, layer.output):
        lin = parent.dense
        parent.dense = torch.nn.Sequential()
        parent.dense.add_module("sign", _Sign())
        parent.dense.add_module("lin", lin)
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(m(**x).logits, plain(**x).logits, atol=1e-5)


class _Sign(torch.nn.Module):
    def forward(self, x):
        return sign(x)


def test_ste_reaches_binary_weights_in_every_phase(tiny_bert_config):
    """Reference bug 1: the 1-bit weights must keep receiving gradients once binarized."""
    m = from_bert(tiny_bert_config, num_hidden_layers=3, num_8bit_layers=1, seed=0)
    for layers in ([], [2], [1, 2]):
        m.set_binarized_layers(layers)
        m.zero_grad()
        out = m(**_inputs(), labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        for _, lin in m.binary_linears():
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
        assert m.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # 8-bit STE


def test_binarized_layers_control(tiny_bert_config):
    m = from_bert(tiny_bert_config, num_hidden_layers=4, num_8bit_layers=2, seed=0)
    assert m.binarized_layers == []
    m.set_binarized_layers([3])
    assert m.binarized_layers == [3]
    with pytest.raises(ValueError, match=r"layers \[1\] have no 1-bit FFN"):
        m.set_binarized_layers([1])


def test_abwr_loss_covers_only_binary_ffns(tiny_bert_config):
    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0)
    for _, lin in m.binary_linears():
        torch.nn.init.constant_(lin.weight, 1.0)
    assert m.abwr_loss().item() == 0.0
    m0 = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=2, seed=0)
    assert m0.abwr_loss().item() == 0.0 and list(m0.binary_linears()) == []


def test_save_and_reload_training_checkpoint(tiny_bert_config, tmp_path):
    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0).eval()
    m.save_pretrained(tmp_path)
    back = SensiMixQATForSequenceClassification.from_pretrained(tmp_path).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(m(**x).logits, back(**x).logits)


def test_binary_linear_adds_a_tiny_bias_after_the_product():
    """A ±1 product of 0 plus a bias of 2^-24 is 2^-24 > 0 (sign +1), as the packed model computes it. Inside
    F.linear's addmm a GEMM blocked along K adds partial sums to the bias, (b + 1536) - 1536 = 0, and the sign
    flipped to -1 (seen on pre-trained MiniLM, whose layer 4 holds such a bias)."""
    k = 3072
    lin = FakeBinaryLinear(k, 2)
    lin.binarized = True
    half = torch.cat([torch.ones(k // 2), -torch.ones(k // 2)])
    with torch.no_grad():
        lin.weight.copy_(torch.stack([half, half.flip(0)]))
        lin.bias.copy_(torch.tensor([2.0 ** -24, -(2.0 ** -24)]))
    y = lin(torch.ones(5, k))
    assert (y[:, 0] == 2.0 ** -24).all() and (y[:, 1] == -(2.0 ** -24)).all()


def test_packed_folder_is_not_a_bert_source(tmp_path, tiny_bert_config):
    from sensimix.export import export_checkpoint

    m = from_bert(tiny_bert_config, num_hidden_layers=2, num_8bit_layers=1, seed=0)
    folder = export_checkpoint(m, tmp_path / "packed")
    with pytest.raises(SourceError, match="is a packed SensiMix checkpoint .* not a BERT"):
        from_bert(folder, num_hidden_layers=2, num_8bit_layers=1)


def test_missing_encoder_weights_are_an_error(tiny_bert_dir, tmp_path):
    """A folder whose weights do not cover the encoder would train from random weights: refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_bert_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "layer.0." not in k}, str(folder / "model.safetensors"))
    with pytest.raises(SourceError, match="lacks .* encoder weight"):
        from_bert(folder, num_hidden_layers=2, num_8bit_layers=1)


def test_the_forward_computes_with_the_fp16_values_the_checkpoint_stores():
    """Every float tensor the checkpoint stores in fp16 is rounded to fp16 in the forward (identity gradient): moving
    a master value by a quarter of an fp16 step changes no output, and gradients still reach every master value."""
    from sensimix.export import packed_state_dict

    torch.manual_seed(0)
    model = from_bert(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=16), num_hidden_layers=2,
                      num_8bit_layers=1, num_labels=2).eval()
    model.set_binarized_layers([1])
    stored_fp16 = {n for n, t in packed_state_dict(model).items()
                   if t.dtype == torch.float16 and not n.endswith(".weight_range")}  # ranges: fp16 by design
    params = dict(model.named_parameters())
    assert stored_fp16 and stored_fp16 <= set(params)  # biases, LayerNorms, token types, pooler, classifier
    ids, types = torch.randint(0, 50, (3, 7)), torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3)
    with torch.no_grad():
        for name in stored_fp16:
            params[name].copy_(params[name].half().float())
        exact = model(input_ids=ids, token_type_ids=types).logits
        for name in stored_fp16:  # a quarter of an fp16 step (normal range) off the stored value, either way
            p = params[name]
            p.add_(p.abs().clamp_min(2 ** -14) * 2 ** -13 * torch.where(torch.rand_like(p) < 0.5, -1.0, 1.0))
            assert not torch.equal(p, p.half().float())
        moved = model(input_ids=ids, token_type_ids=types).logits
    assert torch.equal(moved, exact)
    model.train()
    model(input_ids=ids, token_type_ids=types, labels=torch.tensor([0, 1, 0])).loss.backward()
    no_gradient = sorted(n for n in stored_fp16 if params[n].grad is None or not params[n].grad.abs().sum() > 0)
    assert no_gradient == [], "the straight-through gradient reaches every fp16-stored master value"
