"""The goals a GPU check judges (issues 24 and 26), read from the files its steps wrote; imported by
scripts/gpu_check.py (no torch: the driver holds no CUDA context).

* ``gpu_a8_parity``: the packed A8 model on the card computes the QAT model's bits (the ``gpu``-marked parity tests
  of unit/test_triton_a8.py all passed: the unit step prints each test's outcome with ``-rA``);
* ``certified_*``: SensiMix / BERT-base fp32 (<= 3%) and / BERT-base fp16 SDPA (<= 20%) on the certified workload:
  the default variant from the acceptance session, the A8 (2+1) from its own session (``--kotca-activations a8``);
* ``gpu_a8_*``: the benchmark's GPU goals (:data:`sensimix.bench.results.GOALS`): the A8 (2+1) with CUDA graphs
  against the 3-layer fp16 BERT (<= 0.6), the best GPU peer (<= 0.6), BERT-base fp32 and fp16 at 128 x 128.

Each goal: ``id``, ``source`` (the file or step), ``value`` (a ratio, or passed tests), ``max``, ``met`` (None: not
measured in this call).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PARITY_TESTS = ("test_a8_packed_model_on_gpu", "test_a8_minilm_on_gpu", "test_a8_triton_on_gpu")
CERTIFIED = (("inference_time_ratio", "bert_fp32", 0.03), ("inference_time_ratio_fp16", "bert_fp16", 0.20))


def parity(unit_lines: list[str]) -> dict[str, Any]:
    """The A8 parity tests' outcomes in the unit step's ``-rA`` summary (``PASSED unit/...::test_...``)."""
    seen = {}
    for line in unit_lines:
        m = re.match(r"(PASSED|FAILED|ERROR|SKIPPED)\S*\s+(unit/\S+::(\S+))", line.strip())
        if m and m.group(3).startswith(PARITY_TESTS):
            seen[m.group(2)] = m.group(1)
    ran = {k: v for k, v in seen.items() if v != "SKIPPED"}
    passed = sum(v == "PASSED" for v in ran.values())
    return {"id": "gpu_a8_parity", "source": "unit", "value": f"{passed} of {len(ran)} passed", "max": None,
            "met": None if not ran else passed == len(ran), "tests": seen}


def certified(path: Path, label: str) -> list[dict[str, Any]]:
    """The certified-workload goals of one acceptance session's JSON ("kotca": its report)."""
    try:
        report = json.loads(path.read_text())["kotca"]
    except (OSError, ValueError, KeyError, TypeError):
        report = {}
    values = {c.get("id"): c.get("value") for c in report.get("criteria", [])}
    timing = report.get("timing") or {}
    workload = (f"{timing.get('num_examples')} examples x {len(timing.get('trials') or [])} trials, "
                f"{timing.get('data')}") if timing else "not measured"
    out = []
    for criterion, against, bar in CERTIFIED:
        value = values.get(criterion)
        out.append({"id": f"certified_{label}time_vs_{against}", "source": path.name, "value": value, "max": bar,
                    "met": None if value is None else value <= bar, "workload": workload})
    return out


def benchmark(path: Path) -> list[dict[str, Any]]:
    """The benchmark JSON's GPU goals (ids ``gpu_*``)."""
    try:
        goals = json.loads(path.read_text()).get("goals", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [{"id": g["id"], "source": path.name, "value": g.get("ratio"), "max": g.get("max_ratio"),
             "met": g.get("met"), "model": g.get("model"), "against": g.get("against")}
            for g in goals if str(g.get("id", "")).startswith("gpu_")]


def judge(files: dict[str, Path], steps: list[str], unit_lines: list[str]) -> list[dict[str, Any]]:
    """Every goal this call's ``steps`` measured."""
    out = []
    if "unit" in steps:
        out.append(parity(unit_lines))
    if "acceptance" in steps:
        out += certified(files["acceptance"], "")
    if "acceptance-a8" in steps:
        out += certified(files["acceptance_a8"], "a8_")
    if "benchmark" in steps:
        out += benchmark(files["benchmark"])
    return out


def lines(goals: list[dict[str, Any]]) -> list[str]:
    """One line per goal for the log's last lines."""
    out = []
    for g in goals:
        value = g["value"]
        shown = value if isinstance(value, str) else "n/a" if value is None else f"{value:.4f}"
        bar = "" if g["max"] is None else f" (<= {g['max']})"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        out.append(f"goal {g['id']}: {shown}{bar} {verdict} [{g['source']}]")
    return out


def report_lines(path: Path) -> list[str]:
    """One line per criterion of a report.json (the last lines of the output are what a device reply shows)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"no report ({path.name} missing or unreadable)"]
    lines = []
    for c in report.get("criteria", []):
        value = c.get("value")
        shown = "-" if value is None else (f"{value:.2f} points" if c.get("unit") == "points" else f"{100 * value:.2f}%")
        verdict = {True: "PASS", False: "FAIL", None: "skipped"}[c.get("pass")]
        lines.append(f"{c.get('id')}: {shown} ({c.get('comparison')} {c.get('threshold')}) {verdict}")
    timing = report.get("timing") or {}
    if timing:
        lines.append(f"timing: {timing.get('num_examples')} examples x {len(timing.get('trials', []))} trials on "
                     f"{timing.get('device')} ({timing.get('data')}); trials ms: {timing.get('trials')}")
    return lines
