"""The package's layers (docs/architecture.md): every import points down, and no import circle exists.

The import graph is read from the source (every ``import`` and ``from ... import``, function-level ones included),
so a lazy import that climbs a layer is caught as surely as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sensimix"

# bottom-up; a unit may import units of lower layers and of its own layer (no circle either way)
LAYERS: list[tuple[str, ...]] = [
    ("version", "io", "devices"),
    ("config", "quant", "a8", "data"),
    ("sources", "kernels"),
    ("qat", "calibration_record"),
    ("checkpoint",),
    ("inference",),
    ("export",),
    ("measure",),
    ("train",),
    ("bench", "vv"),
    ("cli",),
    ("__init__", "__main__"),
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("sensimix")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("sensimix"):
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= {t for t in _targets(module, path, node, modules) if t in modules and t != module}
    return graph


def unit_of(module: str) -> str:
    """``sensimix.inference.plan`` -> ``inference``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS (and docs/architecture.md): {units - set(LAYER_OF)}"


def test_every_import_points_down_or_sideways():
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if LAYER_OF[unit_of(b)] > LAYER_OF[unit_of(a)])
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_no_import_circle_between_modules_or_units():
    graph = import_graph()
    assert cycles(graph) == []
    units: dict[str, set[str]] = {}
    for a, targets in graph.items():
        units.setdefault(unit_of(a), set()).update(unit_of(b) for b in targets if unit_of(b) != unit_of(a))
    assert cycles(units) == []


def test_the_checker_sees_a_circle_and_a_climb():
    # the checker itself: a hand-made graph with one circle and one upward import
    graph = {"sensimix.checkpoint": {"sensimix.train.jobs"}, "sensimix.train.jobs": {"sensimix.checkpoint"}}
    assert cycles(graph) == [["sensimix.checkpoint", "sensimix.train.jobs"]]
    assert LAYER_OF[unit_of("sensimix.train.jobs")] > LAYER_OF[unit_of("sensimix.checkpoint")]


def test_no_test_imports_a_conftest_or_another_test_module():
    # `pytest` collects unit/ and acceptance/ together: both have a conftest.py, so `from conftest import X` binds to
    # whichever was imported first (CI failed on exactly that). Shared values live in unit/helpers.py.
    tests = sorted(PACKAGE.parent.glob("unit/*.py")) + sorted(PACKAGE.parent.glob("acceptance/*.py"))
    bad = []
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.parent.name}/{path.name}: imports {n}" for n in names
                    if n.split(".")[0] == "conftest" or n.split(".")[0].startswith("test_")]
    assert not bad, "import shared test code from helpers.py instead:\n" + "\n".join(bad)
