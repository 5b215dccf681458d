"""The packed inference model: same logits as the QAT model, packed weights, precision recipes, clear errors."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import GEOMETRY, build_qat
from safetensors.torch import load_file, save_file

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import kernels
from sensimix.checkpoint import CheckpointError
from sensimix.export import convert, export_checkpoint
from sensimix.inference import Packing, make_plan, plan

FIXTURE = Path(__file__).parent / "fixtures" / "packed-v1-main"


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


def ragged_batch(seed: int = 4, bsz: int = 9, seq: int = 24) -> dict[str, torch.Tensor]:
    """Lengths from 1 to seq (one unpadded row), two segments, padding at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, GEOMETRY["vocab_size"], (bsz, seq), generator=g)
    lengths = torch.tensor([seq, 1, 2, 5, 9, 13, 17, 20, 23][:bsz])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    types = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": types}


def qat_logits(qat, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return qat(**inputs).logits


def run(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------------
# the same computation as the QAT model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_kernel", ["int8", "popcount", "fbgemm", "float", "fp8", "reference"])
@pytest.mark.parametrize("index8_kernel", ["dense", "dequant"])
def test_fp32_logits_equal_qat_eval(packed, binary_kernel: str, index8_kernel: str) -> None:
    qat, folder = packed
    reason = kernels.BINARY_KERNELS[binary_kernel].unavailable(torch.device("cpu"))
    if reason and binary_kernel == "popcount":
        pytest.skip(reason)
    model = Packed.from_pretrained(folder, binary_kernel=binary_kernel, index8_kernel=index8_kernel)
    assert model.exact
    for inputs in (batch(), ragged_batch()):
        got, want = run(model, inputs), qat_logits(qat, inputs)
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("skip_padding,fuse_qkv", [(False, False), (True, False), (False, True)])
def test_padding_skip_and_qkv_fusion_change_only_the_work(packed, skip_padding: bool, fuse_qkv: bool) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder, skip_padding=skip_padding, fuse_qkv=fuse_qkv)
    assert (model.plan.skip_padding, model.plan.fuse_qkv) == (skip_padding, fuse_qkv) and model.exact
    inputs = ragged_batch()
    assert (run(model, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_defaults_without_mask_or_token_types(packed) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder)
    assert (model.index8_kernel, model.dtype, model.precision) == ("dequant", torch.float32, "fp32")
    assert model.binary_kernel == kernels.default_binary_kernel("cpu")
    ids = batch()["input_ids"]
    assert (run(model, {"input_ids": ids}) - qat_logits(qat, {"input_ids": ids})).abs().max().item() <= 1e-5


def test_binary_ffn_is_not_trivially_skipped(packed) -> None:
    # guard against a runtime that matches only because the 1-bit FFN contributes nothing: flipping one weight
    # column of the mixed layer must change the logits
    qat, folder = packed
    model = Packed.from_pretrained(folder, binary_kernel="float")
    inputs = batch()
    before = run(model, inputs)
    model.bert.encoder.layer[-1].output.dense.op_weight[:, 0] *= -1
    assert (run(model, inputs) - before).abs().max().item() > 1e-3


@pytest.mark.parametrize("precision,rel", [("fp16", 0.01), ("bf16", 0.05)])
def test_half_precision_is_close(packed, precision: str, rel: float) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder, precision=precision)
    inputs = batch()
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert got.dtype == model.dtype and not model.exact
    assert (got.float() - want).abs().max().item() <= rel * want.abs().max().item()


def test_int8_activation_kernel_is_opt_in_and_close(packed) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder, index8_kernel="int8")
    assert not model.exact
    inputs = batch()
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert (got - want).abs().max().item() <= 0.01 * want.abs().max().item()


def test_labels_give_the_cross_entropy_loss(packed) -> None:
    model = Packed.from_pretrained(packed[1])
    inputs = batch()
    labels = torch.tensor([0, 1, 1, 0, 1])
    out = model(**inputs, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model(**inputs, return_dict=False)[0].shape == (5, 2)


# ---------------------------------------------------------------------------------------------------
# weights stay packed; the buffers are the format
# ---------------------------------------------------------------------------------------------------
def test_weights_stay_packed(packed) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder, binary_kernel="int8")
    emb = model.bert.embeddings
    assert emb.word_embeddings.weight_q.dtype == emb.position_embeddings.weight_q.dtype == torch.int8
    layer0, layer3 = model.bert.encoder.layer[0], model.bert.encoder.layer[3]
    assert layer0.attention.output.dense.op_weight.dtype == torch.int8
    assert layer0.intermediate.dense.op_weight.dtype == torch.int8
    assert layer3.intermediate.dense.op_weight.dtype == torch.int8  # ±1 operand of the int8 kernel
    assert layer3.intermediate.dense.weight_bits.dtype == torch.uint8
    fp32_params = sum(p.numel() * 4 for p in qat.parameters())
    assert model.weight_bytes() < 0.45 * fp32_params
    dense = Packed.from_pretrained(folder, index8_kernel="dense")
    assert dense.weight_bytes() > model.weight_bytes() + 0.5 * fp32_params  # dense fp32 copies of every 8-bit weight
    big = [n for n, t in model.named_buffers() if t.is_floating_point() and t.numel() >= 100 * 64]
    assert not big, f"fp tensors as large as the embedding table: {big}"


def test_state_dict_is_exactly_the_checkpoint(packed) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder)
    file = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == file.keys()  # kernel operands are not part of it
    assert all(torch.equal(state[k], file[k]) for k in file)
    spec = Packed.checkpoint_spec(qat.config)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in file.items()} == spec


def test_save_pretrained_round_trips(packed, tmp_path) -> None:
    qat, folder = packed
    model = Packed.from_pretrained(folder)
    out = model.save_pretrained(tmp_path / "again")
    again = Packed.from_pretrained(out)
    assert torch.equal(run(again, batch()), run(model, batch()))
    with pytest.raises(FileExistsError, match="--overwrite"):
        model.save_pretrained(out)


def test_checkpoint_written_by_main_before_the_redesign_loads_with_identical_logits() -> None:
    """unit/fixtures/packed-v1-main was written by main at 5990d3e (the old export and runtime), with the logits
    that runtime gave; the redesigned loader must reproduce them."""
    expected = json.loads((FIXTURE.parent / "packed-v1-main.expected.json").read_text())
    inputs = {k: torch.tensor(expected[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    want = torch.tensor(expected["logits_exact_fp32"])
    for kwargs in ({}, {"skip_padding": False, "fuse_qkv": False}, {"weights": "pytorch_model.bin"}):
        got = run(Packed.from_pretrained(FIXTURE, **kwargs), inputs)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert (got - want).abs().max().item() <= 1e-6, kwargs


def test_pytorch_model_bin_fallback(packed, copy_of) -> None:
    qat, _ = packed
    (copy_of / "model.safetensors").unlink()
    model = Packed.from_pretrained(copy_of)
    assert model.source_file.name == "pytorch_model.bin"
    assert (run(model, batch()) - qat_logits(qat, batch())).abs().max().item() <= 1e-5


def test_three_plus_three_and_all_8bit(tmp_path) -> None:
    for layers, eightbit in ((6, 3), (2, 2), (2, 0)):
        qat = build_qat(layers, eightbit, seed=layers + eightbit)
        model = Packed.from_pretrained(export_checkpoint(qat, tmp_path / f"m{layers}{eightbit}"))
        inputs = batch(seed=layers)
        assert (run(model, inputs) - qat_logits(qat, inputs)).abs().max().item() <= 1e-5


def test_convert_in_memory_equals_the_loaded_folder(packed) -> None:
    qat, folder = packed
    assert torch.equal(run(convert(qat, device="cpu"), ragged_batch()),
                       run(Packed.from_pretrained(folder), ragged_batch()))


def test_to_another_device_or_dtype(packed) -> None:
    model = Packed.from_pretrained(packed[1])
    assert model.to("cpu") is model and model.cpu() is model
    with pytest.raises(ValueError, match="cannot be cast to torch.float16 with .to\\(\\).*precision="):
        model.half()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            model.to("cuda")


def test_casts_and_training_are_refused(packed) -> None:
    model = Packed.from_pretrained(packed[1])
    with pytest.raises(ValueError, match="cannot be cast to torch.float64"):
        model.double()
    with pytest.raises(ValueError, match="cannot be cast with .type\\(torch.float64\\)"):
        model.type(torch.float64)  # nn.Module.type would cast the int8 indices and sign bits too
    with pytest.raises(ValueError, match="inference-only.*sensimix.qat"):
        model.train()
    assert model.eval() is model and not model.training


def test_to_a_device_keeps_the_kernels_asked_for(packed) -> None:
    model = Packed.from_pretrained(packed[1], binary_kernel="reference", index8_kernel="reference")
    before = run(model, batch())
    model.to("cpu:0")  # another device name: the kernels are prepared anew, with the same request
    assert (model.binary_kernel, model.index8_kernel) == ("reference", "reference")
    assert torch.equal(run(model, batch()), before)


def test_stored_tensors_are_what_runs_and_what_is_saved(packed, tmp_path) -> None:
    model = Packed.from_pretrained(packed[1])
    before = run(model, batch())
    state = model.state_dict()
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    model.load_state_dict(state)  # re-prepares: the forward computes with what was loaded
    after = run(model, batch())
    assert not torch.equal(after, before)
    assert torch.equal(after, after[:1].expand_as(after)), "a zero classifier gives its bias for every row"
    assert torch.equal(run(Packed.from_pretrained(model.save_pretrained(tmp_path / "zeroed")), batch()), after)
    # an in-place edit or a model-field edit is not what runs: saving it is refused, nothing written
    model = Packed.from_pretrained(packed[1])
    model.classifier.bias.add_(1)
    with pytest.raises(ValueError, match="stored tensors were changed in place after the kernels were prepared"):
        model.save_pretrained(tmp_path / "edited")
    model.prepare(model.plan)  # now it runs with the edit, and may be saved
    model.save_pretrained(tmp_path / "edited")
    model = Packed.from_pretrained(packed[1])
    model.config.layer_norm_eps = 1e-2  # fixes the LayerNorms when the model is built: no prepare changes it
    for action in (lambda: model.prepare(model.plan), lambda: model.save_pretrained(tmp_path / "eps")):
        with pytest.raises(ValueError, match="model fields of the config .* were changed after the model was built"):
            action()
    assert not (tmp_path / "eps").exists()
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="load_state_dict: .* has dtype torch.float32, expected torch.float16"):
        model.load_state_dict(state, assign=True)  # it would run, and save a folder that does not load


def test_save_pretrained_overwrite_keeps_the_folders_other_files(packed, tmp_path, tiny_vocab) -> None:
    from transformers import BertTokenizer

    folder = Path(shutil.copytree(packed[1], tmp_path / "model"))
    (folder / "NOTES.md").write_text("mine")
    (folder / "extra.bin").write_bytes(b"old weights")  # another weight file is not carried over, nor the old
    (folder / "training_metrics.json").write_text("{}")  # model's training record
    before = sorted(p.name for p in folder.iterdir())
    Packed.from_pretrained(folder).save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(before) - {"extra.bin", "training_metrics.json"})
    # transformers' pattern: the tokenizer saved first, then the model into the same folder (no overwrite needed:
    # nothing is replaced); a link to a folder: the folder it names is written
    both = tmp_path / "both"
    BertTokenizer(tiny_vocab).save_pretrained(both)
    Packed.from_pretrained(folder).save_pretrained(both)
    assert {"tokenizer_config.json", "config.json", "model.safetensors"} <= {p.name for p in both.iterdir()}
    (tmp_path / "link").symlink_to(both)
    Packed.from_pretrained(folder).save_pretrained(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and (both / "tokenizer_config.json").is_file()
    assert (folder / "NOTES.md").read_text() == "mine"
    assert torch.equal(run(Packed.from_pretrained(folder), batch()), run(Packed.from_pretrained(packed[1]), batch()))


def test_carried_files_keep_their_permissions_and_links_are_never_followed(packed, tmp_path) -> None:
    folder = Path(shutil.copytree(packed[1], tmp_path / "model"))
    secret = tmp_path / "id_rsa"  # a private file outside the folder, named by a link a hostile folder carries
    secret.write_text("key")
    secret.chmod(0o600)
    (folder / "notes.txt").symlink_to(secret)
    (folder / "TOKEN").write_text("t")
    (folder / "TOKEN").chmod(0o600)
    Packed.from_pretrained(folder).save_pretrained(folder, overwrite=True)
    assert (secret.stat().st_mode & 0o777) == 0o600 and (folder / "notes.txt").is_symlink()
    assert ((folder / "TOKEN").stat().st_mode & 0o777) == 0o600  # carried: its own mode
    written = (folder / "model.safetensors").stat().st_mode & 0o777  # written: the umask's (safetensors makes 0600)
    assert written == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_auto_class_arguments_are_applied_or_refused(packed) -> None:
    from transformers import AutoModelForSequenceClassification as Auto

    folder = packed[1]
    assert isinstance(Auto.from_pretrained(folder, return_dict=False)(**batch()), tuple)
    assert Auto.from_pretrained(folder, id2label={0: "neg", 1: "pos"}).config.id2label == {0: "neg", 1: "pos"}
    with pytest.raises(ValueError, match="3 labels were asked for \\(num_labels / id2label\\), but the classifier"):
        Auto.from_pretrained(folder, num_labels=3)
    with pytest.raises(ValueError, match="cannot be changed at load time.*output_hidden_states=True"):
        Auto.from_pretrained(folder, output_hidden_states=True)
    with pytest.raises(ValueError, match="cannot be built from a config alone"):
        Auto.from_config(Packed.from_pretrained(folder).config)
    with pytest.raises(RuntimeError, match="holds no weights .* buffers are uninitialised"):
        Packed(Packed.from_pretrained(folder).config).prepare(make_plan("cpu"))  # built directly: NaN logits before
    assert Packed.from_pretrained(folder.parent, subfolder=folder.name).config.num_hidden_layers == 4
    # the same options given to the class directly; loader options at their no-op values are accepted
    direct = Packed.from_pretrained(folder, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
                                    return_dict=False, num_labels=2, variant=None, weights_only=True,
                                    output_loading_info=False, ignore_mismatched_sizes=False)
    assert direct.config.id2label == {0: "neg", 1: "pos"} and isinstance(direct(**batch()), tuple)
    with pytest.raises(ValueError, match="num_labels=3 was asked for, but the classifier has 2 outputs"):
        Packed.from_pretrained(folder, num_labels=3)


def test_trainer_evaluates_a_packed_model(packed, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = Packed.from_pretrained(packed[1])
    rows = [{k: v[i] for k, v in batch().items()} | {"labels": torch.tensor(i % 2)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to=[], per_device_eval_batch_size=2)
    metrics = Trainer(model=model, args=args, eval_dataset=rows).evaluate()  # before: num_items_in_batch refused
    want = torch.nn.functional.cross_entropy(run(model, batch())[:4], torch.tensor([0, 1, 0, 1]))
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-4)


def test_pipeline_classifies_and_logs_no_error(copy_of, tiny_vocab, caplog) -> None:
    from transformers import BertTokenizer, pipeline

    BertTokenizer(tiny_vocab).save_pretrained(copy_of)  # words of the tiny vocab have ids < GEOMETRY's 100
    with caplog.at_level("ERROR"):  # before: "The model 'SensiMixForSequenceClassification' is not supported ..."
        classify = pipeline("text-classification", model=str(copy_of))
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    out = classify(["the movie was good", "what a bad film"])
    assert len(out) == 2 and all(o["label"] in ("LABEL_0", "LABEL_1") and 0.5 <= o["score"] <= 1 for o in out)


# ---------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------
def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_not_a_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Packed.from_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Packed.from_pretrained(tmp_path)


def test_plain_bert_folder_is_refused(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    del cfg["sensimix_format"]
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json has no 'sensimix_format'.*not a SensiMix packed checkpoint"):
        Packed.from_pretrained(copy_of)


@pytest.mark.parametrize("text,match", [
    ("{not json", "config.json is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps({"sensimix_format": "packed-v9"}), "sensimix_format 'packed-v9' is not supported"),
    (json.dumps({"sensimix_format": "packed-v1", "num_hidden_layers": 2, "num_8bit_layers": 5}),
     "config.json: num_8bit_layers"),
])
def test_bad_config(copy_of, text: str, match: str) -> None:
    (copy_of / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        Packed.from_pretrained(copy_of)


@pytest.mark.parametrize("field,value,match", [
    ("num_attention_heads", 0, "num_attention_heads must be in \\[1,"),
    ("num_attention_heads", -4, "num_attention_heads must be in \\[1,"),
    ("hidden_size", "64", "hidden_size"),
    ("hidden_act", "mish", "hidden_act 'mish' is not supported"),
    ("layer_norm_eps", -1.0, "layer_norm_eps must be a finite number in \\(0, 1\\)"),
    ("layer_norm_eps", -1, "layer_norm_eps"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps"),
    ("num_hidden_layers", 100_000, "num_hidden_layers \\(N = a \\+ b\\) must be in \\[1, 256\\]"),
    ("vocab_size", 10 ** 12, "vocab_size must be in"),
    ("id2label", {"0": "only"}, "num_labels must be an integer in \\[2, 100000\\]"),
    ("id2label", {str(i): f"L{i}" for i in range(100_001)},
     "num_labels must be an integer in \\[2, 100000\\] .*got 100001"),
])
def test_tampered_config_values_are_one_clear_error(copy_of, field: str, value, match: str) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg[field] = value
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        Packed.from_pretrained(copy_of)


def test_a_valid_but_altered_model_field_is_caught_by_the_checksum(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5  # valid, but not what the weights were exported with
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="differ from those the weights were exported with"):
        Packed.from_pretrained(copy_of)


def test_label_names_may_be_edited(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "negative", "1": "positive"}, {"negative": 0, "positive": 1}
    (copy_of / "config.json").write_text(json.dumps(cfg))
    assert Packed.from_pretrained(copy_of).config.id2label[1] == "positive"


def test_truncated_safetensors(copy_of) -> None:
    path = copy_of / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read .* truncated or corrupt"):
        Packed.from_pretrained(copy_of)


def test_broken_safetensors_header(copy_of) -> None:
    path = copy_of / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        Packed.from_pretrained(copy_of)


def test_truncated_pytorch_model_bin(copy_of) -> None:
    (copy_of / "model.safetensors").unlink()
    path = copy_of / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load it with torch.load"):
        Packed.from_pretrained(copy_of)


def test_truncated_bin_beside_an_intact_safetensors_is_found(copy_of) -> None:
    path = copy_of / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    Packed.from_pretrained(copy_of)  # the safetensors file alone is fine
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load"):
        Packed.from_pretrained(copy_of, verify_all_files=True)


def test_no_weights_file(copy_of) -> None:
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        Packed.from_pretrained(copy_of)


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
    (lambda t: t[BITS].__setitem__((0, 0), t[BITS][0, 0] ^ 1), "tensors differ from those exported"),
])
def test_tampered_tensors(copy_of, change, match: str) -> None:
    rewrite_tensors(copy_of, change)
    with pytest.raises(CheckpointError, match="model\\.safetensors: .*" + match):
        Packed.from_pretrained(copy_of)


def test_config_geometry_mismatch(copy_of) -> None:
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["vocab_size"] = 101
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match="word_embeddings.weight_q has shape \\[100, 64\\], expected \\[101, 64\\]"):
        Packed.from_pretrained(copy_of)


# ---------------------------------------------------------------------------------------------------
# bad inputs and options
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_any_kernel(packed) -> None:
    model = Packed.from_pretrained(packed[1])
    ids = batch()["input_ids"]
    cases = [
        (dict(input_ids=torch.zeros(1, 33, dtype=torch.long)), "sequence length 33 .* max_position_embeddings=32"),
        (dict(input_ids=ids.clone().fill_(100)), "input_ids must lie in \\[0, 100\\) \\(vocab_size"),
        (dict(input_ids=ids, token_type_ids=torch.full_like(ids, 2)), "token_type_ids must lie in \\[0, 2\\)"),
        (dict(input_ids=ids, token_type_ids=torch.zeros(ids.shape)), "token_type_ids must be int64 or int32"),
        (dict(input_ids=ids, attention_mask=torch.ones(5, 3, dtype=torch.long)), "attention_mask has shape \\[5, 3\\]"),
        (dict(input_ids=ids, attention_mask=torch.full_like(ids, 2)), "attention_mask must hold only 0 and 1"),
        (dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(0, torch.tensor([1, 3]), 0)),
         "attention_mask row\\(s\\) \\[1, 3\\] attend no token"),
        (dict(input_ids=ids, attention_mask=torch.zeros_like(ids, dtype=torch.bool)), "row\\(s\\) \\[0, 1, 2, 3, 4\\]"),
        (dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)),
         "masks the first token of sequence\\(s\\) \\[0, 1, 2, 3, 4\\].*padding_side='right'"),
        (dict(input_ids=ids[0]), "input_ids must be a \\[batch, seq_len\\] tensor"),
        (dict(input_ids=ids.float()), "int64 or int32 token ids"),
        (dict(input_ids=torch.zeros(0, 8, dtype=torch.long)), "empty batch"),
        (dict(input_ids=ids.tolist()), "input_ids must be a tensor"),
        (dict(input_ids=ids, packing="packing"), "packing must be a Packing"),
        (dict(input_ids=ids, packing=Packing.of(batch()["attention_mask"])), "packing was given without the attention"),
        (dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([7]), 0),
              packing=Packing.of(batch()["attention_mask"])), "packing was made from another attention mask"),
        (dict(input_ids=ids, output_attentions=True), "does not support \\['output_attentions'\\]"),
        (dict(input_ids=ids, labels=torch.full((5,), 0.5)), "labels must be integer class ids in \\[0, 2\\)"),
        (dict(input_ids=ids, labels=torch.tensor([0, 1, 1, 0, 2])), "labels must lie in \\[0, 2\\)"),
        (dict(input_ids=ids, labels=torch.tensor([0, 1, -1, 0, 1])), "labels must lie in \\[0, 2\\)"),
        (dict(input_ids=ids, labels=torch.tensor([0, 1])), "labels has 2 value\\(s\\) .* \\[5\\]"),
        (dict(input_ids=ids, labels=[0, 1, 1, 0, 1]), "labels must be a tensor"),
    ]
    for inputs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**inputs)
    with pytest.raises(ValueError, match="got a dict of \\['attention_mask', 'input_ids', 'token_type_ids'\\]: .*"
                                         "model\\(\\*\\*inputs\\)"):
        model(batch())  # the tokenizer's output passed whole
    model(**batch(), output_attentions=0, output_hidden_states=False)  # "not asked for", however it is spelled


def test_bad_load_options(packed) -> None:
    folder = packed[1]
    with pytest.raises(ValueError, match="unknown binary kernel"):
        Packed.from_pretrained(folder, binary_kernel="nope")
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        Packed.from_pretrained(folder, precision=torch.float64)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, fast"):
        Packed.from_pretrained(folder, precision="int4")
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16, fast or a torch float dtype"):
        Packed.from_pretrained(folder, precision=16)
    with pytest.raises(TypeError, match="unexpected argument\\(s\\) \\['hidden_size'\\]"):
        Packed.from_pretrained(folder, hidden_size=3)
    for flag in ("check_inputs", "compile", "verify_all_files"):  # "no" is truthy: a switch takes a bool only
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
            Packed.from_pretrained(folder, **{flag: "no"})
    with pytest.raises(ValueError, match="precision='fp32', torch_dtype=torch.float16 ask for different precisions"):
        Packed.from_pretrained(folder, precision="fp32", torch_dtype=torch.float16)
    assert Packed.from_pretrained(folder, precision="fp16", dtype=torch.float16, torch_dtype="auto").precision == "fp16"
    with pytest.raises(ValueError, match="device='cpu' and device_map='cuda' name different devices"):
        Packed.from_pretrained(folder, device="cpu", device_map="cuda")
    assert Packed.from_pretrained(folder, device="cpu", device_map="auto").device.type == "cpu"
    assert Packed.from_pretrained(folder, device="cpu", device_map={"": "cpu:0"}).device.type == "cpu"
    assert Packed.from_pretrained(folder, precision="fast", dtype=torch.float32).precision == "fast"  # fast is fp32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Packed.from_pretrained(folder, device="cuda")


def test_fuse_qkv_needs_a_fusable_kernel(packed) -> None:
    with pytest.raises(ValueError, match="fuse_qkv=True, but the index8 kernel 'int8' cannot fuse"):
        Packed.from_pretrained(packed[1], index8_kernel="int8", fuse_qkv=True)
    assert not Packed.from_pretrained(packed[1], index8_kernel="int8").plan.fuse_qkv


# ---------------------------------------------------------------------------------------------------
# the fast precision and skipping padded tokens
# ---------------------------------------------------------------------------------------------------
def test_fast_precision_wiring(packed) -> None:
    model = Packed.from_pretrained(packed[1], precision="fast")
    assert model.precision == "fast" and model.dtype == torch.float32 and model.skip_padding
    assert model.index8_kernel == plan.fast_index8_kernel("cpu") and model.exact
    *layers, last = model.bert.encoder.layer
    assert all(layer.attention.qkv is not None for layer in layers)
    assert last.attention.kv is not None, "the last layer fuses K and V (its Q runs for the pooled tokens only)"


@pytest.mark.parametrize("index8_kernel", ["bf16", "fbgemm"])
def test_fast_logits_close_to_exact(packed, index8_kernel: str) -> None:
    # bf16 rounds each GEMM operand to 8 significant bits; fbgemm rounds activations to 1/255 of their range.
    # Through the two 8-bit layers, LayerNorms and the pooler, 1% of the logit scale covers both with a wide
    # margin, while a wrong Q/K/V order, a lost bias, c term or GELU is O(1).
    reason = kernels.INDEX8_KERNELS[index8_kernel].unavailable(torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    # A pre-activation near 0 can cross it under rounding and flip one input of a 1-bit FFN: a row may then move
    # by a few percent (agreement on trained models is measured by the V&V), but most rows stay within 1%.
    qat, folder = packed
    model = Packed.from_pretrained(folder, precision="fast", index8_kernel=index8_kernel)
    inputs = {k: torch.cat([batch()[k], ragged_batch(seq=20)[k]]) for k in batch()}
    got, want = run(model, inputs), qat_logits(qat, inputs)
    assert got.dtype == torch.float32
    row_error = (got - want).abs().amax(dim=1) / want.abs().max()
    assert (row_error <= 0.01).float().mean() >= 0.75 and row_error.max() <= 0.1, row_error


def test_fast_keeps_the_one_bit_ffn_exact(packed) -> None:
    # same input -> bitwise the same output: exact ±1 GEMM, fp32 bias, fp32 residual and LayerNorm
    exact = Packed.from_pretrained(packed[1])
    fast = Packed.from_pretrained(packed[1], precision="fast", index8_kernel="bf16")
    x = torch.randn(3, 7, GEOMETRY["hidden_size"], generator=torch.Generator().manual_seed(0))
    x[0, 0, :5] = 0.0  # sign(0) = -1 on both paths
    with torch.inference_mode():
        for n in exact.config.mixed_layers:
            a, b = exact.bert.encoder.layer[n], fast.bert.encoder.layer[n]
            assert torch.equal(b.output(b.intermediate(x), x), a.output(a.intermediate(x), x))


@pytest.mark.parametrize("span_step", [32, 4])
def test_skip_padding_leaves_exact_logits_unchanged(packed, monkeypatch, span_step: int) -> None:
    # span_step 4 puts the ragged batch's sequences in 6 attention groups
    monkeypatch.setattr(Packing, "SPAN_STEP", span_step)
    qat, folder = packed
    padded = Packed.from_pretrained(folder, skip_padding=False)
    skipped = Packed.from_pretrained(folder)
    assert skipped.exact and skipped.skip_padding
    inputs = ragged_batch()
    packing = Packing.of(inputs["attention_mask"])
    assert len(packing.groups) == (6 if span_step == 4 else 1)
    assert len(packing.index) == int(inputs["attention_mask"].sum())
    got, want = run(skipped, inputs), run(padded, inputs)
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item() + 1e-7
    assert (got - qat_logits(qat, inputs)).abs().max().item() <= 1e-5
    # a packing made beforehand (as the V&V staging does on CUDA) gives the same logits
    with torch.inference_mode():
        given = skipped(**inputs, packing=packing).logits
    assert torch.equal(given, got)
    with pytest.raises(ValueError, match="packing was made for a \\[9, 24\\] mask"):
        skipped(**batch(), packing=packing)


def test_packed_attention_differentiates_and_keeps_earlier_results() -> None:
    # on CPU the group layouts go through one reused buffer (not under autograd, which must save them)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    packing = Packing.of(mask)
    tokens = int(mask.sum())
    qkv, x = torch.randn(tokens, 3, 2, 4, requires_grad=True), torch.randn(tokens, 8, requires_grad=True)
    u = torch.randn(4, 2, 8, requires_grad=True)
    graded, mixed = packing.attention(qkv, 0.5), packing.mix_first(u, x)
    (graded.square().sum() + mixed.square().sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (qkv, x, u))
    with torch.inference_mode():
        first = packing.attention(qkv.detach(), 0.5)
        kept = first.clone()
        packing.attention(torch.randn(tokens, 3, 2, 4), 0.5)
        torch.testing.assert_close(packing.mix_first(u.detach(), x.detach()), mixed.detach())
    assert torch.equal(first, kept)
    torch.testing.assert_close(graded.detach(), first)


def test_packing_layout() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    packing = Packing.of(mask)
    assert sorted(packing.index.tolist()) == mask.reshape(-1).nonzero().squeeze(1).tolist()
    assert torch.equal(packing.index[packing.cls], torch.arange(4) * 5), "cls: each row's first token, in order"
    assert torch.equal(packing.positions, packing.index % 5)
    assert sum(g.count for g in packing.groups) == 11 and sum(g.rows for g in packing.groups) == 4
    for g in packing.groups:
        assert g.gather.shape == (g.rows * g.span,) and g.mask.shape == (g.rows, 1, 1, g.span)
        assert g.mask.reshape(-1).sum() == g.count
    moved = packing.to("cpu")
    assert moved.batch_shape == (4, 5) and torch.equal(moved.groups[0].gather, packing.groups[0].gather)
    # nothing to skip, or no attended [CLS] to pool: the padded path runs (None)
    assert Packing.of(torch.ones(2, 4, dtype=torch.long)) is None
    assert Packing.of(torch.tensor([[0, 1, 1], [1, 1, 0]])) is None


def test_skip_padding_falls_back_without_a_cls_token(packed) -> None:
    # a left-padded row has no attended first token (refused when inputs are checked): unchecked, the model keeps
    # the padded path, same logits
    padded = Packed.from_pretrained(packed[1], skip_padding=False, check_inputs=False)
    skipped = Packed.from_pretrained(packed[1], check_inputs=False)
    inputs = batch()
    inputs["attention_mask"][2, :3] = 0
    assert torch.equal(run(skipped, inputs), run(padded, inputs))


def test_fast_is_the_exact_path_on_cpu(packed) -> None:
    # approximate activations flip too many trained-model predictions (plan.fast_index8_kernel): on CPU the fast
    # recipe is the exact path's fastest kernels
    qat, folder = packed
    model = Packed.from_pretrained(folder, precision="fast")
    assert model.index8_kernel == kernels.default_index8_kernel("cpu") and model.exact
    assert (run(model, ragged_batch()) - qat_logits(qat, ragged_batch())).abs().max().item() <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "fast"])
def test_one_model_in_every_grad_mode_and_in_threads_gives_the_same_logits(packed, precision: str) -> None:
    """Kernels keep per-call scratch state: a model used under inference_mode, then outside it, and by several
    threads at once (a web server's workers) must compute what it computes alone."""
    model = Packed.from_pretrained(packed[1], precision=precision)
    batches = [batch(), ragged_batch()]
    with torch.inference_mode():
        want = [model(**b).logits for b in batches]
    with torch.no_grad():
        assert all(torch.equal(model(**b).logits, w) for b, w in zip(batches, want))
    assert all(torch.equal(model(**b).logits.detach(), w) for b, w in zip(batches, want))

    def work(i: int) -> bool:
        with torch.inference_mode():
            return all(torch.equal(model(**batches[i % 2]).logits, want[i % 2]) for _ in range(20))
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_fbgemm_weights_are_counted(packed) -> None:
    # fbgemm's prepacked weights are not tensors: weight_bytes must count them, and they are int8 (about a
    # quarter of the dense fp32 operands the exact path holds)
    if kernels.INDEX8_KERNELS["fbgemm"].unavailable(torch.device("cpu")):
        pytest.skip("fbgemm unavailable")
    fbgemm = Packed.from_pretrained(packed[1], precision="fast", index8_kernel="fbgemm")
    dense = Packed.from_pretrained(packed[1], index8_kernel="dense")
    opaque = sum(m.opaque_bytes() for m in fbgemm.modules() if hasattr(m, "opaque_bytes"))
    stored = sum(t.numel() * t.element_size() for t in fbgemm.state_dict().values())
    assert opaque > 0 and fbgemm.weight_bytes() > stored
    assert fbgemm.weight_bytes() < dense.weight_bytes()


def test_make_plan_defaults() -> None:
    p = make_plan("cpu")
    assert (p.precision, p.dtype, p.index8_kernel, p.fuse_qkv, p.skip_padding, p.exact) == \
        ("fp32", torch.float32, "dequant", True, True, True)
    assert "exact" in p.describe()


@pytest.mark.slow
def test_compiled_forward_gives_the_same_logits(packed) -> None:
    """from_pretrained(compile=True): torch.compile of the forward (dynamic shapes: the packed token count varies)
    gives the eager logits; the compile runs in the first calls."""
    qat, folder = packed
    eager = Packed.from_pretrained(folder)
    compiled = Packed.from_pretrained(folder, compile=True)
    assert not compiled.check_inputs  # value checks would split the graph: inputs must come checked
    for inputs in (batch(), ragged_batch()):
        torch.testing.assert_close(run(compiled, inputs), run(eager, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse_qkv", [True, False])
@pytest.mark.parametrize("skip_padding", [True, False])
@pytest.mark.parametrize("span_step", [4, 32])
def test_the_last_layer_runs_for_the_pooled_token_only(packed, monkeypatch, skip_padding: bool, span_step: int,
                                                       fuse_qkv: bool) -> None:
    # the pooler reads each sequence's first token: the last layer's query, attention output and FFN run on one row
    # per sequence, its keys and values are folded into that query (no key or value projection runs), and that
    # row is what the full layer computes for it
    monkeypatch.setattr(Packing, "SPAN_STEP", span_step)
    model = Packed.from_pretrained(packed[1], skip_padding=skip_padding, fuse_qkv=fuse_qkv)
    first_layer, last = model.bert.encoder.layer[0], model.bert.encoder.layer[-1]
    assert (last.attention.kv is not None, last.attention.qkv) == (fuse_qkv, None)
    assert (first_layer.attention.qkv is not None, first_layer.attention.kv) == (fuse_qkv, None)
    entering, query_rows, ffn_rows = [], [], []
    hooks = [last.register_forward_pre_hook(lambda mod, args, kwargs: entering.append((args, kwargs)),
                                            with_kwargs=True),
             last.attention.self.query.register_forward_pre_hook(lambda mod, args: query_rows.append(args[0].shape[0])),
             last.output.dense.register_forward_pre_hook(lambda mod, args: ffn_rows.append(args[0].shape[0]))]
    projections = [m for m in (last.attention.kv, last.attention.self.key, last.attention.self.value) if m is not None]
    projected = []
    hooks += [m.register_forward_pre_hook(lambda mod, args: projected.append(mod)) for m in projections]
    inputs = ragged_batch()
    try:
        logits = run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    bsz = inputs["input_ids"].shape[0]
    assert query_rows == [bsz] and ffn_rows == [bsz] and entering[0][1] == {"first_only": True}
    assert projected == []
    x, mask, packing = entering[0][0]
    with torch.inference_mode():
        for layer in (last, first_layer):  # Q apart (the last layer's plan), and Q fused with K and V
            full = layer(x, mask, packing)
            first = layer(x, mask, packing, first_only=True)
            want = full.index_select(0, packing.cls) if skip_padding else full[:, 0]
            assert first.shape == (bsz, GEOMETRY["hidden_size"])
            assert (first - want).abs().max().item() <= 1e-5
    assert (logits - qat_logits(packed[0], inputs)).abs().max().item() <= 1e-5


def test_num_parameters_counts_what_the_qat_model_counts(packed) -> None:
    # its tensors are buffers: transformers' own count would say 0; 8-bit and 1-bit matrices count out x in
    qat, folder = packed
    model = Packed.from_pretrained(folder)
    assert model.num_parameters() == qat.num_parameters() > 0
    assert model.num_parameters(exclude_embeddings=True) == qat.num_parameters(exclude_embeddings=True)
    assert model.num_parameters(only_trainable=True) == 0
