"""The README and docs/*.md do not go stale: every relative link resolves (file, and heading when it names one),
every repository file they name exists, every test they cite exists in the file they cite it from, and the
README's commands parse as written (its test command is the one CI runs)."""

from __future__ import annotations

import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", flags=re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", flags=re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", flags=re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", flags=re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
# a repository file named in the text: a known top-level folder, a path, an extension
REPO_FILE = re.compile(r"(?<![\w./$<>-])(?:\.\./)*((?:unit|acceptance|scripts|sensimix|benchmarks|docs|\.github|\.ci)/"
                       r"[\w./+-]*?\.(?:py|json|md|sh|png|c|h|txt|log|yml|yaml|toml|ini))(?![\w-])")
BENCH_JSON = re.compile(r"(?<![\w./$<>-])(?:\.\./)*(benchmarks/[\w./+-]*?\.json)(?![\w-])")
# unit/test_x.py::test_name, and ``::test_other`` continuing the last file named on the same line
TEST_CITE = re.compile(r"(?P<file>(?<![\w/.])(?:unit|acceptance)/[\w/]+\.py)::(?P<name>\w+)|(?<![\w:])::(?P<more>\w+)")
TABLE_OF_TESTS = re.compile(r"^\|\s*test \(((?:unit|acceptance)/[\w/]+\.py)\)\s*\|")


def _without_code(text: str) -> str:
    """The text with fenced blocks blanked (lines kept) and code spans replaced by a word: what links live in."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub("code", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # links keep their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    text = page.read_text(encoding="utf-8")
    out, seen = set(), {}
    for _, title in HEADING.findall(FENCE.sub("", text)):
        slug = github_slug(title)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    out.update(HTML_ANCHOR.findall(text))
    return frozenset(out)


def _links(page: Path) -> list[str]:
    text = _without_code(page.read_text(encoding="utf-8"))
    return LINK.findall(text) + REF_LINK.findall(text)


def _problem(page: Path, target: str) -> str | None:
    if not target or SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    dest = page if not path else (page.parent / unquote(path)).resolve()
    try:
        dest.relative_to(ROOT)
    except ValueError:
        return f"{target}: outside the repository"
    if not dest.exists():
        return f"{target}: no such file"
    if anchor:
        if dest.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if unquote(anchor) not in anchors(dest):
            return f"{target}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_resolves(page):
    problems = [p for t in _links(page) if (p := _problem(page, t))]
    assert not problems, f"{page.relative_to(ROOT)}: stale links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_repository_file_named_exists(page):
    text = page.read_text(encoding="utf-8")
    missing = sorted({m for m in REPO_FILE.findall(text) if not (ROOT / m).exists()})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_every_benchmark_json_cited_exists_and_the_readme_cites_them():
    cited = {m for page in PAGES for m in BENCH_JSON.findall(page.read_text(encoding="utf-8"))}
    assert not {m for m in cited if not (ROOT / m).is_file()}
    readme = set(BENCH_JSON.findall((ROOT / "README.md").read_text(encoding="utf-8")))
    assert {"benchmarks/benchmark-nvidia-h200.json", "benchmarks/acceptance-nvidia-h200.json"} <= readme
    assert any(m.startswith("benchmarks/benchmark-cpu-") for m in readme)


@lru_cache(maxsize=None)
def functions_of(relpath: str) -> frozenset[str] | None:
    """The test functions of a test file (module level and in classes), or None when the file does not exist."""
    path = ROOT / relpath
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        bodies = node.body if isinstance(node, ast.ClassDef) else [node]
        names.update(n.name for n in bodies if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return frozenset(n for n in names if n.startswith("test"))


def cited_tests(text: str) -> list[tuple[int, str | None, str]]:
    """(line, file, test) for every ``unit/x.py::test`` and every ``::test`` continuing the file before it on its
    line; file is None for a continuation with no file before it. Tables headed ``test (unit/x.py)`` cite the
    names in their first column."""
    out = []
    table_file = None
    for number, line in enumerate(text.splitlines(), 1):
        current = None
        for m in TEST_CITE.finditer(line):
            if m.group("file"):
                current = m.group("file")
                out.append((number, current, m.group("name")))
            else:
                out.append((number, current, m.group("more")))
        header = TABLE_OF_TESTS.match(line)
        if header:
            table_file = header.group(1)
        elif table_file and line.startswith("|"):
            first = line.split("|")[1]
            out.extend((number, table_file, n) for n in re.findall(r"`(test_\w+)(?:\[[^\]`]*\])?`", first))
        elif not line.startswith("|"):
            table_file = None
    return out


def test_cited_tests_parse_files_continuations_and_tables():
    text = ("| a | `unit/test_io.py::test_one[new]`, `::test_two` and `acceptance/test_x.py::test_three` |\n"
            "| b | `::test_orphan` |\n"
            "| test (unit/test_properties.py) | examples |\n|---|---|\n| `test_p` (note) | 3 |\n"
            "| `test_q` + `test_r[param]` | 4 |\n\nafter the table `test_not_in_a_table`\n")
    assert cited_tests(text) == [(1, "unit/test_io.py", "test_one"), (1, "unit/test_io.py", "test_two"),
                                 (1, "acceptance/test_x.py", "test_three"), (2, None, "test_orphan"),
                                 (5, "unit/test_properties.py", "test_p"), (6, "unit/test_properties.py", "test_q"),
                                 (6, "unit/test_properties.py", "test_r")]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_cited_test_exists_in_the_file_cited(page):
    problems = []
    for line, relpath, name in cited_tests(page.read_text(encoding="utf-8")):
        if relpath is None:
            problems.append(f"line {line}: ::{name} continues no file named before it on its line")
            continue
        functions = functions_of(relpath)
        if functions is None:
            problems.append(f"line {line}: {relpath} does not exist")
        elif name not in functions:
            problems.append(f"line {line}: {relpath} has no test {name}")
    assert not problems, f"{page.relative_to(ROOT)}: stale test citations:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_test_named_alone_exists_somewhere(page):
    """A test named without its file (`test_x` in a code span) is a test function of some file in unit/ or
    acceptance/."""
    every = set()
    for path in [*ROOT.glob("unit/**/test_*.py"), *ROOT.glob("acceptance/**/test_*.py")]:
        every |= functions_of(str(path.relative_to(ROOT)))
    named = set(re.findall(r"`(test_\w+)(?:\[[^\]`]*\])?`", page.read_text(encoding="utf-8")))
    assert not named - every, f"{page.relative_to(ROOT)} names tests that do not exist: {sorted(named - every)}"


def test_the_slug_is_githubs():
    assert github_slug("Why `fast` is exact unless a checkpoint was calibrated") == \
        "why-fast-is-exact-unless-a-checkpoint-was-calibrated"
    assert github_slug('A8 checkpoints (`activation_quant: "a8"`): the exact arithmetic') == \
        "a8-checkpoints-activation_quant-a8-the-exact-arithmetic"
    assert github_slug("2-core AMD EPYC, AVX2 + FMA only") == "2-core-amd-epyc-avx2--fma-only"


def _readme_bash_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines.extend(line.strip() for line in block.replace("\\\n", " ").splitlines())
    return lines


def test_the_readmes_test_command_is_what_ci_runs():
    lines = _readme_bash_lines()
    assert any(line.startswith("bash scripts/install.sh && .venv/bin/python -m pytest") for line in lines)
    assert any(line.startswith("bash scripts/install.sh && .venv/bin/sensimix verify") for line in lines)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "bash scripts/install.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_the_readmes_sensimix_commands_parse():
    from sensimix.cli import build_parser

    commands = []
    for line in _readme_bash_lines():
        line = re.sub(r'\$\((?:[^()"]|"[^"]*")*\)', "BERT_FOLDER", line)  # $(python -c "...") names a folder
        for found in re.findall(r"(?:^|[(:&;]\s*|\.venv/bin/)sensimix\s+([^#)]*)", line):
            commands.append(found.strip())
    assert len(commands) >= 5
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit as exc:
            pytest.fail(f"README: `sensimix {command}` does not parse (exit {exc.code})")
