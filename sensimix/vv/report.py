"""The V&V report writers: ``report.md`` (the certified tables), ``report.json``, a PNG chart, ``history.jsonl``."""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_figure, write_json, write_text
from .criteria import Report
from .procedure import BERT_FP16, BERT_FP32, FP16_TIME_THRESHOLD, MODEL_TITLES, SENSIMIX, SIZE_THRESHOLD, TIME_THRESHOLD

log = logging.getLogger(__name__)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_markdown(report: Report) -> str:
    """The report as the certified one reads: criteria table, sizes, per-trial table, accuracy, environment."""
    n_pass = sum(c.passed is True for c in report.criteria)
    n_skip = sum(c.passed is None for c in report.criteria)
    verdict = "PASS" if report.passed else "FAIL"
    lines = [
        "# SensiMix V&V report (KOTCA KST-21-049 criteria)", "",
        f"**Result: {verdict}** - {n_pass} passed, {len(report.failed)} failed, {n_skip} skipped "
        f"({report.created}, {report.environment.get('device_name') or report.environment.get('device')})", "",
        "## Criteria", "",
        "| # | Criterion | Measured | Threshold | Result |",
        "|---|---|---:|---:|---|",
    ]
    for i, c in enumerate(report.criteria, 1):
        result = c.status if c.passed is not None else f"Skipped: {c.reason}"
        mark = "" if c.certified else " *"
        lines.append(f"| {i} | {c.title}{mark} | {c.format_value()} | {c.comparison} "
                     f"{c.format_value(c.threshold)} | {result} |")
    lines += ["", "\\* beyond the certificate (the certified test judged criteria 1 and 2 only).", ""]

    if report.sizes:
        s = report.sizes
        lines += ["## Model sizes (bytes on disk)", "",
                  f"| File | BERT | {s.sensimix_model or 'SensiMix'} | Ratio |", "|---|---:|---:|---:|",
                  f"| pytorch_model.bin | {_mb(s.bert_bin)} | {_mb(s.sensimix_bin)} | {_pct(s.ratio)} |",
                  f"| model.safetensors | {_mb(s.bert_safetensors)} | {_mb(s.sensimix_safetensors)} | "
                  f"{_pct(s.safetensors_ratio)} |",
                  f"| whole folder | {_mb(s.bert_folder)} | {_mb(s.sensimix_folder)} | {_pct(s.folder_ratio)} |",
                  "", f"Baseline: {s.bert_model or 'BERT'}. Certified: 42.2 MB / 438.0 MB = 9.6%.", ""]
        if s.deviations():
            lines += ["Not the certified models: " + "; ".join(s.deviations()) + ".", ""]

    t = report.timing
    if t and t.trials:
        models = [m for m in (BERT_FP32, BERT_FP16, SENSIMIX) if m in t.models]
        head = [f"{MODEL_TITLES[m]} (ms)" for m in models] + ["SensiMix / BERT fp32"]
        has16 = BERT_FP16 in models
        if has16:
            head.append("SensiMix / BERT fp16")
        prec = ", ".join(f"{MODEL_TITLES[m]}: {t.precisions[m]}" for m in models if m in t.precisions)
        lines += [f"## Inference time ({t.device}; {t.data}; {t.num_examples:,} examples; batch {t.batch_size}; "
                  f"max_seq_length {t.max_seq_length}; {t.warmup_batches} warm-up batch(es) not timed"
                  + (f"; {prec}" if prec else "") + ")", "",
                  "| Trial | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        r32, r16 = t.ratios(SENSIMIX, BERT_FP32), t.ratios(SENSIMIX, BERT_FP16)
        for i, trial in enumerate(t.trials):
            row = [f"{trial[m]:,.0f}" for m in models] + [_pct(r32[i] if r32 else None)]
            if has16:
                row.append(_pct(r16[i]))
            lines.append(f"| {i + 1} | " + " | ".join(row) + " |")
        mean = [f"{statistics.fmean(tr[m] for tr in t.trials):,.0f}" for m in models]
        mean.append(_pct(t.mean_ratio()))
        if has16:
            mean.append(_pct(t.mean_ratio(SENSIMIX, BERT_FP16)))
        lines.append("| Mean | " + " | ".join(mean) + " |")
        accs = ", ".join(f"{MODEL_TITLES[m]} {t.accuracy[m]:.3f}" for m in models if t.accuracy.get(m) is not None)
        lines += [""] + [f"{MODEL_TITLES[m]} ran: {t.ran[m]}." for m in models if t.ran.get(m)]
        if t.deviations():
            lines += ["", "Not the certified workload: " + "; ".join(t.deviations())
                      + ". Ratios over fewer or shorter runs are noisier: judge them, not absolute times."]
        lines += ["", f"acc on the timed batches, as the certified log printed it (untrained heads sit near 0.5): "
                      f"{accs or 'n/a'}.",
                  "Certified (RTX 2080 Ti, 104,743 examples): BERT 254,339 / 254,550 / 254,698 ms, SensiMix "
                  "31,729 / 29,395 / 31,566 ms: 12.5 / 11.5 / 12.4%, mean 12.1%.", ""]

    a = report.accuracy
    if a:
        lines += [f"## Accuracy ({a.task.upper()} dev, {a.dev_examples:,} examples; trained on "
                  f"{a.train_examples if a.train_examples else 'all'} train examples)", "",
                  "| Model | Accuracy |", "|---|---:|",
                  f"| fp32 reference | {_pct(a.reference_accuracy)} |",
                  f"| SensiMix ({a.split}) | {_pct(a.sensimix_accuracy)} |",
                  f"| Gap | {a.gap_points:.2f} points |", ""]
        others = {k: v for k, v in a.split_accuracies.items() if k != a.split}
        if others:
            lines += ["Also trained (same data and recipe): " + ", ".join(
                f"SensiMix ({k}) {_pct(v)}" for k, v in others.items()) + ".", ""]
        if a.agreements:
            lines += ["### fast vs exact on the trained models (SST-2 dev)", "",
                      "| Model | Predictions equal | Exact accuracy | fast accuracy | fast ran | its calibration |",
                      "|---|---:|---:|---:|---|---|"]
            lines += [f"| SensiMix ({g.split}) | {_pct(g.agreement)} ({round(g.agreement * g.examples)}/{g.examples}) "
                      f"| {_pct(g.exact_accuracy)} | {_pct(g.fast_accuracy)} | {g.fast_plan} | {g.calibration} |"
                      for g in a.agreements]
            lines.append("")

    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.environment.items()]
    return "\n".join(lines) + "\n"


def load_history(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Past runs from ``<out_dir>/history.jsonl`` (unreadable lines are skipped with a warning)."""
    path = Path(out_dir) / "history.jsonl"
    if not path.is_file():
        return []
    runs = []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if raw.strip():
            try:
                run = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                run = None
            if isinstance(run, dict):
                runs.append(run)
            else:
                log.warning("%s:%d is not a JSON object of a past run; skipped", path, i)
    return runs


def write_chart(report: Report, history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """PNG: sizes and per-trial times side by side, plus the ratios across runs when ``history`` has several.

    Returns the number of panels drawn.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on CI runners
    import matplotlib.pyplot as plt

    panels: list[Callable[[Any], None]] = []
    if report.sizes:
        s = report.sizes

        def sizes_panel(ax: Any) -> None:
            files = [("pytorch_model.bin", s.bert_bin, s.sensimix_bin),
                     ("model.safetensors", s.bert_safetensors or 0, s.sensimix_safetensors or 0)]
            x = range(len(files))
            ax.bar([i - 0.2 for i in x], [f[1] / 1e6 for f in files], 0.4, label="BERT")
            ax.bar([i + 0.2 for i in x], [f[2] / 1e6 for f in files], 0.4, label=s.sensimix_model or "SensiMix")
            for i, f in enumerate(files):
                if f[1]:
                    ax.annotate(f"{100 * f[2] / f[1]:.1f}%", (i + 0.2, f[2] / 1e6), ha="center", va="bottom")
            ax.set_xticks(list(x), [f[0] for f in files])
            ax.set_ylabel("MB on disk")
            ax.set_title(f"Size (criterion: <= {100 * SIZE_THRESHOLD:.0f}%)")
            ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
            ax.legend(loc="upper right")

        panels.append(sizes_panel)
    t = report.timing
    if t and t.trials:

        def times_panel(ax: Any) -> None:
            models = [m for m in (BERT_FP32, BERT_FP16, SENSIMIX) if m in t.models]
            width = 0.8 / len(models)
            for j, m in enumerate(models):
                xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(t.trials))]
                ax.bar(xs, [tr[m] / 1e3 for tr in t.trials], width, label=MODEL_TITLES[m])
            for i, r in enumerate(t.ratios()):
                top = max(t.trials[i].values()) / 1e3
                ax.annotate(f"{100 * r:.1f}%", (i, top), ha="center", va="bottom")
            ax.set_xticks(range(len(t.trials)), [f"trial {i + 1}" for i in range(len(t.trials))])
            ax.set_ylabel("seconds")
            ax.set_title(f"Inference, {t.num_examples:,} ex. on {t.device} (<= {100 * TIME_THRESHOLD:.0f}%)")
            ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
            ax.legend(loc="upper right", ncol=len(models))

        panels.append(times_panel)
    if len(history) >= 2:

        def history_panel(ax: Any) -> None:
            runs = range(1, len(history) + 1)
            for key, label, thr in (("compression_ratio", "size ratio", SIZE_THRESHOLD),
                                    ("inference_time_ratio", "time ratio vs fp32", TIME_THRESHOLD),
                                    ("inference_time_ratio_fp16", "time ratio vs fp16", FP16_TIME_THRESHOLD)):
                ys = [h.get(key) for h in history]
                if any(y is not None for y in ys):
                    line = ax.plot(runs, [100 * y if y is not None else float("nan") for y in ys], "o-", label=label)
                    ax.axhline(100 * thr, ls="--", lw=0.8, color=line[0].get_color())
            ax.set_xlabel("run")
            ax.set_ylabel("% of BERT")
            ax.set_title(f"History ({len(history)} runs; dashed: thresholds)")
            ax.legend()

        panels.append(history_panel)
    if not panels:
        raise ValueError("nothing to chart: the report has no sizes, no timings and no history")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
    fig.suptitle(f"SensiMix V&V ({report.environment.get('device_name') or report.environment.get('device')}): "
                 f"{'PASS' if report.passed else 'FAIL'}")
    fig.tight_layout()
    try:
        write_figure(path, fig)
    finally:
        plt.close(fig)
    return len(panels)


REPORT_FILES = ("report.json", "report.md", "report.png", "history.jsonl")  # what write_report writes in --out


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    chart: Path | None
    history: Path


def write_report(report: Report, out_dir: str | os.PathLike, *, chart: bool = True) -> ReportFiles:
    """Write ``report.json``, ``report.md``, append to ``history.jsonl`` and draw ``report.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report.to_dict())
    write_text(out / "report.md", render_markdown(report))
    history_path = out / "history.jsonl"
    fd = os.open(history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666)  # never through a link another process put there (os.open applies the umask)
    with open(fd, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            glued = f.read(1) != b"\n"  # a last line without its newline: start ours on a line of its own
        else:
            glued = False
        line = json.dumps(report.history_entry(), sort_keys=True, default=str) + "\n"
        f.write((("\n" if glued else "") + line).encode())
    png = None
    if chart:
        try:
            write_chart(report, load_history(out), out / "report.png")
            png = out / "report.png"
        except ImportError:  # matplotlib is the optional [report] extra
            log.warning("matplotlib is not installed (pip install 'sensimix[report]'): no report.png")
    return ReportFiles(out / "report.json", out / "report.md", png, history_path)
