"""`compress` / `finetune` end to end on a tiny GLUE folder: metrics, refusals, and DDP under torchrun."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sensimix import SensiMixForSequenceClassification
from sensimix.train import TrainSettings, compress, finetune


def _settings(**overrides) -> TrainSettings:
    return TrainSettings(**{**dict(max_steps=4, batch_size=8, learning_rate=1e-3, seed=3, device="cpu",
                                   logging_steps=1000, max_seq_length=32), **overrides})


def test_finetune_then_distilled_compress_records_what_ran(tiny_bert_dir, tiny_glue_dir, tmp_path):
    ref = finetune(tiny_bert_dir, "sst-2", tmp_path / "ref", glue_dir=tiny_glue_dir, settings=_settings())
    assert (ref.path / "config.json").is_file() and ref.metrics["world_size"] == 1
    settings = _settings(max_steps=-1, epochs=3)
    result = compress(ref.path, "sst-2", tmp_path / "sm", glue_dir=tiny_glue_dir, layers=3, eightbit_layers=1,
                      settings=settings, teacher=ref.path)
    assert settings.distill is False  # the caller's settings are not mutated
    saved = json.loads((result.path / "training_metrics.json").read_text())
    assert saved["settings"]["distill"] is True and saved["world_size"] == 1
    assert [s["binarized_layers"] for s in saved["schedule"]] == [[], [2], [1, 2]]
    assert saved["eval_accuracy"] == result.metrics["eval_accuracy"]
    # the checkpoint computes what the trained QAT model computes
    runtime = SensiMixForSequenceClassification.from_pretrained(result.path)
    ids = torch.randint(5, 25, (4, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = result.model.eval()(input_ids=ids, attention_mask=mask).logits
        got = runtime(input_ids=ids, attention_mask=mask).logits
    # the float tensors were rounded to fp16 before the final evaluation, as the checkpoint stores them
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)


def test_finetune_a_truncated_bert_distilled_from_a_teacher(tiny_bert_dir, tiny_glue_dir, tmp_path):
    """The int8 peers' fp32 stage: the first 2 of 4 layers of a fine-tuned BERT (its head kept), distilled from it."""
    from transformers import BertForSequenceClassification

    ref = finetune(tiny_bert_dir, "sst-2", tmp_path / "ref", glue_dir=tiny_glue_dir, settings=_settings())
    settings = _settings()
    cut = finetune(ref.path, "sst-2", tmp_path / "cut", glue_dir=tiny_glue_dir, settings=settings, layers=2,
                   teacher=ref.path)
    assert settings.distill is False  # the caller's settings are not mutated
    saved = json.loads((cut.path / "training_metrics.json").read_text())
    assert saved["settings"]["distill"] is True and saved["teacher"] == str(ref.path)
    assert saved["model"].startswith("fp32 BERT, the first 2 of 4 layers")
    loaded = BertForSequenceClassification.from_pretrained(cut.path)
    assert loaded.config.num_hidden_layers == 2 and len(loaded.bert.encoder.layer) == 2
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"--layers {bad}: .* has 4 encoder layers; keep 1 to 4"):
            finetune(ref.path, "sst-2", tmp_path / "bad", glue_dir=tiny_glue_dir, settings=settings, layers=bad)
    assert not (tmp_path / "bad").exists()


def test_compress_refuses_an_existing_folder_before_training(tiny_bert_dir, tiny_glue_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "out", glue_dir=tiny_glue_dir, settings=_settings())


def test_distill_needs_a_teacher(tiny_bert_dir, tiny_glue_dir, tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "out", glue_dir=tiny_glue_dir, settings=_settings(distill=True))


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from sensimix.train import TrainSettings, compress, distributed
    src, glue, out = sys.argv[1:4]
    settings = TrainSettings(max_steps=3, batch_size=4, learning_rate=1e-3, seed=3, device="cpu", logging_steps=1000,
                             max_seq_length=32)
    result = compress(src, "sst-2", os.path.join(out, "ckpt"), glue_dir=glue, layers=2, eightbit_layers=1,
                      settings=settings)
    digest = float(sum(p.detach().double().sum() for p in result.model.parameters()))
    record = {"world": distributed.world_size(), "steps": result.metrics["train_steps"], "digest": digest,
              "ckpt": sorted(os.listdir(result.path))}
    with open(os.path.join(out, f"rank{distributed.rank()}.json"), "w") as f:
        json.dump(record, f)
    distributed.shutdown()  # what `sensimix` does on exit
""")


def test_ddp_two_cpu_processes(tiny_bert_dir, tiny_glue_dir, tmp_path):
    """`compress` under torchrun: 2 processes, gloo on CPU; replicas end identical, rank 0 alone writes the
    checkpoint, every rank sees it, and both exit cleanly."""
    script = tmp_path / "ddp_compress.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(tiny_bert_dir), str(tiny_glue_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-9)  # DDP kept replicas in sync
    assert ranks[0]["ckpt"] == ranks[1]["ckpt"] and "pytorch_model.bin" in ranks[0]["ckpt"]
    assert json.loads((tmp_path / "ckpt" / "training_metrics.json").read_text())["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []  # no temp folder left


def test_refusals_come_before_training(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch):
    """Each mistake is found in seconds: no training step runs (train is replaced by a tripwire)."""
    from sensimix.export import export_checkpoint
    from sensimix.qat import from_bert
    from sensimix.sources import SourceError
    from sensimix.train import jobs

    monkeypatch.setattr(jobs, "train", lambda *a, **k: pytest.fail("training started"))
    packed = export_checkpoint(from_bert(tiny_bert_dir, num_hidden_layers=2, num_8bit_layers=1), tmp_path / "packed")
    run = dict(glue_dir=tiny_glue_dir, settings=_settings())
    with pytest.raises(SourceError, match="packed SensiMix checkpoint"):
        compress(packed, "sst-2", tmp_path / "new" / "deeper" / "a", **run)  # missing parents: none made
    with pytest.raises(SourceError, match="packed SensiMix checkpoint"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "a", teacher=packed, **run)
    with pytest.raises(SourceError, match="packed SensiMix checkpoint"):
        finetune(packed, "sst-2", tmp_path / "a", **run)
    with pytest.raises(ValueError, match="--max-seq-length 600 is longer than the position table"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "new" / "a", glue_dir=tiny_glue_dir,
                 settings=_settings(max_seq_length=600))
    with pytest.raises(FileNotFoundError, match="MRPC/train.tsv not found"):
        compress(tiny_bert_dir, "mrpc", tmp_path / "a", **run)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "file", **run)
    with pytest.raises(ValueError, match="current folder"):
        monkeypatch.chdir(tmp_path)
        compress(tiny_bert_dir, "sst-2", ".", overwrite=True, **run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "packed"]


def _variant(src, dst, **fields):
    """A copy of the BERT folder ``src`` with config.json fields changed (weights untouched)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **fields}))
    return dst


def test_an_input_folder_is_never_the_output_and_a_teacher_must_fit(tiny_bert_dir, tiny_glue_dir, tmp_path,
                                                                    monkeypatch):
    """--out naming (or inside) the BERT or teacher it reads, even with --overwrite, and a teacher that cannot read
    the student's batches: refused before any work, nothing written or replaced."""
    import json
    import shutil

    from sensimix.io import OutputError
    from sensimix.train import jobs

    monkeypatch.setattr(jobs, "train", lambda *a, **k: pytest.fail("training started"))
    bert = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, bert)
    before = {p.name: p.read_bytes() for p in bert.iterdir()}
    run = dict(glue_dir=tiny_glue_dir, settings=_settings(), overwrite=True)
    with pytest.raises(OutputError, match="--out .* is the --bert folder .* which this command reads"):
        compress(bert, "sst-2", bert, **run)
    with pytest.raises(OutputError, match="is inside the --bert folder"):
        compress(bert, "sst-2", bert / "sub", **run)
    with pytest.raises(OutputError, match="is the --teacher folder"):
        compress(tiny_bert_dir, "sst-2", bert, teacher=bert, **run)
    with pytest.raises(OutputError, match="is the --bert folder"):
        finetune(bert, "sst-2", bert, **run)
    with pytest.raises(OutputError, match="holds the --bert folder"):
        compress(bert, "sst-2", tmp_path, **run)
    assert {p.name: p.read_bytes() for p in bert.iterdir()} == before
    cfg = json.loads((bert / "config.json").read_text())
    cases = [(dict(vocab_size=cfg["vocab_size"] + 7), {}, "distillation feeds both the same token ids"),
             (dict(max_position_embeddings=16), {}, "position table of the --teacher"),
             (dict(hidden_size=2 * cfg["hidden_size"], intermediate_size=cfg["intermediate_size"]),
              dict(distill_hidden=1.0), "--distill-hidden compares hidden states")]
    for i, (fields, settings, message) in enumerate(cases):
        teacher = _variant(tiny_bert_dir, tmp_path / f"teacher{i}", **fields)
        with pytest.raises(ValueError, match=message):
            compress(tiny_bert_dir, "sst-2", tmp_path / "out", teacher=teacher, glue_dir=tiny_glue_dir,
                     settings=_settings(**settings))
    small = _variant(tiny_bert_dir, tmp_path / "small-vocab", vocab_size=5)
    for job in (compress, finetune):
        with pytest.raises(ValueError, match="tokens but its vocab_size is 5"):
            job(small, "sst-2", tmp_path / "out", glue_dir=tiny_glue_dir, settings=_settings())
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_found_before_training(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch):
    from sensimix.io import OutputError
    from sensimix.train import jobs

    monkeypatch.setattr(jobs, "train", lambda *a, **k: pytest.fail("training started"))
    target = tmp_path / "ro" / "out"
    (tmp_path / "ro").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(OutputError, match="cannot write --out .*Permission denied"):
        compress(tiny_bert_dir, "sst-2", target, glue_dir=tiny_glue_dir, settings=_settings())


def test_a_second_writer_of_the_same_folder_is_refused(tiny_bert_dir, tiny_glue_dir, tmp_path):
    from sensimix.io import OutputError, reserve_output

    out = tmp_path / "out"
    code = (f"import sys, time; from sensimix.io import reserve_output\n"
            f"with reserve_output({str(out)!r}):\n    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="another process is writing"):
            compress(tiny_bert_dir, "sst-2", out, glue_dir=tiny_glue_dir, settings=_settings(max_steps=0))
    finally:
        holder.kill()
        holder.wait()
    with reserve_output(out):  # free again once the holder is gone
        pass


def test_diverged_training_writes_nothing(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch):
    from sensimix.train import jobs

    real_train = jobs.train

    def diverging(model, *args, **kwargs):  # a run whose weights blew up on the last step
        out = real_train(model, *args, **kwargs)
        with torch.no_grad():
            model.bert.encoder.layer[0].output.dense.weight.fill_(float("nan"))
        return out

    monkeypatch.setattr(jobs, "train", diverging)
    with pytest.raises(ValueError, match="hold NaN or inf .*training diverged. Nothing was written; lower the"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "out", glue_dir=tiny_glue_dir, settings=_settings())
    assert list(tmp_path.iterdir()) == []


def test_what_would_train_silently_wrong_is_refused(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch):
    """A teacher of another task, distillation options without a teacher, a BERT whose encoder tensors have
    another shape than its config.json says, a truncated weights file: one clear error each, nothing written."""
    from sensimix.sources import SourceError
    from sensimix.train import jobs

    monkeypatch.setattr(jobs, "train", lambda *a, **k: pytest.fail("training started"))
    teacher = _variant(tiny_bert_dir, tmp_path / "mrpc-teacher")
    (teacher / "training_metrics.json").write_text(json.dumps({"task": "mrpc"}))
    with pytest.raises(ValueError, match="was fine-tuned on mrpc .*but --task is sst-2"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "out", teacher=teacher, glue_dir=tiny_glue_dir,
                 settings=_settings())
    with pytest.raises(ValueError, match="--distill-alpha, --distill-hidden shape the distillation from --teacher"):
        compress(tiny_bert_dir, "sst-2", tmp_path / "out", glue_dir=tiny_glue_dir,
                 settings=_settings(distill_alpha=0.9, distill_hidden=1.0))
    cfg = json.loads((tiny_bert_dir / "config.json").read_text())
    wider = _variant(tiny_bert_dir, tmp_path / "wider-ffn", intermediate_size=cfg["intermediate_size"] + 8)
    with pytest.raises(SourceError, match="encoder tensor\\(s\\) have another shape"):
        compress(wider, "sst-2", tmp_path / "out", settings=_settings(max_steps=0))
    cut = _variant(tiny_bert_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(SourceError, match=r"cannot load the BERT weights \(SafetensorError"):
        compress(cut, "sst-2", tmp_path / "out", settings=_settings(max_steps=0))
    assert not (tmp_path / "out").exists()


def test_an_interrupted_calibration_says_the_folder_was_written(tiny_bert_dir, tiny_glue_dir, tmp_path, monkeypatch,
                                                                caplog):
    from sensimix import calibration_record, cli
    from sensimix.train import calibrate as measuring

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(measuring, "calibrate", interrupted)
    out = tmp_path / "sm"
    code = cli.main(["compress", "--bert", str(tiny_bert_dir), "--task", "sst-2", "--glue-dir", str(tiny_glue_dir),
                     "--layers", "2", "--8bit-layers", "1", "--max-steps", "1", "--batch-size", "8",
                     "--max-seq-length", "32", "--out", str(out)])
    assert code == 130 and (out / "config.json").is_file() and not (out / calibration_record.RECORD).exists()
    assert "interrupted; " in caplog.text and "was written, without a fast calibration record" in caplog.text
    assert "nothing was written" not in caplog.text
