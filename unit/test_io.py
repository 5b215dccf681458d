"""Safe writes (sensimix.io): one writer per target, atomic replacement, nothing lost on a crash or a kill.

Processes that race or die are real subprocesses. They load ``sensimix/io/folders.py`` on its own (it needs only the
standard library), so each starts in milliseconds instead of importing torch.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from io_helpers import DIES_BETWEEN_RENAMES, listing, make_version, spawn

import sensimix.io.folders as sio
from sensimix.io import (
    OutputError,
    atomic_dir,
    check_apart,
    check_file_target,
    check_output_dir,
    raise_on_sigterm,
    read_json,
    recover_interrupted,
    reserve_output,
    write_json,
)

@pytest.fixture
def no_renameat2(monkeypatch):
    """Force the fallback path: a file system without RENAME_NOREPLACE / RENAME_EXCHANGE."""
    monkeypatch.setattr(sio, "_renameat2", lambda src, dst, flags: False)


def renameat2_works(tmp_path: Path) -> bool:
    a, b = tmp_path / ".probe-a", tmp_path / ".probe-b"
    a.mkdir(), b.mkdir()
    try:
        return sio._renameat2(a, b, sio._RENAME_EXCHANGE)
    finally:
        a.rmdir(), b.rmdir()


# ---------------------------------------------------------------------------------------------------
# concurrency: one writer per target
# ---------------------------------------------------------------------------------------------------
WRITER = """\
target, me, go = sys.argv[1:]
try:
    with sio.atomic_dir(target) as tmp:
        (tmp / "who").write_text(me)
        print("inside", flush=True)
        while not Path(go).exists():
            time.sleep(0.01)
except (OSError, ValueError) as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    sys.exit(2)
"""


def test_two_processes_writing_one_new_target_one_wins_the_other_is_refused(tmp_path):
    target, go = tmp_path / "out", tmp_path / "go"
    procs = [spawn(WRITER, target, name, go) for name in ("first", "second")]
    firsts = [p.stdout.readline().strip() for p in procs]  # both have reached the lock: one inside, one refused
    go.touch()
    codes = [p.wait(timeout=30) for p in procs]
    assert sorted(codes) == [0, 2], (codes, firsts)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert firsts[winner] == "inside"
    assert firsts[loser].startswith("OutputError: another process is writing") and "wait for it" in firsts[loser]
    assert (target / "who").read_text() == ("first", "second")[winner]
    assert listing(tmp_path) == ["go", "out"]  # no temp folder, no lock file


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "fallback"])
def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(sio, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while it was being written.*nothing was replaced"):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("mine")
            make_version(target, "theirs")  # another program (not holding our lock) creates it
    assert (target / "config.json").read_text() == "theirs"
    assert listing(tmp_path) == ["out"]


def test_existing_target_is_refused_without_overwrite_before_any_work(tmp_path):
    target = make_version(tmp_path / "out", "old")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        with atomic_dir(target):
            pytest.fail("the block ran")
    assert (target / "config.json").read_text() == "old" and listing(tmp_path) == ["out"]


def test_reserve_output_is_reentrant_within_a_process_and_exclusive_across(tmp_path):
    target = tmp_path / "out"
    probe = "try:\n    with sio.reserve_output(sys.argv[1]):\n        print('got it')\n" \
            "except sio.OutputError as exc:\n    print('refused:', exc)\n"
    with reserve_output(target):
        with reserve_output(tmp_path / "x" / ".." / "out"):  # the same folder, spelled differently
            assert (tmp_path / ".out.lock").exists()
        other = spawn(probe, target)  # the inner release must not free the outer hold
        assert other.communicate(timeout=30)[0].startswith("refused: another process is writing")
    assert not (tmp_path / ".out.lock").exists()
    assert spawn(probe, target).communicate(timeout=30)[0].strip() == "got it"


# ---------------------------------------------------------------------------------------------------
# overwrites: the previous version is never lost
# ---------------------------------------------------------------------------------------------------
def test_overwrite_by_exchange_keeps_the_target_present_at_every_instant(tmp_path, monkeypatch):
    if not renameat2_works(tmp_path):
        pytest.skip("this file system has no RENAME_EXCHANGE (the fallback is tested below)")
    target = make_version(tmp_path / "out", "v0")
    flags_used = []
    real = sio._renameat2
    monkeypatch.setattr(sio, "_renameat2", lambda s, d, f: flags_used.append(f) or real(s, d, f))
    missing, checks, stop = [], [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            checks[0] += 1
            if not (target / "config.json").exists():
                missing.append(checks[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 31):
            with atomic_dir(target, overwrite=True) as tmp:
                (tmp / "config.json").write_text(f"v{i}")
    finally:
        stop.set()
        watcher.join()
    assert set(flags_used) == {sio._RENAME_EXCHANGE}
    assert not missing and checks[0] > 30, f"target missing at {len(missing)} of {checks[0]} checks"
    assert (target / "config.json").read_text() == "v30"
    assert listing(tmp_path) == ["out"]  # the old versions, temp folders and lock are gone


def test_fallback_overwrite_replaces_and_leaves_no_debris(tmp_path, no_renameat2):
    target = make_version(tmp_path / "out", "old")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new" and listing(tmp_path) == ["out"]


def _failing_replace(monkeypatch, fails: callable) -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if fails(Path(src), Path(dst)):
            raise OSError(errno.EIO, "simulated I/O error", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(sio.os, "replace", replace)


def test_failed_final_rename_restores_the_previous_version(tmp_path, monkeypatch, no_renameat2):
    target = make_version(tmp_path / "out", "old")
    _failing_replace(monkeypatch, lambda src, dst: ".out.tmp." in src.name)  # new version -> target fails
    with pytest.raises(OSError, match="simulated I/O error"):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_failed_first_rename_leaves_the_target_and_no_hidden_folder(tmp_path, monkeypatch, no_renameat2):
    target = make_version(tmp_path / "out", "old")
    _failing_replace(monkeypatch, lambda src, dst: src == target)  # target -> hidden .old folder fails
    with pytest.raises(OSError, match="simulated I/O error"):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "old"
    assert listing(tmp_path) == ["out"]




def test_death_between_the_two_renames_is_recovered_by_the_next_write(tmp_path):
    target = make_version(tmp_path / "out", "old")
    assert spawn(DIES_BETWEEN_RENAMES, target).wait(timeout=30) == 9
    olds = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old.")]
    assert not target.exists() and len(olds) == 1 and (olds[0] / "out" / "config.json").read_text() == "old"
    with pytest.raises(FileExistsError, match="already exists"):  # restored first, then not replaced
        with atomic_dir(target):
            pass
    assert (target / "config.json").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if ".old." in p.name or ".lock" in p.name]


def test_recover_interrupted_restores_a_left_hidden_version(tmp_path):
    target = tmp_path / "out"
    make_version(tmp_path / ".out.old.abc123" / "out", "old")
    (tmp_path / ".out.old.empty00").mkdir()  # died after making the hidden folder, before moving into it
    assert recover_interrupted(target) == target
    assert (target / "config.json").read_text() == "old" and listing(tmp_path) == ["out"]
    assert recover_interrupted(target) is None  # nothing left to do


def test_a_killed_writers_temp_folder_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "out"
    code = "with sio.atomic_dir(sys.argv[1]) as tmp:\n    print('inside', flush=True)\n    time.sleep(60)\n"
    proc = spawn(code, target)
    assert proc.stdout.readline().strip() == "inside"
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=30)
    assert any(p.name.startswith(".out.tmp.") for p in tmp_path.iterdir())
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new")
    assert listing(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_sigterm_during_a_write_removes_the_temp_folder_and_the_lock(tmp_path, overwrite):
    target = tmp_path / "out"
    if overwrite:
        make_version(target, "old")
    code = f"""\
    with sio.atomic_dir(sys.argv[1], overwrite={overwrite}) as tmp:
        (tmp / "config.json").write_text("half written")
        print("inside", flush=True)
        time.sleep(60)
    """
    proc = spawn(code, target)
    assert proc.stdout.readline().strip() == "inside"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # 143: SystemExit, after the cleanup ran
    assert listing(tmp_path) == (["out"] if overwrite else [])
    if overwrite:
        assert (target / "config.json").read_text() == "old"


def test_sigterm_during_the_commit_waits_until_the_renames_are_done(tmp_path, monkeypatch, no_renameat2):
    target = make_version(tmp_path / "out", "old")
    real = sio._rename_into_place

    def signalled_mid_commit(tmp, out, overwrite):
        os.kill(os.getpid(), signal.SIGTERM)  # held back until both renames are done
        real(tmp, out, overwrite)

    monkeypatch.setattr(sio, "_rename_into_place", signalled_mid_commit)
    with pytest.raises(SystemExit) as exc:
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    assert exc.value.code == 143  # the signal still ends the process, once the new version is in place
    assert (target / "config.json").read_text() == "new" and listing(tmp_path) == ["out"]


def test_raise_on_sigterm_leaves_a_custom_handler_alone():
    def mine(signum, frame):  # noqa: ARG001
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        with raise_on_sigterm():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------------
# where a write may go
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [".", "./", "..", "sub/..", "sub/../..", "link-to-here", "/"])
def test_the_current_folder_or_one_above_it_is_refused(tmp_path, monkeypatch, spelling):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link-to-here").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path / "sub" if spelling.startswith("..") else tmp_path)
    before = listing(tmp_path)
    with pytest.raises(OutputError, match="is the current folder or one above it; name a new folder"):
        check_output_dir(spelling, overwrite=True)
    with pytest.raises(OutputError, match="current folder"):
        with atomic_dir(spelling, overwrite=True):
            pytest.fail("the block ran")
    assert listing(tmp_path) == before


def test_checking_an_output_folder_creates_nothing(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b" / "c")
    assert out == tmp_path / "a" / "b" / "c" and listing(tmp_path) == []


def test_a_failed_job_leaves_no_parent_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), sio.reserve_output(tmp_path / "kept" / "a" / "b" / "out"):
        assert (tmp_path / "kept" / "a" / "b").is_dir()  # made for the lock file
        raise RuntimeError("refused after the lock was taken")
    assert listing(tmp_path) == ["kept"] and listing(tmp_path / "kept") == []
    with sio.reserve_output(tmp_path / "x" / "out") as out:  # a job that writes keeps its parents
        out.mkdir()
    assert (tmp_path / "x" / "out").is_dir() and listing(tmp_path / "x") == ["out"]


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file is not a folder"):
        check_output_dir(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_write_json_replaces_whole_files_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"acc": float("nan"), "x": [1.0, float("inf")]})
    assert read_json(path) == {"acc": None, "x": [1.0, None]} and listing(tmp_path) == ["r.json"]


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8"), (b"{", "not valid JSON"), (b"[" * 100_000, "nested too deeply"),
])
def test_read_json_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_json(path)


def test_locks_are_released_when_the_writer_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("writer failed")
    assert listing(tmp_path) == []
    start = time.monotonic()
    with reserve_output(target):  # free at once
        pass
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------
# commands: a refused run writes nothing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["..", "../work", "./"])
def test_compress_into_the_current_folder_is_refused_before_any_work(tmp_path, monkeypatch, caplog, out):
    from sensimix.cli import main

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["compress", "--bert", "random:bert-tiny", "--max-steps", "0", "--out", out, "--overwrite"]) == 2
    assert "is the current folder or one above it" in caplog.text
    assert listing(tmp_path) == ["work"] and listing(tmp_path / "work") == []


def test_a_refused_verify_creates_no_report_folder(tmp_path, monkeypatch, caplog):
    from sensimix.cli import main

    monkeypatch.delenv("GLUE_DIR", raising=False)
    keep = tmp_path / "keep"
    make_version(keep / "bert", "precious")
    code = main(["verify", "--out", str(tmp_path / "report"), "--bert", "random:bert-tiny", "--layers", "2",
                 "--keep-models", str(keep), "--device", "cpu", "--skip-accuracy", "--no-progress"])
    assert code == 2 and "DIR/bert" in caplog.text and "already exists; pass --overwrite" in caplog.text
    assert listing(tmp_path) == ["keep"] and (keep / "bert" / "config.json").read_text() == "precious"


def test_outputs_are_synced_to_disk_before_the_rename(tmp_path, monkeypatch):
    """A power loss must leave the old version or the new one: each file's data (and the folder's entries) reach
    the disk before the rename that publishes them."""
    events: list[str] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda *a, **k: (events.append("rename"), real_replace(*a, **k))[1])
    monkeypatch.setattr(os, "rename", lambda *a, **k: (events.append("rename"), real_rename(*a, **k))[1])
    write_json(tmp_path / "r.json", {"a": 1})
    assert events[0] == "fsync" and "rename" in events and events[-1] == "fsync"  # data, rename, the folder
    events.clear()
    real_commit = sio._commit
    monkeypatch.setattr(sio, "_commit", lambda *a: (events.append("rename"), real_commit(*a))[1])
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "pytorch_model.bin").write_bytes(b"x" * 10)
    first_rename = events.index("rename")
    assert events[:first_rename].count("fsync") >= 3 and events[-1] == "fsync"  # two files and the folder first


def test_a_read_only_output_file_is_refused_not_replaced(tmp_path):
    kept = tmp_path / "r.json"
    kept.write_text('{"kept": true}')
    kept.chmod(0o444)
    with pytest.raises(OutputError, match=r"r\.json is read-only, so it is kept as it is; make it writable"):
        check_file_target(kept, "--json")
    assert kept.read_text() == '{"kept": true}'


def test_an_output_that_is_an_input_file_is_refused_also_through_a_link(tmp_path):
    source = tmp_path / "runs.jsonl"
    source.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(source)
    for out in (source, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "runs.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="is the --results file .*which this command reads"):
            check_apart(out, {"--results": source}, "--json", replaces=False)
    check_apart(tmp_path / "other.json", {"--results": source}, "--json", replaces=False)


def test_a_planted_lock_link_is_refused_and_its_target_never_created(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "nologin"
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(OutputError, match=r"its lock file .*\.out\.lock cannot be created \(it is a symbolic link\)"):
        with atomic_dir(out):
            pass
    assert not victim.exists() and not out.exists()


def test_a_folder_every_user_may_write_without_the_sticky_bit_is_no_place_to_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    for write in (lambda: write_json(shared / "r.json", {}), lambda: check_file_target(shared / "r.json"),
                  lambda: check_output_dir(shared / "m"), lambda: atomic_dir(shared / "m").__enter__()):
        with pytest.raises(OutputError, match="is writable by every user and not sticky"):
            write()
    assert os.listdir(shared) == []
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is ours
    write_json(shared / "r.json", {})


def test_glob_characters_in_a_name_never_touch_another_targets_backup(tmp_path):
    backup = tmp_path / ".model.old.abc" / "model"
    backup.mkdir(parents=True)
    (backup / "config.json").write_text("{}")
    with atomic_dir(tmp_path / "m*") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (backup / "config.json").is_file()  # the only whole copy of an interrupted overwrite of "model"
    assert recover_interrupted(tmp_path / "model") == tmp_path / "model"


def test_a_number_python_cannot_convert_is_the_callers_error_naming_the_file(tmp_path):
    huge = tmp_path / "config.json"
    huge.write_text('{"n": ' + "9" * 5000 + "}")
    with pytest.raises(KeyError, match=r"config\.json is not a model config: .*"):
        read_json(huge, what="a model config", error=KeyError)
