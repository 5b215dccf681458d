"""The device check (scripts/gpu_check.py, a tool run on a lent GPU machine): its budget, its files, its pytest
plugin, its preflight, the card's name; and what the GPU image lacks (``datasets``) does not stop the package or the
test suites."""

from __future__ import annotations

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


# full: within the 600 s a device command may run (timeout_s=590), with the start inside the 15 device minutes
@pytest.mark.parametrize("mode,budget_s", [("full", 560), ("short", 180)])
def test_gpu_check_fits_its_budget_and_the_tools_limits(tmp_path, mode: str, budget_s: int) -> None:
    gc = gpu_check()
    cfg = gc.Config.from_env({"MODE": mode, "OUT": str(tmp_path)})
    steps = gc.plan_steps(cfg, "nvidia-h100-80gb-hbm3")
    assert [s.name for s in steps] == ["unit", "acceptance", "benchmark"]  # acceptance before the benchmark
    assert cfg.deadline <= budget_s
    # the worst case: every step runs to its limit (kill included); the deadline still holds and no step is
    # starved below its reserve
    elapsed = gc.step_limit(cfg, "preflight", 0, [s.name for s in steps])
    for i, step in enumerate(steps):
        limit = gc.step_limit(cfg, step.name, elapsed, [s.name for s in steps[i + 1:]])
        assert limit >= cfg.settings.reserve[step.name]
        elapsed += limit
    assert elapsed <= cfg.deadline
    files = gc.result_files(tmp_path, "nvidia-h100-80gb-hbm3")
    assert len(files) <= gc.MAX_FILES == 8
    for path in files.values():
        rel = path.relative_to(tmp_path)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert "nvidia-h100-80gb-hbm3" in str(rel)
    acceptance = next(s for s in steps if s.name == "acceptance").argv
    assert acceptance[acceptance.index("--kotca-device") + 1] == "cuda"
    if mode == "full":  # the certified count (the CUDA default) x 3 trials, with the accuracy criterion
        assert "--kotca-examples" not in acceptance and acceptance[acceptance.index("--kotca-trials") + 1] == "3"
        assert "not accuracy" not in acceptance
    else:
        assert acceptance[acceptance.index("--kotca-examples") + 1] == "8192"

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
    acceptance = next(s for s in gc.plan_steps(gc.Config.from_env({}), "card") if s.name == "acceptance").argv
    assert acceptance[acceptance.index("gpu_check") - 1] == "-p"

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
