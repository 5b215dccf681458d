"""NaN and resources (issue 21, class 4): a NaN put in place is refused at ``prepare``, an fp16 overflow is an error
naming the fix, a config.json that declares a huge model beside a small weight file is refused before anything is
allocated, and a batch that cannot fit is one line naming ``--batch-size``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from sensimix import SensiMixForSequenceClassification as Packed
from sensimix import measure
from sensimix.checkpoint import CheckpointError
from sensimix.cli import main
from sensimix.export import export_checkpoint
from sensimix.qat import from_bert
from sensimix.sources import SourceError, load_bert_classifier

ROOT = Path(__file__).resolve().parent.parent
GEOMETRY = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=100,
                max_position_embeddings=32, type_vocab_size=2)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> Path:
    qat = from_bert(BertConfig(**GEOMETRY, num_hidden_layers=2), num_hidden_layers=2, num_8bit_layers=1, seed=0)
    qat.set_binarized_layers(qat.config.mixed_layers)
    return export_checkpoint(qat.eval(), tmp_path_factory.mktemp("packed") / "sensimix")


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, GEOMETRY["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# NaN
# ---------------------------------------------------------------------------------------------------
def test_prepare_refuses_a_nan_put_in_place(packed_dir, tmp_path):
    model = Packed.from_pretrained(packed_dir)
    expected = model(input_ids=_ids()).logits
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")  # an in-place edit: load_state_dict would refuse the same tensor
    with pytest.raises(CheckpointError, match="^prepare: the model's stored tensors: classifier.weight contains NaN "
                                              "or inf$"):
        model.prepare(model.plan)  # before: prepared, and every logit NaN
    assert torch.equal(model(input_ids=_ids()).logits, expected)  # still what it was prepared with
    with pytest.raises(ValueError, match="stored tensors were changed in place"):
        model.save_pretrained(tmp_path / "out")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight_range.copy_(torch.tensor([1.0, -1.0]))
        model.classifier.weight[0, 0] = 0.0
    with pytest.raises(CheckpointError, match="weight_range = \\[lo, hi\\] = \\[1.0, -1.0\\] needs lo <= hi"):
        model.prepare(model.plan)


def _overflowing(packed_dir: Path, tmp_path: Path) -> Path:
    """A valid checkpoint (checksummed, finite) whose embeddings reach +-60,000: their sum passes fp16's 65,504."""
    model = Packed.from_pretrained(packed_dir)
    state = model.state_dict()
    for name in state:
        if name.endswith("embeddings.weight_range"):
            state[name] = torch.tensor([-60000.0, 60000.0], dtype=torch.float16)
    model.load_state_dict(state)
    return model.save_pretrained(tmp_path / "overflows")


def test_an_fp16_overflow_is_an_error_naming_fp32_and_bf16(packed_dir, tmp_path):
    folder = _overflowing(packed_dir, tmp_path)
    assert torch.isfinite(Packed.from_pretrained(folder)(input_ids=_ids()).logits).all()  # fp32: finite
    assert torch.isfinite(Packed.from_pretrained(folder, precision="bf16")(input_ids=_ids()).logits).all()
    fp16 = Packed.from_pretrained(folder, precision="fp16")
    with pytest.raises(ValueError) as overflow:  # before: [nan, nan] without a word
        fp16(input_ids=_ids())
    assert str(overflow.value).startswith("the fp16 forward overflowed: the logits of sequence(s) [0, 1, 2] are "
                                          "NaN/inf")
    assert "precision='fp32'" in str(overflow.value) and "'bf16'" in str(overflow.value)
    # the timed paths turn the checks off (no host read on CUDA): the flag run_inference reads after its clock
    fp16.check_inputs = False
    assert torch.isnan(fp16(input_ids=_ids()).logits).all()
    batches = measure.make_batches({"input_ids": _ids(), "attention_mask": torch.ones(3, 10, dtype=torch.long)})
    with pytest.raises(measure.NonFiniteLogits, match="It runs in fp16, whose range ends at 65,504: run it in fp32 "
                                                      "or bf16"):
        measure.run_inference(fp16, batches, warmup_batches=0)


def test_evaluate_names_the_fp16_overflow(packed_dir, tmp_path, caplog):
    folder = _overflowing(packed_dir, tmp_path)
    assert main(["evaluate", "--model", str(folder), "--synthetic", "--examples", "4", "--device", "cpu",
                 "--precision", "fp16", "--max-seq-length", "16"]) == 2
    assert "the fp16 forward overflowed" in caplog.text and "precision='fp32' (exact) or 'bf16'" in caplog.text


# ---------------------------------------------------------------------------------------------------
# a config.json that declares more than the weight file holds
# ---------------------------------------------------------------------------------------------------
# bert-large's geometry (1.3 GB in fp32): what transformers allocated before looking at the weights; small enough
# that a regression fails the test instead of the machine
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
HUGE = dict(hidden_size=4096, num_hidden_layers=60, num_attention_heads=64, intermediate_size=16384)  # ~48 GB fp32


def _declaring(tiny_bert_dir: Path, tmp_path: Path, **fields) -> Path:
    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, **fields}))
    return bert


def test_a_config_larger_than_its_weight_file_is_refused_from_the_index(tiny_bert_dir, tmp_path, caplog):
    bert = _declaring(tiny_bert_dir, tmp_path, **LARGE)
    shape = "some tensors have another shape than config.json says \\(\\d+ encoder tensor\\(s\\) have another shape: " \
            "bert.embeddings.word_embeddings.weight is \\[120, 32\\] in the file, \\[120, 1024\\] by config.json"
    with pytest.raises(SourceError, match=shape):
        load_bert_classifier(bert, 2)
    with pytest.raises(SourceError, match=shape):
        from_bert(bert, num_hidden_layers=2, num_8bit_layers=1)  # compress --bert
    with pytest.raises(SourceError, match=shape):
        measure.load_for_inference(bert)  # evaluate --model, verify --bert
    assert main(["evaluate", "--model", str(bert), "--synthetic", "--examples", "2", "--device", "cpu"]) == 2
    assert "another shape than config.json says" in caplog.text
    # pytorch_model.bin: its zip archive's index, memory-mapped, not read
    from safetensors.torch import load_file

    torch.save(load_file(bert / "model.safetensors"), bert / "pytorch_model.bin")
    (bert / "model.safetensors").unlink()
    with pytest.raises(SourceError, match=shape):
        load_bert_classifier(bert, 2)
    deeper = _declaring(tiny_bert_dir, tmp_path / "deeper", num_hidden_layers=60)
    with pytest.raises(SourceError, match="\\(60 layers, hidden 32\\): it lacks 896 encoder weight\\(s\\), missing "
                                          "bert.encoder.layer.10"):
        load_bert_classifier(deeper, 2)
    assert from_bert(deeper, num_hidden_layers=2, num_8bit_layers=1)  # compress needs the first 2 layers only


RSS = """\
import json, resource, sys
import torch, transformers
from sensimix.sources import SourceError, load_bert_classifier
# a regression must fail this test, not the machine: cap the address space 4 GiB above what the imports took
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_bert_classifier(sys.argv[1], 2)
    print(json.dumps({"loaded": True}))
except SourceError as exc:
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"refused": str(exc)[:400], "grew_mb": grew}))
"""


@pytest.mark.parametrize("geometry, shape", [(LARGE, "[120, 1024]"), (HUGE, "[120, 4096]")], ids=["1.3GB", "48GB"])
def test_nothing_is_allocated_before_the_weight_file_is_checked(tiny_bert_dir, tmp_path, geometry, shape):
    # before: transformers built the whole model first (the 1.3 GB one grew the process's peak memory by 1.3 GB; the
    # issue's 48 GB one ended in the OOM killer); now the file's index is read first
    bert = _declaring(tiny_bert_dir, tmp_path, **geometry)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS), str(bert)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    assert f"{shape} by config.json" in result.get("refused", "") and result["grew_mb"] < 300, result


# ---------------------------------------------------------------------------------------------------
# a batch that cannot fit
# ---------------------------------------------------------------------------------------------------
def test_a_batch_size_that_cannot_fit_is_one_line(packed_dir, tiny_bert_dir, monkeypatch, caplog):
    monkeypatch.setattr(measure, "available_memory_bytes", lambda: 4 << 20)  # a machine with 4 MiB free
    args = ["evaluate", "--synthetic", "--examples", "2000", "--device", "cpu", "--max-seq-length", "16"]
    caplog.set_level(logging.ERROR)
    for model in (packed_dir, tiny_bert_dir):
        assert main([*args, "--model", str(model), "--batch-size", "100000"]) == 2  # before: an allocator traceback
        error = caplog.records[-1].getMessage()
        assert error.startswith("--batch-size 100,000: one batch of 2,000 examples x 16 tokens needs at least")
        assert "free; use --batch-size" in error and "\n" not in error
    # the bound counts the rows a batch can hold: 10 examples never make a batch of 100,000
    assert main([*args[:2], "--examples", "10", *args[4:], "--model", str(tiny_bert_dir), "--batch-size",
                 "100000"]) == 0


def test_an_allocator_failure_in_the_run_is_one_line_naming_the_batch_size(packed_dir, monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 53687091200 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(measure, "run_inference", out_of_memory)
    assert main(["evaluate", "--model", str(packed_dir), "--synthetic", "--examples", "8", "--device", "cpu",
                 "--batch-size", "8", "--max-seq-length", "16"]) == 2
    error = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert error.startswith("--batch-size 8: the forward ran out of memory on cpu ([enforce fail")
    assert error.endswith("use a smaller --batch-size (certified: 128)")
    assert measure.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert not measure.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
