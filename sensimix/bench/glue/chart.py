"""The table's chart (the ``report`` extra: matplotlib): each task's headline GLUE metric against model size
(pytorch_model.bin; the int8 peers' .onnx file), like the SensiMix paper's Fig 6; one marker per model and
activations, error bars over seeds."""

from __future__ import annotations

import os
from typing import Any

from ...data import TASKS
from ...io import write_figure
from .metrics import METRIC_TITLES
from .plans import SENSIMIX_MODELS

CHART_SUFFIXES = (".png", ".svg", ".pdf")  # what matplotlib writes without extra packages (none: PNG)
MARKERS = {("fp32", "fp32"): ("o", "black"), ("3+3", "fp32"): ("s", "tab:blue"), ("3+3", "a8"): ("D", "tab:cyan"),
           ("2+1", "fp32"): ("^", "tab:red"), ("2+1", "a8"): ("v", "tab:orange"),
           ("bert6-int8", "int8"): ("P", "tab:gray"), ("bert3-int8", "int8"): ("X", "tab:green")}


def write_chart(summary: dict[str, Any], path: str | os.PathLike) -> int:
    """One panel per (task, protocol) of ``summary["table"]`` (rows of the full recipe); returns the panel count."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI runners
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in summary["table"]:
        if row["model_mb"] is not None:
            panels.setdefault((row["task"], row["protocol_digest"]), []).append(row)
    if not panels:
        raise ValueError("nothing to chart: the results hold no finished run with a model size")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5 * len(panels), 6.0), 4.6), squeeze=False)
    for ax, ((task, _), rows) in zip(axes[0], panels.items()):
        metric = next(iter(rows[0]["metrics"]))  # the task's headline metric (metrics.TASK_METRICS)
        for row in rows:
            stats = row["metrics"][metric]
            if stats["mean"] is None:
                continue
            marker, color = MARKERS.get((row["model"], row["activations"]), ("x", "gray"))
            label = row["model_title"] + (f", {row['activations']} act." if row["model"] in SENSIMIX_MODELS else "")
            x = row["model_mb"] * (1.06 if row["activations"] == "a8" else 1.0)  # A8: same weights; nudged right
            ax.errorbar([x], [stats["mean"]], yerr=[stats["spread"] or 0.0], fmt=marker, color=color,
                        capsize=4, label=f"{label} (n={len(row['seeds'])})")
        n = rows[0].get("train_examples")
        ax.set_xscale("log")
        sizes = sorted({row["model_mb"] for row in rows})  # a tick at each model's size (a decade may hold none)
        ticks = [sizes[0]]
        for size in sizes[1:]:  # but not two so close that their labels overlap
            if size / ticks[-1] > 1.15:
                ticks.append(size)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.1f}"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
        ax.set_xlabel("model file, MB (log scale)")
        ax.set_ylabel(f"dev {METRIC_TITLES[metric]} (points)")
        name = TASKS[task].name if task in TASKS else task.upper()  # as GLUE spells it: SST-2, CoLA
        ax.set_title(name + (f", {n:,} train examples" if isinstance(n, int) else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("SensiMix on GLUE: dev score vs model file size (pytorch_model.bin; int8 peers: their .onnx)\n"
                 "(error bars: spread over seeds; A8 nudged right)", fontsize=10)
    fig.tight_layout()
    try:
        write_figure(path, fig)
    finally:
        plt.close(fig)
    return len(panels)
