#!/usr/bin/env python3
"""The prepared GPU check (issues 9 and 26), run ON the lent GPU machine from the repository root.

After ``bash scripts/gpu_prepare.sh`` in the checkout that makes the calls (it fills the git-ignored ``.gpu/``), two
calls, the second at once after the first (the machine stays warm ~30 s; 15 device minutes in all, start included)::

    run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=470)             # MODE=full:  <= 460 s
    run(command="MODE=bench bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=300)  # MODE=bench: <= 290 s
    run(command="MODE=short bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=190)  # a rerun:    <= 180 s

It uses the machine's own ``python3`` (torch 2.11 + CUDA, transformers, triton, pytest, pytest-benchmark,
matplotlib); nothing is installed or downloaded (``datasets`` is not needed, the MiniLM and GLUE files travel in
``.gpu/``). Steps, each its own process under its own limit, inside one deadline per call::

    mode   step           what                                                     cap (expected on H100)
    all    preflight      CUDA, versions, carried files, free GPU memory and disk    30 s (~15 s)
    full   unit           pytest unit -m gpu: CUDA kernels, runtime vs QAT, A8        90 s (~60 s: Triton compiles
                          parity (a8-triton == sensimix.a8, packed == QAT), graphs            the A8 kernels once)
    full   acceptance     pytest acceptance --kotca-device cuda, default variant:   330 s (~280 s)
                          104,743 x 3 trials + the CI-sized accuracy run
    full   acceptance-a8  the A8 (2+1) timed as certified (QNLI dev, 128 x 128)       90 s (~50 s)
                          on 16,384 examples x 2 trials (--kotca-activations a8)
    bench  benchmark      benchmark.py --device cuda: 20 batches of 128 x 128 x     200 s (~130 s)
                          3 rounds, every SensiMix precision and variant with and
                          without CUDA graphs, the GPU peers (CUDA graphs), the
                          GEMM table (A8 kernels included); --no-memory --no-compile
    bench  profile        profile_forward.py: where a forward's time goes, eager     70 s (~45 s)
                          and replayed from CUDA graphs, fp16 and A8
    short  unit, acceptance (8,192 x 2, no accuracy), benchmark (the key rows)    40 + 60 + 55 s

Budget, from H200 figures (ms per 128 x 128 batch: BERT-base fp32 eager 65.5, fp16 SDPA 7.37, a 3-layer fp16
BERT 1.99; the H100 has the same SMs and slower memory, so ~10% is added): 104,743 examples = 819 batches, per
trial BERT fp32 ~59 s, fp16 ~7 s, SensiMix (2+1) ~5 s: ~215 s for 3 trials, plus ~25 s to build the folders and
stage the batches, ~40 s for the accuracy training; the first H200 run took 244 s for this step. The A8 step: 128
batches, BERT fp32 ~8.4 s and fp16 ~1 s per trial, plus the folders. torch.compile rows stay out (one compiled for
~100 s in its warm-up on the H200 machine).

A step's limit is min(its cap, time left to the deadline minus the minimum kept for the steps after it). At the limit
minus 15 s it gets SIGINT (pytest then still writes its JSON and the report with what it measured: the acceptance
steps load this file as a pytest plugin, ``-p gpu_check``, that drops a benchmark cut before its first round, which
would otherwise make pytest-benchmark fail writing anything), at the limit SIGKILL. A failed step does not stop the
later ones; a failed preflight stops everything (within seconds), printing one ``MISSING:`` line per missing thing.
Triton's cache is ``.triton-cache/`` (git-ignored, not carried): the second call on the warm machine finds the A8
kernels compiled.

What comes back in ``$OUT`` (at most 8 files come back, one folder deep), named by the card
(:func:`sensimix.devices.card_slug`, as in .github/workflows/gpu-acceptance.yml)::

    gpu-check-<card>.log              everything printed                                      every mode
    summary-<card>.json               mode, card, versions, preflight, each step's exit,      every mode
                                      seconds and limit, and the goals judged (gpu_goals.py)
    acceptance-<card>.json            pytest-benchmark JSON of the acceptance session          full, short
                                      ("kotca" key: the whole report)
    report-<card>/report.{json,md,png}  that session's KOTCA report                            full, short
    acceptance-a8-<card>.json         the A8 (2+1)'s timing session                            full
    benchmark-<card>.json             scripts/benchmark.py --json                              bench, short
    profile-<card>.json               scripts/profile_forward.py --json                        bench

Settings (environment): MODE=full|bench|short, DEVICE (cuda), OUT ($OUT, else ./gpu-out), GPU_DIR (.gpu), STEPS (e.g.
``acceptance,benchmark``: the preflight always runs; default: the mode's), KOTCA_EXAMPLES, KOTCA_TRIALS, UNIT_ARGS,
ACCEPTANCE_ARGS, BENCH_ARGS (extra arguments, shell-quoted), DEADLINE_S, CAP_SCALE (caps, reserves and deadline
times this, for dry runs on a slow CPU), PY (the python that runs the steps).

Dry run on a CPU machine (the plumbing, not the GPU; a few minutes on 2 cores)::

    DEVICE=cpu MODE=short CAP_SCALE=3 KOTCA_EXAMPLES=8 OUT=/tmp/gpu-dry PY=.venv/bin/python \\
      BENCH_ARGS="--no-gemm --rounds 1 --examples 8 --batch-size 8 --seq-len 32" nice bash scripts/gpu_check.sh

This file imports no torch at the top: the driver holds no CUDA context while the steps run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # gpu_goals, beside this file (also when loaded as a pytest plugin)
import gpu_goals  # after the path they are found on
from gpu_preflight import preflight
from gpu_steps import GRACE_S, Console, StepResult, run_step  # noqa: F401 - GRACE_S: the docstring's 15 s
MODES = ("full", "bench", "short")
STEP_NAMES = ("unit", "acceptance", "acceptance-a8", "benchmark", "profile")
MAX_FILES = 8  # what the device tool brings back from $OUT
A8_EXAMPLES, A8_TRIALS = 16384, 2  # the A8 (2+1)'s timing: 128 batches of the certified shape, twice
# the short mode's benchmark: the rows the goals read (the baseline always runs)
SHORT_ROWS = ("bert-fp16,bert3-fp16,bert3-fp16-graphs,sensimix-2+1-fast,sensimix-2+1-fast-graphs,sensimix-2+1-fp16*,"
              "sensimix-2+1-a8-fast,sensimix-2+1-a8-fast-graphs")


@dataclass
class Mode:
    deadline_s: int
    steps: tuple[str, ...]  # the steps after the preflight, in order
    caps: dict[str, int]  # preflight and each step
    reserve: dict[str, int]  # the least a later step is left when an earlier one runs long
    examples: int | None  # None: the acceptance default (104,743 on CUDA, 256 on CPU)
    trials: int
    acceptance_args: list[str]
    bench_args: list[str]


MODE_SETTINGS = {
    # the benchmark skips its per-model weight-memory processes (a CUDA context each: ~35 s on a fresh machine) and
    # its torch.compile rows (one compiled for ~100 s in its warm-up on an H200 machine, past the cap); it runs the
    # certified shape, 128 x 128, so that its BERT-base ratios speak for the certified workload's batches
    "full": Mode(deadline_s=460, steps=("unit", "acceptance", "acceptance-a8"),
                 caps={"preflight": 30, "unit": 90, "acceptance": 330, "acceptance-a8": 90},
                 reserve={"unit": 30, "acceptance": 200, "acceptance-a8": 30}, examples=None, trials=3,
                 acceptance_args=[], bench_args=[]),
    "bench": Mode(deadline_s=290, steps=("benchmark", "profile"),
                  caps={"preflight": 30, "benchmark": 200, "profile": 70},
                  reserve={"benchmark": 100, "profile": 40}, examples=None, trials=3, acceptance_args=[],
                  bench_args=["--rounds", "3", "--batch-size", "128", "--examples", "2560", "--no-memory",
                              "--no-compile"]),
    "short": Mode(deadline_s=180, steps=("unit", "acceptance", "benchmark"),
                  caps={"preflight": 20, "unit": 40, "acceptance": 60, "benchmark": 55},
                  reserve={"unit": 15, "acceptance": 35, "benchmark": 25}, examples=8192, trials=2,
                  acceptance_args=["-m", "not accuracy"],
                  bench_args=["--rounds", "2", "--batch-size", "128", "--examples", "640", "--gemm-reps", "10",
                              "--no-memory", "--no-compile", "--rows", SHORT_ROWS]),
}


@dataclass
class Config:
    mode: str = "full"
    device: str = "cuda"
    out: Path = Path("gpu-out")
    gpu_dir: Path = ROOT / ".gpu"
    steps: tuple[str, ...] | None = None  # None: the mode's
    examples: int | None = None
    trials: int | None = None
    unit_args: list[str] = field(default_factory=list)
    acceptance_args: list[str] = field(default_factory=list)
    bench_args: list[str] = field(default_factory=list)
    deadline_s: int | None = None
    cap_scale: float = 1.0  # > 1 for dry runs on a slow CPU: caps, reserves and the deadline scaled alike
    python: str = sys.executable

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Config:
        mode = env.get("MODE", "full").strip().lower() or "full"
        if mode not in MODES:
            raise SystemExit(f"MODE must be one of {', '.join(MODES)}, got {mode!r}")
        steps = tuple(s.strip() for s in env.get("STEPS", "").split(",") if s.strip()) or None
        unknown = [s for s in steps or () if s not in STEP_NAMES + ("preflight",)]
        if unknown:
            raise SystemExit(f"STEPS: unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")

        def number(name: str) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return None
            try:
                return int(raw.replace(",", "").replace("_", ""))
            except ValueError:
                raise SystemExit(f"{name} must be an integer, got {raw!r}") from None

        return cls(mode=mode, device=env.get("DEVICE", "cuda"), out=Path(env.get("OUT") or "gpu-out").resolve(),
                   gpu_dir=Path(env.get("GPU_DIR") or ROOT / ".gpu").resolve(),
                   steps=None if steps is None else tuple(s for s in STEP_NAMES if s in steps),
                   examples=number("KOTCA_EXAMPLES"),
                   trials=number("KOTCA_TRIALS"), unit_args=shlex.split(env.get("UNIT_ARGS", "")),
                   acceptance_args=shlex.split(env.get("ACCEPTANCE_ARGS", "")),
                   bench_args=shlex.split(env.get("BENCH_ARGS", "")), deadline_s=number("DEADLINE_S"),
                   cap_scale=float(env.get("CAP_SCALE") or 1.0), python=env.get("PY") or sys.executable)

    @property
    def settings(self) -> Mode:
        m = MODE_SETTINGS[self.mode]
        if self.cap_scale == 1.0:
            return m
        scaled = {k: round(v * self.cap_scale) for k, v in m.caps.items()}
        return dataclasses.replace(m, deadline_s=round(m.deadline_s * self.cap_scale), caps=scaled,
                                   reserve={k: round(v * self.cap_scale) for k, v in m.reserve.items()})

    @property
    def deadline(self) -> int:
        return self.deadline_s or self.settings.deadline_s

    @property
    def chosen(self) -> tuple[str, ...]:
        """The steps this call runs after the preflight: STEPS, else the mode's."""
        return self.settings.steps if self.steps is None else self.steps


# ---------------------------------------------------------------------------------------------------
# the plan: which processes, under which limits, writing which files
# ---------------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    cap_s: int
    argv: list[str]


def result_files(out: Path, slug: str, steps: tuple[str, ...] = STEP_NAMES) -> dict[str, Path]:
    """The files a call that runs ``steps`` leaves in ``out`` (the device tool brings back at most 8)."""
    report = out / f"report-{slug}"
    files = {"log": out / f"gpu-check-{slug}.log", "summary": out / f"summary-{slug}.json"}
    if "acceptance" in steps:
        files.update(acceptance=out / f"acceptance-{slug}.json", report_json=report / "report.json",
                     report_md=report / "report.md", report_png=report / "report.png")
    if "acceptance-a8" in steps:
        files["acceptance_a8"] = out / f"acceptance-a8-{slug}.json"
    if "benchmark" in steps:
        files["benchmark"] = out / f"benchmark-{slug}.json"
    if "profile" in steps:
        files["profile"] = out / f"profile-{slug}.json"
    return files


def plan_steps(cfg: Config, slug: str) -> list[Step]:
    """The steps after the preflight, in order (the mode's, or STEPS)."""
    m, py = cfg.settings, cfg.python
    files = result_files(cfg.out, slug)
    examples = cfg.examples if cfg.examples is not None else m.examples
    trials = cfg.trials if cfg.trials is not None else m.trials
    acceptance = [py, "-m", "pytest", "-p", "no:cacheprovider", "-p", "gpu_check", "-ra", "--kotca-device", cfg.device]
    steps = {
        "unit": [py, "-m", "pytest", "unit", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", "-q",
                 *cfg.unit_args],
        "acceptance": [*acceptance[:3], "acceptance", *acceptance[3:], "--kotca-trials", str(trials),
                       *(["--kotca-examples", str(examples)] if examples else []),
                       "--benchmark-json", str(files["acceptance"]),
                       "--kotca-report", str(files["report_json"].parent), *m.acceptance_args, *cfg.acceptance_args],
        # the A8 (2+1) timed as certified, on fewer examples (its goals: <= 3% of BERT fp32, <= 20% of BERT fp16)
        "acceptance-a8": [*acceptance[:3], "acceptance/test_inference_time_ratio.py", *acceptance[3:],
                          "--kotca-activations", "a8", "--kotca-trials", str(A8_TRIALS), "--kotca-examples",
                          str(A8_EXAMPLES), "--benchmark-json", str(files["acceptance_a8"])],
        "benchmark": [py, "scripts/benchmark.py", "--device", cfg.device, "--json", str(files["benchmark"]),
                      *m.bench_args, *cfg.bench_args],
        "profile": [py, "scripts/profile_forward.py", "--device", cfg.device, "--batches", "8", "--batch-size", "128",
                    "--passes", "3", "--json", str(files["profile"])],
    }
    return [Step(name, m.caps[name], steps[name]) for name in STEP_NAMES if name in cfg.chosen]


def step_limit(cfg: Config, step: str, elapsed: float, later: list[str]) -> int:
    """min(the step's cap, what is left before the deadline after keeping each later step its minimum)."""
    m = cfg.settings
    left = cfg.deadline - elapsed - sum(m.reserve[s] for s in later)
    return max(0, int(min(m.caps[step], left)))


def step_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton-cache"))  # kept between calls on a warm machine
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MPLBACKEND="Agg", GLUE_DIR=str(cfg.gpu_dir / "glue"), SENSIMIX_PRETRAINED=str(cfg.gpu_dir / "minilm"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH", ""))
                                          if p))
    return env


# ---------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------
def check(cfg: Config) -> int:
    start = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    say = Console(cfg.out / "gpu-check.log")
    env = step_env(cfg)
    say(f"gpu_check: MODE={cfg.mode} DEVICE={cfg.device} deadline {cfg.deadline} s, steps {','.join(cfg.chosen)}, "
        f"OUT={cfg.out}, GPU_DIR={cfg.gpu_dir}, python {cfg.python}")
    later = list(cfg.chosen)
    results: list[StepResult] = []
    pre_lines: list[str] = []
    pre = run_step("preflight", [cfg.python, str(Path(__file__).resolve()), "--preflight"],
                   step_limit(cfg, "preflight", 0, later), cfg.settings.caps["preflight"], env, say, pre_lines)
    results.append(pre)
    info = next((json.loads(ln.split(" ", 1)[1]) for ln in reversed(pre_lines) if ln.startswith("PREFLIGHT-JSON ")),
                {})
    slug = info.get("card", "unknown-card")
    files = result_files(cfg.out, slug, cfg.chosen)
    say.move(files["log"])
    step_lines: dict[str, list[str]] = {}
    pre.last_line = "; ".join(info.get("problems", [])) or ("ok" if pre.exit == 0 else pre.last_line)
    if pre.exit != 0:
        say(f"gpu_check: preflight failed ({len(info.get('problems', [])) or 'see above'} missing): nothing was run")
    else:
        for i, step in enumerate(plan_steps(cfg, slug)):
            rest = [s.name for s in plan_steps(cfg, slug)[i + 1:]]
            limit = step_limit(cfg, step.name, time.monotonic() - start, rest)
            results.append(run_step(step.name, step.argv, limit, step.cap_s, env, say,
                                    step_lines.setdefault(step.name, [])))
    if "report_json" in files:
        (files["report_json"].parent / "history.jsonl").unlink(missing_ok=True)  # one run: report.json has it all
    ran = [r.name for r in results if r.name != "preflight"]
    goals = gpu_goals.judge(files, ran, step_lines.get("unit", []))
    total = time.monotonic() - start
    passed = all(r.exit == 0 for r in results)
    summary = {"schema": "sensimix-gpu-check/2", "mode": cfg.mode, "device": cfg.device, "card": slug,
               "passed": passed, "seconds": round(total, 1), "deadline_s": cfg.deadline, "preflight": info,
               "steps": [asdict(r) for r in results], "goals": goals,
               "files": sorted(str(p.relative_to(cfg.out)) for p in files.values()
                               if p.is_file() or p == files["summary"])}
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    say("=== summary ===")
    for r in results:
        say(f"{r.name:<13} exit {r.exit}  {r.seconds:6.0f} s of {r.limit_s} s  {r.last_line}")
    if any(r.name == "acceptance" for r in results):
        for line in gpu_goals.report_lines(files["report_json"]):
            say(line)
    for line in gpu_goals.lines(goals):
        say(line)
    present = sorted(p for p in cfg.out.rglob("*") if p.is_file())
    say(f"{len(present)} files in OUT ({total:.0f} s in all, deadline {cfg.deadline} s): "
        + ", ".join(str(p.relative_to(cfg.out)) for p in present))
    if len(present) > MAX_FILES:
        say(f"WARNING: more than {MAX_FILES} files in OUT: the device tool brings back only {MAX_FILES}")
    say(f"gpu_check: {'PASSED' if passed else 'FAILED'}")
    say.close()
    return 0 if passed else (2 if pre.exit != 0 else 1)


# ---------------------------------------------------------------------------------------------------
# a pytest plugin for the acceptance step (``-p gpu_check``): results survive the step's SIGINT
# ---------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the driver itself needs no pytest
    pytest = None

if pytest is not None:

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(session, exitstatus):
        # SIGINT in the middle of a benchmark leaves it with no finished round, and pytest-benchmark then fails
        # writing its JSON (min() of no times) and takes the session's KOTCA report down with it. Keep the
        # benchmarks that finished a round (the trials the V&V run judged are kept on the run itself).
        bs = getattr(session.config, "_benchmarksession", None)
        if bs is not None and getattr(bs, "benchmarks", None):
            dropped = [b.name for b in bs.benchmarks if not b]
            bs.benchmarks[:] = [b for b in bs.benchmarks if b]
            if dropped:
                print(f"\ngpu_check: interrupted benchmarks not saved (no finished round): {', '.join(dropped)}")
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The one prepared GPU check (settings: see the module docstring).")
    p.add_argument("--preflight", action="store_true", help="only the preflight (exit 2 when something is missing)")
    p.add_argument("--plan", action="store_true", help="print the steps and their caps, run nothing")
    args = p.parse_args(argv)
    cfg = Config.from_env(dict(os.environ))
    if args.preflight:
        return preflight(cfg)
    if args.plan:
        m = cfg.settings
        print(f"MODE={cfg.mode}: deadline {cfg.deadline} s; preflight cap {m.caps['preflight']} s")
        for step in plan_steps(cfg, "<card>"):
            print(f"{step.name}: cap {step.cap_s} s: {shlex.join(step.argv)}")
        print("files: " + ", ".join(str(p.relative_to(cfg.out)) for p in result_files(cfg.out, "<card>",
                                                                                      cfg.chosen).values()))
        return 0
    return check(cfg)


if __name__ == "__main__":
    sys.exit(main())
