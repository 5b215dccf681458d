"""Where the C kernels' libraries come from (``sensimix.kernels.native``; issue 21, class 1): built at install time
and used from there; else built at run time in a private folder, hashed, opened by descriptor; never a library or
a source that another user could have written; a foreign library is one line and a fallback, never a traceback.

Tests run as whatever user CI has; "another user" is uid 65534 (``nobody``) where the test may chown (root).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sensimix.kernels import native, native_builds

ROOT = Path(__file__).resolve().parents[1]
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")
needs_root = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown to another user")
OTHER_UID = 65534
POPCOUNT = native_builds.find("popcount.c", ("-mavx2",))
POPCOUNT_NAME = native_builds.library_file(POPCOUNT, native_builds.source_path(POPCOUNT).read_bytes())


@pytest.fixture
def fresh(monkeypatch, tmp_path) -> Path:
    """No library loaded yet in this process's caches, no install, a cache of this test's own."""
    native.load.cache_clear()
    native.load_build.cache_clear()
    monkeypatch.setenv("SENSIMIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "INSTALLED", tmp_path / "site" / "_native")
    yield tmp_path
    native.load.cache_clear()
    native.load_build.cache_clear()


def loaded_from() -> str:
    """The file the last library was loaded from (through its descriptor)."""
    return os.readlink(f"/proc/self/fd/{native._OPEN_FDS[-1]}")


def compile_c(code: str, out: Path) -> Path:
    src = out.with_suffix(".c")
    src.write_text(code)
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(out)], check=True, capture_output=True)
    out.chmod(0o755)
    return out


def setup_build(build_lib: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``setup.py build_ext``: what pip runs to build the libraries into the package."""
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(build_lib), "--build-temp",
                           str(build_lib / "tmp")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    if CC is None:
        pytest.skip("no C compiler")
    lib = tmp_path_factory.mktemp("build-lib")
    done = setup_build(lib)
    assert done.returncode == 0, done.stderr[-2000:]
    return lib / "sensimix" / "kernels" / "_native"


# ---------------------------------------------------------------------------------------------------
# install time
# ---------------------------------------------------------------------------------------------------
def test_install_builds_every_row_and_the_runtime_uses_them_without_a_compiler(fresh, installed, monkeypatch):
    names = {native_builds.library_file(b, native_builds.read_bundle(native_builds.source_path(b)))
             for b in native_builds.BUILDS}
    assert {p.name for p in installed.glob("*.so")} == names
    monkeypatch.setattr(native, "INSTALLED", installed)
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))  # any attempt to compile would fail
    for build in native_builds.BUILDS:
        lib = native.load(build.source, build.flags)
        assert loaded_from().startswith(str(installed)) and lib.sensimix_abi_version() == build.abi
    assert not (fresh / "cache").exists(), "no cache on the install-time path"


@needs_cc
def test_an_install_goes_on_where_a_library_does_not_build(tmp_path):
    # a compiler that rejects -mfma (as an old one rejects -mavx512vnni): that row is skipped with a warning
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *-mfma*) echo "cc: error: unrecognized option -mfma" >&2; exit 1;; '
                    f'esac\nexec {CC} "$@"\n')
    fake.chmod(0o755)
    done = setup_build(tmp_path / "one", {"CC": str(fake)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int16gemm-avx2: cc: error: unrecognized option -mfma" in done.stdout + done.stderr
    built = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (tmp_path / "one").rglob("*.so"))
    assert built == ["a8gemm-avx2", "a8gemm-vnni", "popcount-avx2"]  # every row without -mfma (a8attn-avx2 has it)
    done = setup_build(tmp_path / "none", {"CC": str(tmp_path / "no-such-cc")})
    assert done.returncode == 0 and not list((tmp_path / "none").rglob("*.so"))


@needs_cc
def test_without_an_install_the_library_is_built_at_run_time_saying_why(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="sensimix.kernels.native"):
        lib = native.load("popcount.c", ("-mavx2",))
    assert lib.sensimix_abi_version() == 1 and loaded_from() == str(fresh / "cache" / "kernels" / POPCOUNT_NAME)
    assert any("built at run time: " in r.getMessage() and "without building its C kernels" in r.getMessage()
               for r in caplog.records)
    assert [p.name for p in (fresh / "cache" / "kernels").iterdir()] == [POPCOUNT_NAME], "no temporary left"
    mode = (fresh / "cache" / "kernels" / POPCOUNT_NAME).stat().st_mode & 0o777
    assert mode & 0o022 == 0 and (fresh / "cache" / "kernels").stat().st_mode & 0o777 == 0o700


@needs_cc
def test_an_installed_library_of_another_source_is_not_used(fresh, installed, monkeypatch, tmp_path):
    # an editable checkout whose popcount.c changed since the install: the key differs, the cache builds it
    stale = tmp_path / "stale"
    shutil.copytree(installed, stale)
    (stale / POPCOUNT_NAME).rename(stale / "popcount-avx2-0000000000000000.so")
    monkeypatch.setattr(native, "INSTALLED", stale)
    native.load("popcount.c", ("-mavx2",))
    assert loaded_from() == str(fresh / "cache" / "kernels" / POPCOUNT_NAME)


def test_no_install_and_no_compiler_is_one_line_and_a_fallback(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native_builds, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sensimix.kernels.native"):
        reason = native.unavailable("popcount kernel", set(), lambda: native.load("popcount.c", ("-mavx2",)),
                                    "the next exact kernel runs instead")
    assert "no library for popcount.c was built at install time" in reason and "install gcc or clang" in reason
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None and "\n" not in reason


def test_a_compiler_that_cannot_run_says_why(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    with pytest.raises(native.NativeBuildError, match=r"no-such-cc` could not run: .* \(no installed library: .* "
                                                      r"installed without building its C kernels\)"):
        native.load("popcount.c", ("-mavx2",))
    assert not any((fresh / "cache").rglob("*.so"))


@needs_cc
def test_a_compile_error_names_the_line_and_leaves_nothing(fresh):
    broken = fresh / "src" / "broken.c"
    broken.parent.mkdir()
    broken.write_text("int f(void) { return undeclared_name; }\n")
    with pytest.raises(native.NativeBuildError, match=rf"compiling .*broken.c failed .*{broken}:1:.*undeclared_name"):
        native.load(str(broken), ())
    assert list((fresh / "cache" / "kernels").iterdir()) == [], "no library and no temporary folder is left"


@needs_cc
def test_a_killed_builds_folder_is_removed_by_the_next_build_and_a_live_one_is_not(fresh):
    """A build killed mid-way leaves its private ``.build-*`` folder; the next build removes those older than any
    live build can be, without following a link out of them, and leaves a recent one (another process's build)."""
    kernels = fresh / "cache" / "kernels"
    kernels.mkdir(parents=True, mode=0o700)
    victim = fresh / "victim.txt"
    victim.write_text("keep")
    stale, live = kernels / ".build-0123456789abcdef", kernels / ".build-fedcba9876543210"
    for folder in (stale, live):
        folder.mkdir(mode=0o700)
        (folder / "popcount.c").write_text("/* cut */")
    (stale / "victim").symlink_to(victim)
    old = time.time() - native.STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    native.load("popcount.c", ("-mavx2",))
    assert not stale.exists() and live.exists(), "the stale folder went, the recent one stayed"
    assert victim.read_text() == "keep", "a link inside was removed, not followed"


def test_a_cache_that_cannot_be_made_is_a_build_error(fresh, monkeypatch):
    (fresh / "a-file").write_text("")
    monkeypatch.setenv("SENSIMIX_CACHE_DIR", str(fresh / "a-file" / "cache"))
    with pytest.raises(native.NativeBuildError, match="a-file is not a folder"):
        native.load("popcount.c", ("-mavx2",))


@needs_cc
def test_processes_building_at_once_all_load_a_whole_library(tmp_path):
    # the native loader alone (stub parent packages: importing sensimix would import torch), so the four start
    # compiling within milliseconds of each other
    code = ("import sys, types; from pathlib import Path\n"
            "for name, path in (('sensimix', 'sensimix'), ('sensimix.kernels', 'sensimix/kernels')):\n"
            f"    sys.modules[name] = types.ModuleType(name); sys.modules[name].__path__ = [r'{ROOT}/' + path]\n"
            "from sensimix.kernels import native\n"
            "native.INSTALLED = Path('/nonexistent')\n"
            "print(native.load('popcount.c', ('-mavx2',)).sensimix_abi_version())")
    env = {**os.environ, "SENSIMIX_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {"1"}
    assert [f.name for f in (tmp_path / "kernels").iterdir()] == [POPCOUNT_NAME]


# ---------------------------------------------------------------------------------------------------
# the attacks of issue 21: none loads another user's code
# ---------------------------------------------------------------------------------------------------
def plant(folder: Path, name: str = POPCOUNT_NAME, *, uid: int | None = None, mode: int = 0o755) -> Path:
    """A library at the expected name: a marker file appears if it is ever loaded (its constructor runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder.parent / "PLANTED-CODE-RAN"
    lib = compile_c('#include <stdio.h>\n#include <stdint.h>\n__attribute__((constructor)) static void run(void) { '
                    f'FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
                    "int64_t sensimix_abi_version(void) { return 1; }\n", folder / name)
    lib.chmod(mode)
    if uid is not None:
        os.chown(lib, uid, -1)
    return marker


@needs_cc
@pytest.mark.parametrize("where", ["cache", "installed"])
@pytest.mark.parametrize("owner,mode,says", [("other", 0o666, r"belongs to another user \(uid 65534, mode 666\)"),
                                             ("other", 0o755, r"belongs to another user \(uid 65534, mode 755\)"),
                                             ("me", 0o666, r"is writable by other users \(mode 666\)")])
def test_a_planted_library_is_refused_after_chmod_go_w(fresh, where, owner, mode, says):
    # planted while the folder was writable by others; the user then ran the advised chmod go-w on the folder
    folder = fresh / "cache" / "kernels" if where == "cache" else native.INSTALLED
    if owner == "other" and os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    marker = plant(folder, uid=OTHER_UID if owner == "other" else None, mode=mode)
    folder.chmod(0o700)
    with pytest.raises(native.NativeBuildError, match=rf"{folder / POPCOUNT_NAME} {says}: it could run their code; "
                                                      rf"delete it"):
        native.load("popcount.c", ("-mavx2",))
    assert not marker.exists()


@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o755])
def test_a_cache_folder_made_by_another_user_is_refused(fresh, monkeypatch, mode):
    shared = fresh / "shared"
    shared.mkdir()
    os.chown(shared, OTHER_UID, -1)
    shared.chmod(mode)
    monkeypatch.setenv("SENSIMIX_CACHE_DIR", str(shared))
    with pytest.raises(native.NativeBuildError, match=rf"the folder {shared} belongs to another user \(uid 65534, "
                                                      rf"mode {mode:o}\); set SENSIMIX_CACHE_DIR to a folder of your"):
        native.load("popcount.c", ("-mavx2",))
    assert not (shared / "kernels").exists()


@pytest.mark.parametrize("level", ["cache", "parent"])
def test_a_folder_writable_by_others_is_refused_but_a_sticky_one_above_is_not(fresh, monkeypatch, level):
    top = fresh / "top"
    (top / "cache" / "kernels").mkdir(parents=True)
    monkeypatch.setenv("SENSIMIX_CACHE_DIR", str(top / "cache"))
    folder = top / "cache" / "kernels" if level == "cache" else top
    folder.chmod(0o777)
    with pytest.raises(native.NativeBuildError, match=rf"the folder {folder} is writable by other users \(mode 777\)"
                                                      rf".*run `chmod go-w {folder}`"):
        native.load("popcount.c", ("-mavx2",))
    if level == "parent" and CC:  # /tmp-like: others cannot rename or delete what they do not own
        top.chmod(0o1777)
        assert native.load("popcount.c", ("-mavx2",)).sensimix_abi_version() == 1


@needs_root
def test_links_are_followed_only_into_folders_that_are_checked(fresh, monkeypatch):
    theirs = fresh / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, -1)
    (fresh / "mine").mkdir()
    (fresh / "mine" / "kernels").symlink_to(theirs)  # a link in my folder to theirs: their folder is checked
    monkeypatch.setenv("SENSIMIX_CACHE_DIR", str(fresh / "mine"))
    with pytest.raises(native.NativeBuildError, match=rf"the folder {theirs} belongs to another user"):
        native.load("popcount.c", ("-mavx2",))


@needs_cc
def test_a_link_at_the_library_name_is_refused(fresh):
    folder = fresh / "cache" / "kernels"
    plant(fresh / "elsewhere", "lib.so")
    folder.mkdir(parents=True, mode=0o700)
    (folder / POPCOUNT_NAME).symlink_to(fresh / "elsewhere" / "lib.so")
    with pytest.raises(native.NativeBuildError, match="is not a regular file"):
        native.load("popcount.c", ("-mavx2",))
    assert not (fresh / "PLANTED-CODE-RAN").exists()


@needs_root
@needs_cc
def test_a_folder_swapped_while_the_compiler_runs_never_gets_its_library_loaded(fresh, monkeypatch):
    # "another user" replaces the cache folder with theirs, holding a library at the expected name, right after
    # the compiler wrote ours: the library loaded is the one built (by descriptor), theirs is never opened
    cache = fresh / "cache" / "kernels"
    evil = fresh / "evil"
    marker = plant(evil / "kernels", uid=OTHER_UID)
    swap = fresh / "cc-then-swap"
    swap.write_text(f'#!/bin/sh\n{CC} "$@" || exit 1\nmv {cache} {cache}.moved && mv {evil / "kernels"} {cache}\n')
    swap.chmod(0o755)
    monkeypatch.setenv("CC", str(swap))
    lib = native.load("popcount.c", ("-mavx2",))
    assert lib.sensimix_abi_version() == 1 and loaded_from() == f"{cache}.moved/{POPCOUNT_NAME}"
    assert not marker.exists(), "their library must never be loaded"
    native.load.cache_clear()
    native.load_build.cache_clear()
    with pytest.raises(native.NativeBuildError, match="belongs to another user"):  # and not later either
        native.load("popcount.c", ("-mavx2",))
    assert not marker.exists()


@needs_cc
def test_a_library_changed_between_build_and_load_is_not_loaded(fresh, monkeypatch):
    digests = iter(["a" * 64, "b" * 64])
    monkeypatch.setattr(native, "sha256_of", lambda fd: next(digests))
    with pytest.raises(native.NativeBuildError, match="changed between its build and its loading; not loaded"):
        native.load("popcount.c", ("-mavx2",))


@needs_cc
def test_a_source_others_can_write_is_never_compiled(fresh):
    src = fresh / "shared-src" / "k.c"
    src.parent.mkdir()
    src.write_text("int f(void) { return 1; }\n")
    src.parent.chmod(0o777)
    with pytest.raises(native.NativeBuildError, match=rf"the folder {src.parent} is writable by other users"):
        native.load(str(src), ())


# ---------------------------------------------------------------------------------------------------
# a foreign library at the expected name: one line and a fallback, never a traceback
# ---------------------------------------------------------------------------------------------------
@needs_cc
@pytest.mark.parametrize("where", ["cache", "installed"])
@pytest.mark.parametrize("code,says", [("int other(void) { return 0; }\n", "has no sensimix_abi_version()"),
                                       ("#include <stdint.h>\nint64_t sensimix_abi_version(void) { return 7; }\n",
                                        "has ABI version 7, this sensimix needs 1")])
def test_a_foreign_library_is_one_warning_line_and_a_fallback(fresh, caplog, where, code, says):
    folder = fresh / "cache" / "kernels" if where == "cache" else native.INSTALLED
    folder.mkdir(parents=True, mode=0o700)
    compile_c(code, folder / POPCOUNT_NAME)
    with caplog.at_level(logging.WARNING, logger="sensimix.kernels.native"):
        reason = native.unavailable("popcount kernel", set(), lambda: native.load("popcount.c", ("-mavx2",)),
                                    "the next exact kernel runs instead")
    assert f"{folder / POPCOUNT_NAME} {says}" in reason and "\n" not in reason
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None


@needs_cc
def test_a_library_without_a_function_its_wrapper_binds_is_one_line(fresh, caplog):
    plant(fresh / "cache" / "kernels")  # exports sensimix_abi_version() = 1 and nothing else
    with caplog.at_level(logging.WARNING, logger="sensimix.kernels.native"):
        reason = native.unavailable("popcount kernel", set(),
                                    lambda: native.load("popcount.c", ("-mavx2",)).sensimix_xnor_gemm, "fallback")
    assert reason.startswith("its library lacks a function") and "sensimix_xnor_gemm" in reason
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None


def test_without_proc_a_library_is_opened_by_its_checked_real_path(monkeypatch, tmp_path):
    from sensimix.kernels import native_trust

    (tmp_path / "f").write_text("")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert native_trust.fd_path(fd, tmp_path / "f") == f"/proc/self/fd/{fd}"
        monkeypatch.setattr(native_trust.os.path, "exists", lambda path: False)
        assert native_trust.fd_path(fd, tmp_path / "f") == str(tmp_path / "f")
    finally:
        os.close(fd)


def test_a_header_a_source_includes_is_part_of_its_build(tmp_path):
    # editing i16_micro.h must rebuild int16gemm.c and a8gemm.c: the header's bytes are in the library's key
    (tmp_path / "k.c").write_text('#include "a.h"\n#include <stdint.h>\nint64_t sensimix_abi_version(void) { return A; }\n')
    (tmp_path / "a.h").write_text("#define A 1\n")
    build = native_builds.NativeBuild("k", str(tmp_path / "k.c"), (), frozenset())
    assert native_builds.local_includes((tmp_path / "k.c").read_bytes()) == ["a.h"]
    before = native_builds.library_file(build, native_builds.read_bundle(tmp_path / "k.c"))
    (tmp_path / "a.h").write_text("#define A 2\n")
    assert native_builds.library_file(build, native_builds.read_bundle(tmp_path / "k.c")) != before


def test_torch_compile_caches_in_a_checked_folder_of_this_users_cache(fresh, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = native.private_compile_cache()  # not inductor's default /tmp/torchinductor_<user>
    assert folder == (fresh / "cache" / "inductor").resolve() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(fresh / "mine"))  # the user's own choice is kept
    assert native.private_compile_cache() == fresh / "mine"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (fresh / "cache" / "inductor").chmod(0o777)  # another user could have written into it
    with pytest.raises(native.UntrustedPath, match="TORCHINDUCTOR_CACHE_DIR"):
        native.private_compile_cache()


def test_a_compiler_another_user_could_have_written_is_never_run(fresh, monkeypatch):
    shared = fresh / "shared-bin"
    shared.mkdir()
    cc = shared / "cc"
    cc.write_text(f"#!/bin/sh\ntouch {fresh / 'ran'}\nexit 1\n")
    cc.chmod(0o755)
    shared.chmod(0o777)  # e.g. a cc in the current folder of another user's project, found through $PATH
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(native.NativeBuildError, match="writable by other users .*set CC to a compiler that only you"):
        native.load("popcount.c", ("-mavx2",))
    assert not (fresh / "ran").exists()
    shared.chmod(0o755)
    assert native.compiler() == [str(cc)]  # a folder of this user's: its compiler is the user's own choice
