"""Writers of one output folder from threads, who owns a temp folder, and readers after an interrupted overwrite
(sensimix.io; issue 21, class 5). The process-level cases are in unit/test_io.py."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from io_helpers import DIES_BETWEEN_RENAMES, listing, make_version, spawn

from sensimix.io import OutputError, atomic_dir, previous_version, read_config_json, reserve_output


def _in_thread(fn) -> dict:
    """Run ``fn`` in another thread; what it returned or raised."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    return result


# ---------------------------------------------------------------------------------------------------
# threads: one writer per target, as for processes
# ---------------------------------------------------------------------------------------------------
def test_a_second_thread_writing_the_same_folder_is_refused_and_the_first_is_untouched(tmp_path):
    target = tmp_path / "out"
    inside, done = threading.Event(), threading.Event()
    temps: list[Path] = []

    def first() -> None:
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("first")
            temps.append(tmp)
            inside.set()
            assert done.wait(timeout=60)

    writer = threading.Thread(target=first)
    writer.start()
    try:
        assert inside.wait(timeout=60)

        def second() -> None:
            with atomic_dir(target) as tmp:
                (tmp / "config.json").write_text("second")

        refused = _in_thread(second)["error"]
        assert isinstance(refused, OutputError)
        assert str(refused).startswith(f"another thread of this process is writing {target}") and "wait" in str(refused)
        # before: the lock was re-entrant for every thread, and the second write deleted the first one's temp folder
        assert (temps[0] / "config.json").read_text() == "first"
        with pytest.raises(OutputError, match="another thread of this process"):  # the main thread too
            with reserve_output(target):
                pass
    finally:
        done.set()
        writer.join(timeout=60)
    assert (target / "config.json").read_text() == "first"
    assert listing(tmp_path) == ["out"]  # no temp folder, owner file or lock left


def test_one_thread_still_reenters_its_own_hold(tmp_path):
    target = tmp_path / "out"
    with reserve_output(target):  # compress holds the job lock while its export writes the folder
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("v1")
        with atomic_dir(target, overwrite=True) as outer:  # a write nested in a write of the same target
            (outer / "config.json").write_text("outer")
            with atomic_dir(target, overwrite=True) as inner:
                (inner / "config.json").write_text("inner")
            assert (outer / "config.json").read_text() == "outer"  # the inner write did not take it for stale
        assert _in_thread(lambda: reserve_output(target).__enter__()).get("error") is not None
    assert (target / "config.json").read_text() == "outer" and listing(tmp_path) == ["out"]


def test_save_pretrained_from_a_second_thread_is_refused(tmp_path, tiny_bert_dir):
    from sensimix import SensiMixForSequenceClassification as Packed
    from sensimix.train import TrainSettings, compress

    folder = compress(tiny_bert_dir, "sst-2", tmp_path / "sm", layers=2, eightbit_layers=1,
                      settings=TrainSettings(max_steps=0, device="cpu")).path
    model = Packed.from_pretrained(folder)
    before = (folder / "model.safetensors").read_bytes()
    with reserve_output(folder):  # e.g. a library compress writing it in this thread
        error = _in_thread(lambda: model.save_pretrained(folder, overwrite=True))["error"]
    assert isinstance(error, OutputError) and "another thread of this process is writing" in str(error)
    assert (folder / "model.safetensors").read_bytes() == before
    model.save_pretrained(folder, overwrite=True)  # once it is free: written
    assert torch.equal(Packed.from_pretrained(folder).classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------------------------------------------
# temp folders: removed only when their owner is provably gone
# ---------------------------------------------------------------------------------------------------
LIVE_TEMP = """\
out = Path(sys.argv[1])
tmp, fd = sio._make_temp(out)  # a writer that does not share our lock (e.g. NFS without working locks)
(tmp / "work").write_text("mine")
print(tmp, flush=True)
time.sleep(60)
"""


def test_a_live_writers_temp_folder_is_kept_and_a_dead_ones_removed(tmp_path):
    target = tmp_path / "out"
    proc = spawn(LIVE_TEMP, target)
    try:
        live = Path(proc.stdout.readline().strip())
        assert live.is_dir() and Path(f"{live}.owner").is_file()
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("new")
        assert (live / "work").read_text() == "mine"  # its owner file is flocked: alive, kept
    finally:
        proc.kill()  # SIGKILL: the kernel drops its flock; a pid reused later cannot hold it
        proc.wait(timeout=30)
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("newer")
    assert listing(tmp_path) == ["out"]
    # a temp folder of an older version (no owner file): its writer held the target lock we hold now
    (tmp_path / ".out.tmp.old1234").mkdir()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("newest")
    assert listing(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------------
# readers: a folder left missing between the two renames of an overwrite (file systems without renameat2)
# ---------------------------------------------------------------------------------------------------
def _interrupt_an_overwrite(target: Path) -> Path:
    assert spawn(DIES_BETWEEN_RENAMES, target).wait(timeout=30) == 9
    hidden = previous_version(target)
    assert not target.exists() and hidden is not None and hidden.name == target.name
    return hidden


def test_a_reader_puts_the_previous_version_back(tmp_path, caplog):
    target = make_version(tmp_path / "out", '{"model_type": "bert"}')
    _interrupt_an_overwrite(target)
    with caplog.at_level(logging.WARNING):
        assert read_config_json(target, expected="a model") == {"model_type": "bert"}
    assert "was missing (an overwrite of it was interrupted between its two renames)" in caplog.text
    assert listing(tmp_path) == ["out"]  # put back, the hidden folder and the lock gone


def test_a_reader_that_cannot_put_it_back_says_where_it_is(tmp_path):
    target = make_version(tmp_path / "out", '{"model_type": "bert"}')
    hidden = _interrupt_an_overwrite(target)
    holder = spawn("with sio.reserve_output(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n",
                   target)
    try:
        assert holder.stdout.readline().strip() == "held"  # a live writer: only it may move folders now
        with pytest.raises(FileNotFoundError) as exc:
            read_config_json(target, expected="a model")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    message = str(exc.value)
    assert message.startswith(f"{target} is missing: an overwrite of it was interrupted between its two renames")
    assert f"its previous version is whole in {hidden}" in message and f"mv {hidden} {target}" in message
    assert "\n" not in message and hidden.is_dir() and not target.exists()  # nothing moved


def test_model_readers_find_the_previous_version(tmp_path, tiny_bert_dir):
    from sensimix import SensiMixForSequenceClassification as Packed
    from sensimix.measure import is_sensimix_folder, load_for_inference
    from sensimix.sources import bert_config
    from sensimix.train import TrainSettings, compress

    packed = compress(tiny_bert_dir, "sst-2", tmp_path / "sm", layers=2, eightbit_layers=1,
                      settings=TrainSettings(max_steps=0, device="cpu")).path
    ids = torch.tensor([[2, 9, 10, 3]])
    expected = Packed.from_pretrained(packed)(input_ids=ids).logits
    _interrupt_an_overwrite(packed)
    assert torch.equal(Packed.from_pretrained(packed)(input_ids=ids).logits, expected)
    _interrupt_an_overwrite(packed)
    assert is_sensimix_folder(packed)
    bert = Path(shutil.copytree(tiny_bert_dir, tmp_path / "bert"))
    hidden_size = bert_config(bert).hidden_size
    _interrupt_an_overwrite(bert)
    assert bert_config(bert).hidden_size == hidden_size
    _interrupt_an_overwrite(bert)
    assert load_for_inference(bert).config.hidden_size == hidden_size
    assert not [p for p in tmp_path.iterdir() if ".old." in p.name or p.name.endswith(".lock")]
