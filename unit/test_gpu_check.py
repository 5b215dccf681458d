"""The device check (scripts/gpu_check.py, a tool run on a lent GPU machine): its budget, its files, its pytest
plugin, its preflight, the card's name; and what the GPU image lacks (``datasets``) does not stop the package or the
test suites."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
from helpers import CUDA, ROOT, load_script

from sensimix import devices


# ---------------------------------------------------------------------------------------------------
# no `datasets` (the GPU image has none)
# ---------------------------------------------------------------------------------------------------
def test_imports_and_collection_without_datasets() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["datasets"] = None  # `import datasets` now raises ImportError, as on the GPU image
        import sensimix, sensimix.vv, sensimix.train, sensimix.kernels, sensimix.inference
        from sensimix import data
        try:
            data._read_hub(data.task_spec("sst-2"), "dev")
        except ImportError as exc:
            assert "sensimix[hub]" in str(exc), exc
        else:
            raise AssertionError("the hub reader ran without datasets")
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                              "--kotca-device", "cpu", "acceptance", "unit"]))
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "test_inference_time_ratio" in run.stdout and "test_cuda_plan.py" in run.stdout
    assert re.search(r"\d+ tests collected", run.stdout), run.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------
# the device check: naming, budget, files, plugin, preflight
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"), ("NVIDIA H200", "nvidia-h200"),
                                       (" Tesla V100-SXM2-16GB ", "tesla-v100-sxm2-16gb"),
                                       ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13-64-core-processor"),
                                       ("???", "unknown-device")])
def test_card_slug(monkeypatch, name: str, slug: str) -> None:
    monkeypatch.setattr(devices, "device_name", lambda device: name)
    assert devices.card_slug("cuda") == slug


def gpu_check():
    return load_script("gpu_check")


# each limit by hand: min(cap, deadline - elapsed - the later steps' reserves), every step run to its limit
BUDGETS = {
    # preflight 30; unit min(90, 460 - 30 - 230) = 90; acceptance min(330, 460 - 120 - 30) = 310; a8 min(90, 30) = 30
    "full": (460, ["unit", "acceptance", "acceptance-a8"], [30, 90, 310, 30]),
    # preflight 30; benchmark min(200, 290 - 30 - 40) = 200; profile min(70, 290 - 230) = 60
    "bench": (290, ["benchmark", "profile"], [30, 200, 60]),
    # preflight 20; unit min(40, 180 - 20 - 60) = 40; acceptance min(60, 180 - 60 - 25) = 60; benchmark min(55, 60) = 55
    "short": (180, ["unit", "acceptance", "benchmark"], [20, 40, 60, 55]),
}


@pytest.mark.parametrize("mode", list(BUDGETS))
def test_gpu_check_fits_its_budget_and_the_tools_limits(tmp_path, mode: str) -> None:
    gc = gpu_check()
    deadline, names, limits = BUDGETS[mode]
    cfg = gc.Config.from_env({"MODE": mode, "OUT": str(tmp_path)})
    steps = gc.plan_steps(cfg, "nvidia-h100-80gb-hbm3")
    assert [s.name for s in steps] == names and cfg.deadline == deadline <= 470  # a command runs <= 8 minutes
    # the worst case: every step runs to its limit (kill included); the deadline still holds and no step is
    # starved below its reserve
    elapsed = gc.step_limit(cfg, "preflight", 0, names)
    got = [elapsed]
    for i, step in enumerate(steps):
        limit = gc.step_limit(cfg, step.name, elapsed, names[i + 1:])
        assert limit >= cfg.settings.reserve[step.name]
        got.append(limit)
        elapsed += limit
    assert got == limits and elapsed <= cfg.deadline
    files = gc.result_files(tmp_path, "nvidia-h100-80gb-hbm3", cfg.chosen)
    assert len(files) <= gc.MAX_FILES == 8
    for path in files.values():
        rel = path.relative_to(tmp_path)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert "nvidia-h100-80gb-hbm3" in str(rel)
    for step in steps:  # each step writes its files where result_files says
        written = [a for a in step.argv if str(tmp_path) in a]
        assert all(any(a == str(p) or a == str(p.parent) for p in files.values()) for a in written), step.name
    if "acceptance" in names:
        acceptance = next(s for s in steps if s.name == "acceptance").argv
        assert acceptance[acceptance.index("--kotca-device") + 1] == "cuda"
    if mode == "full":  # the certified count (the CUDA default) x 3 trials, with the accuracy criterion; the A8 row
        assert "--kotca-examples" not in acceptance and acceptance[acceptance.index("--kotca-trials") + 1] == "3"
        assert "not accuracy" not in acceptance
        a8 = steps[2].argv
        assert a8[a8.index("--kotca-activations") + 1] == "a8" and "acceptance/test_inference_time_ratio.py" in a8
    if mode == "short":
        assert acceptance[acceptance.index("--kotca-examples") + 1] == "8192"
    if mode in ("bench", "short"):  # the certified shape, no compile rows, no memory processes
        bench = next(s for s in steps if s.name == "benchmark").argv
        assert bench[bench.index("--batch-size") + 1] == "128" and {"--no-compile", "--no-memory"} <= set(bench)


def test_the_two_calls_fit_the_device_minutes() -> None:
    # 15 device minutes, the start included: full then bench at once, each under its timeout_s (deadline + 10 s)
    gc = gpu_check()
    full, bench = (gc.MODE_SETTINGS[m].deadline_s + 10 for m in ("full", "bench"))
    assert full + bench <= 780, "leaves >= 2 minutes of the 15 for the machine's start"
    doc = gc.__doc__
    assert f"timeout_s={full})" in doc and f"timeout_s={bench})" in doc
    assert f"timeout_s={gc.MODE_SETTINGS['short'].deadline_s + 10})" in doc


def test_steps_can_be_chosen_and_unknown_ones_are_refused(tmp_path) -> None:
    gc = gpu_check()
    cfg = gc.Config.from_env({"MODE": "bench", "STEPS": "profile", "OUT": str(tmp_path)})
    assert [s.name for s in gc.plan_steps(cfg, "card")] == ["profile"]
    assert list(gc.result_files(tmp_path, "card", cfg.chosen)) == ["log", "summary", "profile"]
    with pytest.raises(SystemExit, match="unknown step"):
        gc.Config.from_env({"STEPS": "acceptance,nope"})
    with pytest.raises(SystemExit, match="MODE must be one of full, bench, short"):
        gc.Config.from_env({"MODE": "long"})


def test_goals_are_read_from_the_steps_files(tmp_path) -> None:
    goals = load_script("gpu_goals")
    unit = ["PASSED unit/test_triton_a8.py::test_a8_packed_model_on_gpu_is_the_qat_model_s_bits[True-a8-triton]",
            "FAILED unit/test_triton_a8.py::test_a8_minilm_on_gpu_is_the_qat_model_s_bits - AssertionError",
            "SKIPPED [1] unit/test_triton_a8.py:332: needs the packaged MiniLM-L6",
            "PASSED unit/test_graphs.py::test_cuda_graphs_on_gpu_replay_the_forward[fp32-a8]"]
    parity = goals.parity(unit)
    assert (parity["value"], parity["met"]) == ("1 of 2 passed", False) and len(parity["tests"]) == 2
    assert goals.parity(unit[:1])["met"] is True and goals.parity(unit[2:])["met"] is None
    report = {"kotca": {"criteria": [{"id": "inference_time_ratio", "value": 0.025},
                                     {"id": "inference_time_ratio_fp16", "value": 0.31}],
                        "timing": {"num_examples": 16384, "trials": [{}, {}], "data": "QNLI dev"}}}
    (tmp_path / "a8.json").write_text(json.dumps(report))
    got = {g["id"]: (g["value"], g["met"]) for g in goals.certified(tmp_path / "a8.json", "a8_")}
    assert got == {"certified_a8_time_vs_bert_fp32": (0.025, True), "certified_a8_time_vs_bert_fp16": (0.31, False)}
    missing = goals.certified(tmp_path / "none.json", "")
    assert [g["met"] for g in missing] == [None, None] and missing[0]["workload"] == "not measured"
    (tmp_path / "bench.json").write_text(json.dumps({"goals": [
        {"id": "fast_time_vs_best_peer", "ratio": 0.5, "max_ratio": 0.75, "met": True},
        {"id": "gpu_a8_time_vs_3layer_fp16", "ratio": 0.7, "max_ratio": 0.6, "met": False,
         "model": "sensimix-2+1-a8-fast-graphs", "against": "bert3-fp16"}]}))
    bench = goals.benchmark(tmp_path / "bench.json")
    assert [(g["id"], g["met"]) for g in bench] == [("gpu_a8_time_vs_3layer_fp16", False)]
    lines = goals.lines([parity, *bench])
    assert lines == ["goal gpu_a8_parity: 1 of 2 passed NOT met [unit]",
                     "goal gpu_a8_time_vs_3layer_fp16: 0.7000 (<= 0.6) NOT met [bench.json]"]

def test_gpu_check_keeps_the_finished_benchmarks_of_an_interrupted_session() -> None:
    # the acceptance step loads gpu_check as a pytest plugin: at SIGINT a benchmark with no finished round would
    # make pytest-benchmark fail writing the JSON (and lose the KOTCA report); it is dropped, the others are kept
    gc = gpu_check()

    class Bench:
        def __init__(self, name: str, rounds: int) -> None:
            self.name, self.rounds = name, rounds

        def __bool__(self) -> bool:
            return self.rounds > 0

    done, cut = Bench("test_bert_fp32_inference", 1), Bench("test_sensimix_inference", 0)
    bs = SimpleNamespace(benchmarks=[done, cut])
    hook = gc.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace(_benchmarksession=bs)), 2)
    next(hook)  # the part before pytest-benchmark's own sessionfinish
    assert bs.benchmarks == [done]
    for step in gc.plan_steps(gc.Config.from_env({}), "card"):
        if step.name.startswith("acceptance"):
            assert step.argv[step.argv.index("gpu_check") - 1] == "-p"

def test_preflight_names_what_is_missing_and_stops_in_seconds(tmp_path) -> None:
    env = dict(os.environ, DEVICE="cuda", GPU_DIR=str(tmp_path / "no-carry"), OUT=str(tmp_path / "out"),
               PY=sys.executable)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    seconds = time.monotonic() - t0
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    missing = [ln for ln in out.splitlines() if ln.startswith("MISSING: ")]
    assert sum("no-carry" in ln for ln in missing) == 6  # one line per carried file
    if not CUDA:
        assert any(ln.startswith("MISSING: CUDA") for ln in missing)
    assert "nothing was run" in out and "=== unit" not in out
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 2 and left[0].startswith("gpu-check-") and left[1].startswith("summary-")
    assert seconds < 60, f"the preflight took {seconds:.0f} s"
