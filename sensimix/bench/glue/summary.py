"""Summaries of a results file (nothing is trained): the table, A8 vs fp32 activations, the gap to the reference,
SensiMix against the int8 BERT of its depth, the ablation, and the goals, as a JSON-ready dict and as text.

Runs are grouped by task and protocol (the same training settings: runs of another ``--train-limit`` are other
rows, never averaged together). Scores are in points (metric x 100); a spread is the sample standard deviation
(n - 1) over seeds; comparisons pair runs by seed (the same reference, the same training subset), so each figure
is the mean and spread of per-seed differences.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from ..parity import LOGIT_TOLERANCE
from .metrics import METRIC_TITLES, TASK_METRICS
from .plans import (
    ABLATIONS,
    ACTIVATIONS,
    FULL,
    INT8,
    INT8_PEERS,
    MODEL_TITLES,
    REFERENCE,
    SENSIMIX_MODELS,
    TASK_ORDER,
    same_as_full,
)

SCHEMA = "sensimix-glue-table/1"
GAP_GOALS = {"3+3": 1.0, "2+1": 3.0}  # points below the fp32 reference, mean over seeds, on every task
A8_GOAL = 0.5                          # points A8 may lose against fp32 activations, mean over seeds
NOISE_RULE = ("an effect (or difference) is 'inside the noise' when |mean| <= spread, the sample standard deviation "
              "over seeds of the per-seed differences (paired by seed: the same reference and training subset); "
              "with one seed there is no spread and no verdict")


def mean_spread(values: Iterable[float]) -> dict[str, Any]:
    """{"mean", "spread" (sample std; None for one value), "n"}."""
    xs = list(values)
    return {"mean": statistics.fmean(xs) if xs else None,
            "spread": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def verdict(stats: dict[str, Any], positive: str = "helps", negative: str = "hurts") -> str:
    """The noise rule (:data:`NOISE_RULE`) for a difference: ``positive`` above the noise, ``negative`` below."""
    if stats["n"] < 2 or stats["spread"] is None:
        return "one seed: no spread"
    if abs(stats["mean"]) <= stats["spread"]:
        return "inside the noise"
    return positive if stats["mean"] > 0 else negative


def _verdicts(verdicts: dict[str, str]) -> str:
    """One verdict when every metric's is the same (MRPC's F1 and accuracy), else each metric's."""
    if len(set(verdicts.values())) == 1:
        return next(iter(verdicts.values()))
    return ", ".join(f"{METRIC_TITLES[m]} {v}" for m, v in verdicts.items())


def _points(record: dict[str, Any], metric: str) -> float | None:
    value = record["metrics"].get(metric)
    return None if value is None else 100.0 * value


def _groups(records: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(task, protocol digest, records) in task order; a task's protocols in order of first appearance."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        found.setdefault((r["task"], r["protocol_digest"]), []).append(r)
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    keys = sorted(found, key=lambda k: (order.get(k[0], len(order)), list(found).index(k)))
    return [(task, digest, found[(task, digest)]) for task, digest in keys]


def _by_seed(records: list[dict[str, Any]], model: str, activations: str, ablation: str) -> dict[int, dict]:
    """The runs of one kind by seed (a seed run twice: the last line wins)."""
    return {r["seed"]: r for r in records
            if (r["model"], r["activations"], r["ablation"]) == (model, activations, ablation)}


def _reference_sha(record: dict[str, Any]) -> str | None:
    return (record.get("reference") or {}).get("pytorch_model_sha256")


def _paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict[str, Any]:
    """Mean and spread of a - b (points) over the seeds both have, from the same fp32 reference: a seed whose two
    lines name different reference weights (a reference trained again: another --work, another machine) is not a
    pair, and is listed as ``other_reference``."""
    both = sorted(set(a) & set(b))
    other = [s for s in both if None not in (x := _reference_sha(a[s]), y := _reference_sha(b[s])) and x != y]
    seeds = [s for s in both if s not in other]
    diffs = [(_points(a[s], metric), _points(b[s], metric)) for s in seeds]
    out = mean_spread(x - y for x, y in diffs if x is not None and y is not None)
    return out | {"seeds": seeds} | ({"other_reference": other} if other else {})


def _train_examples(records: list[dict[str, Any]]) -> int | None:
    return next((r.get("train_examples") for r in records if r.get("train_examples") is not None), None)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every summary of ``records`` (the results file's lines), JSON-ready."""
    table, gaps, a8, vs_int8, int8_cost, ablation = [], [], [], [], [], []
    for task, digest, group in _groups(records):
        metrics = TASK_METRICS.get(task, ("accuracy",))
        head = {"task": task, "protocol_digest": digest, "train_examples": _train_examples(group)}
        ref = _by_seed(group, REFERENCE, "fp32", FULL)
        for model in (REFERENCE, *SENSIMIX_MODELS, *INT8_PEERS):
            for act in (*ACTIVATIONS, INT8):
                runs = _by_seed(group, model, act, FULL)
                if not runs:
                    continue
                sizes = [r["model_bytes"] for r in runs.values() if r.get("model_bytes")]
                table.append(head | {
                    "model": model, "model_title": MODEL_TITLES.get(model, model), "activations": act,
                    "seeds": sorted(runs), "dev_examples": next(iter(runs.values())).get("dev_examples"),
                    "model_mb": statistics.fmean(sizes) / 1e6 if sizes else None,
                    "model_file": next(iter(runs.values())).get("model_file", "pytorch_model.bin"),
                    "metrics": {m: mean_spread(p for r in runs.values() if (p := _points(r, m)) is not None)
                                for m in metrics}})
                if model in INT8_PEERS:  # what int8 cost it: its int8 score - its fp32 model's, paired by seed
                    fp32 = {s: {"metrics": r["fp32_metrics"]} for s, r in runs.items() if r.get("fp32_metrics")}
                    int8_cost.append(head | {"model": model, "difference": {m: _paired(runs, fp32, m)
                                                                            for m in metrics}})
                if model == REFERENCE:
                    continue
                gaps.append(head | {"model": model, "activations": act, "goal_points": GAP_GOALS.get(model),
                                    "gap": {m: _paired(ref, runs, m) for m in metrics}})  # reference - model
            if model not in SENSIMIX_MODELS:
                continue
            for peer in (p for p, of in INT8_PEERS.items() if of == model):
                peer_runs = _by_seed(group, peer, INT8, FULL)
                for act in ACTIVATIONS:
                    runs = _by_seed(group, model, act, FULL)
                    if runs and peer_runs:  # SensiMix - peer: positive means SensiMix scores higher
                        difference = {m: _paired(runs, peer_runs, m) for m in metrics}
                        vs_int8.append(head | {"model": model, "activations": act, "peer": peer,
                                               "difference": difference,
                                               "verdict": {m: verdict(d, "SensiMix higher", "peer higher")
                                                           for m, d in difference.items()}})
            a8_runs, fp_runs = _by_seed(group, model, "a8", FULL), _by_seed(group, model, "fp32", FULL)
            if a8_runs and fp_runs:
                a8.append(head | {"model": model, "difference": {m: _paired(a8_runs, fp_runs, m) for m in metrics}})
            for act in ACTIVATIONS:
                full = _by_seed(group, model, act, FULL)
                for ab in ABLATIONS[1:]:
                    ablated = _by_seed(group, model, act, ab)
                    if not ablated:
                        continue
                    effect = {m: _paired(full, ablated, m) for m in metrics}
                    ablation.append(head | {"model": model, "activations": act, "ablation": ab, "effect": effect,
                                            "verdict": {m: verdict(e) for m, e in effect.items()}})
    return {"schema": SCHEMA, "runs": len(records), "spread": "sample standard deviation (n - 1) over seeds",
            "noise_rule": NOISE_RULE, "table": table, "gap_to_reference": gaps, "a8_vs_fp32": a8,
            "vs_int8_peer": vs_int8, "int8_cost": int8_cost,
            "parity": parity_rows(records),
            "ablation": ablation, "not_run": _not_run(ablation), "goals": goals(gaps, a8),
            "machines": _distinct(records, ("device_name", "cpu", "cpu_flags", "cpu_cores", "torch", "transformers")),
            "git_commits": sorted({str((m := r.get("machine") or {}).get("git_commit"))
                                   + (" (with uncommitted changes)" if m.get("git_dirty") else "") for r in records})}


def parity_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each SensiMix run's parity (the packed folder against the model as trained, on dev: sensimix.bench.parity)."""
    keep = ("examples", "predictions_equal", "bitwise", "max_abs_logit_gap", "max_abs_logit_gap_elsewhere",
            "rows_near_a_sign_step", "rows_above_tolerance", "flips", "met")
    return [{"task": r["task"], "model": r["model"], "activations": r["activations"], "ablation": r["ablation"],
             "seed": r["seed"], **{k: r["parity"].get(k) for k in keep}}
            for r in records if isinstance(r.get("parity"), dict)]


def _not_run(ablation: list[dict[str, Any]]) -> list[str]:
    """Ablations that train exactly the full recipe, for the models the ablation ran."""
    models = dict.fromkeys(row["model"] for row in ablation)
    return [why for m in models for ab in ABLATIONS[1:] if (why := same_as_full(m, ab))]


def _distinct(records: list[dict[str, Any]], fields: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for r in records:
        m = {k: (r.get("machine") or {}).get(k) for k in fields}
        if m not in seen:
            seen.append(m)
    return seen


def goals(gaps: list[dict[str, Any]], a8: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, judged (not asserted) on every task's GLUE metrics: met, not met, or None (no data)."""
    out = []
    for model, limit in GAP_GOALS.items():
        for act in ACTIVATIONS:
            rows = [g for g in gaps if (g["model"], g["activations"]) == (model, act)]
            misses = [f"{g['task']} {METRIC_TITLES[m]} {s['mean']:.2f}" for g in rows for m, s in g["gap"].items()
                      if s["mean"] is not None and s["mean"] > limit]
            judged = [g["task"] for g in rows if any(s["mean"] is not None for s in g["gap"].values())]
            out.append({"goal": f"{MODEL_TITLES[model]} {act} activations within {limit:g} point(s) of the fp32 "
                                f"reference on every task (mean over seeds)",
                        "met": (not misses) if judged else None, "tasks": judged,
                        "misses": misses})
    misses = [f"{d['task']} {MODEL_TITLES[d['model']]} {METRIC_TITLES[m]} {s['mean']:+.2f}" for d in a8
              for m, s in d["difference"].items() if s["mean"] is not None and s["mean"] < -A8_GOAL]
    out.append({"goal": f"A8 within {A8_GOAL:g} points of fp32 activations (mean over seeds, every task and model)",
                "met": (not misses) if a8 else None, "tasks": sorted({d["task"] for d in a8}), "misses": misses})
    return out


# ---------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------
def _fmt(stats: dict[str, Any], sign: bool = False) -> str:
    if stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:+.2f}" if sign else f"{stats['mean']:.2f}"
    return mean if stats["spread"] is None else f"{mean} ± {stats['spread']:.2f}"


def _task(row: dict[str, Any]) -> str:
    n = row.get("train_examples")
    return f"{row['task']} ({n:,} train)" if isinstance(n, int) else row["task"]


def _differences(stats: dict[str, dict[str, Any]]) -> tuple[str, int]:
    """A paired difference per metric as one cell ("F1 +0.23, accuracy +0.49"), and the most seeds behind it; seeds
    left unpaired for another reference are named."""
    other = sorted({seed for s in stats.values() for seed in s.get("other_reference", ())})
    note = f" (seeds {', '.join(map(str, other))} not paired: another reference)" if other else ""
    return (", ".join(f"{METRIC_TITLES[m]} {_fmt(s, True)}" for m, s in stats.items()) + note,
            max(s["n"] for s in stats.values()))


def render(summary: dict[str, Any]) -> str:
    """The summaries as markdown tables, goals and the noise rule."""
    lines = [("## GLUE dev: SensiMix through the packed runtime (exact fp32 path), the reference through "
              "transformers (fp32 eager), int8 peers through ONNX Runtime (points: mean ± spread over seeds)"), "",
             "| task | model | activations | seeds | score | model file |",
             "|---|---|---|---:|---|---:|"]
    for r in summary["table"]:
        score = ", ".join(f"{METRIC_TITLES[m]} {_fmt(s)}" for m, s in r["metrics"].items())
        file = r.get("model_file", "pytorch_model.bin")
        size = "-" if r["model_mb"] is None else f"{r['model_mb']:.1f} MB" + (
            "" if file == "pytorch_model.bin" else f" ({file})")
        lines.append(f"| {_task(r)} | {r['model_title']} | {r['activations']} | {len(r['seeds'])} | {score} | "
                     f"{size} |")
    lines += ["", "## Gap to the fp32 reference (reference - model, points, paired by seed)", "",
              "| task | model | activations | seeds | gap | goal |", "|---|---|---|---:|---|---|"]
    for g in summary["gap_to_reference"]:
        gap, seeds = _differences(g["gap"])
        goal = "-" if g["goal_points"] is None else f"<= {g['goal_points']:g}"
        lines.append(f"| {_task(g)} | {MODEL_TITLES[g['model']]} | {g['activations']} | {seeds} | {gap} | {goal} |")
    lines += ["", "## SensiMix vs the int8 BERT of its depth (SensiMix - peer, points, paired by seed)", "",
              "| task | model | activations | peer | seeds | difference | verdict |", "|---|---|---|---|---:|---|---|"]
    for d in summary.get("vs_int8_peer", []):
        diff, seeds = _differences(d["difference"])
        lines.append(f"| {_task(d)} | {MODEL_TITLES[d['model']]} | {d['activations']} | {MODEL_TITLES[d['peer']]} | "
                     f"{seeds} | {diff} | {_verdicts(d['verdict'])} |")
    if not summary.get("vs_int8_peer"):
        lines.append("| (no SensiMix model with its int8 peer run) | | | | | | |")
    lines += ["", "## What int8 cost the peers (ONNX Runtime int8 - the same fp32 model, points, paired by seed)", "",
              "| task | peer | seeds | difference |", "|---|---|---:|---|"]
    for d in summary.get("int8_cost", []):
        diff, seeds = _differences(d["difference"])
        lines.append(f"| {_task(d)} | {MODEL_TITLES[d['model']]} | {seeds} | {diff} |")
    if not summary.get("int8_cost"):
        lines.append("| (no int8 peer run) | | | |")
    lines += ["", "## A8 vs fp32 activations (A8 - fp32, points, paired by seed)", "",
              "| task | model | seeds | difference | verdict |", "|---|---|---:|---|---|"]
    for d in summary["a8_vs_fp32"]:
        diff, seeds = _differences(d["difference"])
        judged = _verdicts({m: verdict(s) for m, s in d["difference"].items()})
        lines.append(f"| {_task(d)} | {MODEL_TITLES[d['model']]} | {seeds} | {diff} | {judged} |")
    if not summary["a8_vs_fp32"]:
        lines.append("| (no model with both activations) | | | | |")
    lines += ["", "## Ablation (effect = full recipe - ablated, points, paired by seed)", "",
              "| task | model | activations | without | seeds | effect | verdict |", "|---|---|---|---|---:|---|---|"]
    for a in summary["ablation"]:
        effect, seeds = _differences(a["effect"])
        lines.append(f"| {_task(a)} | {MODEL_TITLES[a['model']]} | {a['activations']} | "
                     f"{a['ablation'].removeprefix('no-')} | {seeds} | {effect} | {_verdicts(a['verdict'])} |")
    if not summary["ablation"]:
        lines.append("| (no ablation runs) | | | | | | |")
    lines += [f"Not run: {why}." for why in summary["not_run"]]
    lines += ["", f"Noise rule: {summary['noise_rule']}.", "", "## Parity: the packed folder against the model as "
              "trained (dev)", "", "| task | model | activations | ablation | seed | predictions equal | bitwise | "
              "max logit gap | rows near a sign step (gap > 1e-5) | gap elsewhere | flips (sign margin) | met |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.get("parity", []):
        flips = ", ".join(f"row {f['row']} ({f['sign_margin']:.1e})" for f in r["flips"] or []) or "none"
        above = r.get("rows_above_tolerance")  # not in the records written before it was counted
        if above is None:
            above = 0 if r["max_abs_logit_gap"] <= LOGIT_TOLERANCE else ">= 1"
        met = {True: "yes", False: "NO", None: "-"}[r.get("met")]
        elsewhere = r.get("max_abs_logit_gap_elsewhere")
        lines.append(f"| {_task(r)} | {MODEL_TITLES.get(r['model'], r['model'])} | {r['activations']} | "
                     f"{r['ablation']} | {r['seed']} | {r['predictions_equal']}/{r['examples']} | "
                     f"{'yes' if r['bitwise'] else 'no'} | {r['max_abs_logit_gap']:.1e} | "
                     f"{r.get('rows_near_a_sign_step', '-')} ({above}) | "
                     f"{'-' if elsewhere is None else format(elsewhere, '.1e')} | {flips} | {met} |")
    lines += ["", "## Goals (judged, not asserted)", ""]
    for g in summary["goals"]:
        state = {True: "MET", False: "NOT MET", None: "no data"}[g["met"]]
        miss = f" (misses: {'; '.join(g['misses'])})" if g["misses"] else ""
        lines.append(f"- {state}: {g['goal']}{miss}")
    lines += ["", f"{summary['runs']} runs; machines: " + "; ".join(
        f"{m.get('device_name')} ({m.get('cpu_cores')} cores, {' '.join(m.get('cpu_flags') or []) or 'no flags'}), "
        f"torch {m.get('torch')}" for m in summary["machines"]) + f"; commits {', '.join(summary['git_commits'])}"]
    return "\n".join(lines)


def machine_slug(records: list[dict[str, Any]]) -> str:
    """The machine as a file-name part (``cpu-amd-epyc-2core-avx2``, ``nvidia-h100-80gb-hbm3``), for the default
    ``benchmarks/glue-table-<slug>.json``; a ValueError when the runs come from several machines."""
    import re

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"

    names = set()
    for r in records:
        m = r.get("machine") or {}
        if str(m.get("device", "cpu")).startswith("cuda"):
            names.add(slug(m.get("device_name")))
        else:
            flags = set(m.get("cpu_flags") or [])
            isa = next((name for flag, name in (("avx512_vnni", "avx512-vnni"), ("avx512f", "avx512"),
                                                ("avx2", "avx2")) if flag in flags), "")
            names.add("-".join(p for p in ("cpu", slug(m.get("cpu")), f"{m.get('cpu_cores')}core", isa) if p))
    if len(names) != 1:
        raise ValueError(f"the runs come from {len(names)} machines ({', '.join(sorted(names))}): name the JSON "
                         f"with --json")
    return names.pop()
