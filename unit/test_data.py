"""GLUE loading from a local glue_data folder: layouts, quoting, strict errors. Runs on real files when GLUE_DIR
is set."""

import os

import pytest

from sensimix import data


def _write(root, task, split, text):
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}.tsv").write_text(text, encoding="utf-8")


def test_pair_task_with_unbalanced_quotes(tmp_path):
    _write(tmp_path, "QNLI", "dev", 'index\tquestion\tsentence\tlabel\n0\tWhat is "it?\tIt is a "thing.\tentailment\n'
                                    "1\tWho?\tNobody.\tnot_entailment\n")
    ds = data.load_glue("qnli", "dev", tmp_path)
    assert ds.labels == [0, 1]
    assert ds.text_a[0] == 'What is "it?' and ds.text_b[0] == 'It is a "thing.'


def test_single_sentence_task_and_alias(tmp_path):
    _write(tmp_path, "SST-2", "train", "sentence\tlabel\ngood film \t1\nbad film \t0\n")
    ds = data.load_glue("sst2", "train", tmp_path)
    assert ds.labels == [1, 0] and ds.text_b is None


def test_mrpc_bom_and_cola_without_header(tmp_path):
    _write(tmp_path, "MRPC", "dev", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n")
    assert data.load_glue("mrpc", "dev", tmp_path).labels == [1]
    _write(tmp_path, "CoLA", "dev", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.")
    ds = data.load_glue("cola", "dev", tmp_path)
    assert ds.labels == [1, 0] and ds.text_a[1] == "Cat the sat."


def test_environment_variable_is_the_default(tmp_path, monkeypatch):
    _write(tmp_path, "RTE", "dev", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert len(data.load_glue("rte", "dev")) == 1


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="pass --glue-dir"):
        data.load_glue("qnli", "dev")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.load_glue("qnli", "dev", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"QNLI/train.tsv not found"):
        data.load_glue("qnli", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        data.load_glue("mnli", "dev", tmp_path)
    _write(tmp_path, "QNLI", "dev", "index\tquestion\ttext\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]"):
        data.load_glue("qnli", "dev", tmp_path)
    _write(tmp_path, "QNLI", "dev", "index\tquestion\tsentence\tlabel\n0\ta\tb\tcontradiction\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: unknown label 'contradiction'"):
        data.load_glue("qnli", "dev", tmp_path)
    _write(tmp_path, "QNLI", "dev", "index\tquestion\tsentence\tlabel\n0\ta\n")
    with pytest.raises(ValueError, match="dev.tsv:2: 2 fields, expected 4"):
        data.load_glue("qnli", "dev", tmp_path)
    _write(tmp_path, "QNLI", "dev", "index\tquestion\tsentence\tlabel\n0\ta\tb\tentailment\textra\n")
    with pytest.raises(ValueError, match="dev.tsv:2: 5 fields, expected 4"):
        data.load_glue("qnli", "dev", tmp_path)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"sentence\tlabel\n", "has no examples"),
    (b"sentence\tlabel\n\n\n", "has no examples"),
    (b"sentence\tlabel\ngood\t1\nbad \xff\xfe film\t0\n", "train.tsv:3: not UTF-8"),
    (b"sentence\tlabel\n" + b"a" * (2 << 20) + b"\t1\n", "train.tsv:2: a line of [0-9,]+ characters"),
    (b"sentence\tlabel\ngood\t2\n", "train.tsv:2: unknown label '2'"),
    (b"sentence\tlabel\tsentence\ngood\t1\tbad\n", "column\\(s\\) \\['sentence'\\] appear more than once"),
])
def test_broken_files_name_file_and_line(tmp_path, content: bytes, match: str):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        data.load_glue("sst-2", "train", tmp_path)


def test_fields_up_to_the_limit_are_read(tmp_path):
    long = "word " * 40_000  # 200 KB: over csv's default 128 KiB field limit, under ours
    _write(tmp_path, "SST-2", "train", f"sentence\tlabel\n{long}\t1\n")
    assert data.load_glue("sst-2", "train", tmp_path).text_a[0] == long


def test_tokenize_keeps_segments(tmp_path, tiny_vocab):
    from transformers import BertTokenizer

    _write(tmp_path, "QNLI", "dev", "index\tquestion\tsentence\tlabel\n0\twhat movie\tthe film\tentailment\n")
    enc = data.tokenize(data.load_glue("qnli", "dev", tmp_path), BertTokenizer(tiny_vocab), 16)
    assert enc[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert enc[0]["labels"] == 0 and len(enc) == 1


def test_seeded_subset_is_reproducible(tmp_path):
    rows = "".join(f"w{i}\t{i % 2}\n" for i in range(50))
    _write(tmp_path, "SST-2", "train", "sentence\tlabel\n" + rows)
    full = data.load_glue("sst-2", "train", tmp_path)
    a, b = full.shuffled_subset(10, seed=3), full.shuffled_subset(10, seed=3)
    assert a.text_a == b.text_a and len(a) == 10 and a.text_a != full.text_a[:10]
    assert a.text_a != full.shuffled_subset(10, seed=4).text_a


@pytest.mark.skipif(not os.environ.get("GLUE_DIR"), reason="GLUE_DIR not set: the real GLUE files are not available")
@pytest.mark.parametrize("task,split,rows,ones", [
    ("qnli", "dev", 5463, 2761), ("sst-2", "train", 67349, 37569), ("sst-2", "dev", 872, 444),
    ("mrpc", "train", 3668, 2474), ("rte", "dev", 277, 131), ("cola", "dev", 1043, 721),
])
def test_real_glue_files_match_published_counts(task, split, rows, ones):
    ds = data.load_glue(task, split)
    assert len(ds) == rows and sum(ds.labels) == ones


def test_offline_bert_setting_supplies_the_random_vocabulary(tiny_bert_dir, tmp_path, monkeypatch):
    from sensimix.sources import PRETRAINED_ENV, load_tokenizer, offline_bert

    monkeypatch.setenv(PRETRAINED_ENV, str(tiny_bert_dir))
    assert offline_bert() == str(tiny_bert_dir)
    assert len(load_tokenizer("random:bert-base")) == 120  # the tiny vocabulary, not bert-base-uncased's
    monkeypatch.setenv(PRETRAINED_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        offline_bert()


def test_a_model_with_other_labels_than_the_task_is_refused() -> None:
    from sensimix.data import check_task_labels

    check_task_labels("m", 2, "sst-2", "fix")  # SST-2 has 2 labels
    with pytest.raises(ValueError, match=r"^m classifies into 3 labels, but sst-2 has 2: evaluate it on its own task$"):
        check_task_labels("m", 3, "sst-2", "evaluate it on its own task")


def test_a_split_that_is_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "SST-2" / "dev.tsv").mkdir(parents=True)
    with pytest.raises(ValueError, match="dev.tsv is not a regular file"):
        data.load_glue("sst-2", "dev", tmp_path)
