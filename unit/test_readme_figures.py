"""The README's accuracy table is the committed GLUE summary's (benchmarks/glue-table-*.json), cell by cell: the
table is edited by hand each time runs land, and a figure that drifted from its JSON would be a claim nothing backs."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the README's row names -> (model, activations) in the summary's "table"
MODELS = {
    "fp32 MiniLM-L6 reference (6 layers)": ("fp32", "fp32"),
    "the reference, ONNX Runtime int8": ("bert6-int8", "int8"),
    "3-layer BERT, ONNX Runtime int8 (best CPU peer)": ("bert3-int8", "int8"),
    "SensiMix (3+3)": ("3+3", None),
    "SensiMix (2+1)": ("2+1", None),
}
# a column header's start -> (task, metrics shown, "/"-separated)
COLUMNS = {"SST-2 dev": ("sst-2", ("accuracy",)), "MRPC dev, acc / F1": ("mrpc", ("accuracy", "f1")),
           "RTE dev": ("rte", ("accuracy",)), "CoLA dev": ("cola", ("mcc",))}


def accuracy_table() -> tuple[Path, list[str], list[list[str]]]:
    """(the summary JSON the paragraph above the table links, the header cells, the rows' cells)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("| model | activations | model file | SST-2 dev")
    summary = re.findall(r"\[summary\]\((benchmarks/glue-table-[^)]+\.json)\)", text[:start])[-1]
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append([c.strip() for c in line.strip("|").split("|")])
    return ROOT / summary, lines[0], lines[2:]


def shown(stats: dict) -> str:
    """Mean ± spread with two decimals; one seed has no spread."""
    return f"{stats['mean']:.2f}" + ("" if stats["spread"] is None else f" ± {stats['spread']:.2f}")


def test_the_readme_accuracy_table_is_its_json_cell_by_cell():
    path, header, rows = accuracy_table()
    table = json.loads(path.read_text(encoding="utf-8"))["table"]
    cells = {(r["task"], r["model"], r["activations"]): r for r in table}
    checked = 0
    assert len(rows) == len(table) // len({r["task"] for r in table}), "one README row per model of the JSON"
    for row in rows:
        model, act = MODELS[row[0]]
        act = act or row[1].lower()
        for title, cell in zip(header, row):
            column = next((v for k, v in COLUMNS.items() if title.startswith(k)), None)
            if column is None:
                continue
            task, metrics = column
            entry = cells[(task, model, act)]
            want = " / ".join(shown(entry["metrics"][m]) for m in metrics)
            assert cell == want, f"README {row[0]} {row[1]} {title}: {cell!r}, the JSON says {want!r}"
            checked += 1
        sizes = {f"{e['model_mb']:.1f} MB" for (t, m, a), e in cells.items() if (m, a) == (model, act)}
        assert row[2] in sizes, f"README {row[0]} {row[1]}: model file {row[2]}, the JSON says {sizes}"
    assert checked >= 3 * len(rows), "every task column was read"
