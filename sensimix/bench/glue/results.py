"""The results file: one JSON object per line, one line per finished run, schema ``sensimix-glue-run/1``.

Writes are atomic and durable: each finished run rewrites the file (as it is then, plus the new line) through a temp
file, flushed to disk and renamed over it (the file is a few hundred lines), so a crash loses the run in progress
only. A file whose last line was cut short elsewhere (a full disk, a copy interrupted) is still read: the cut line
is reported and ignored (its run runs again, and the next write drops the fragment). A file that is not ours -- a
line that is not a run record, or a cut line that does not start like one -- is refused, so a wrong ``--results``
never gets lines appended to it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...io import write_text
from ...io.files import _finite  # NaN/inf as null: strict JSON

SCHEMA = "sensimix-glue-run/1"
PREFIX = f'{{"schema": "{SCHEMA}"'  # how every line we write starts (json.dumps keeps the key order)
REQUIRED = ("task", "model", "activations", "ablation", "seed", "protocol_digest", "metrics")


class NotResultsFile(ValueError):
    """The file is not a GLUE-table results file: nothing is appended to it."""


@dataclass
class Loaded:
    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: str | None = None    # what was ignored at the end of the file, said in one sentence
    text: str = ""                  # the complete lines as read (what the next write keeps)


def _refuse(path: Path, why: str) -> NotResultsFile:
    return NotResultsFile(f"--results {path}: {why}, so it is not a results file of scripts/glue_table.py; "
                          f"choose another --results (or move that file away)")


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("schema") == SCHEMA else None


def read_results(path: str | os.PathLike) -> Loaded:
    """The run records in ``path`` (none when it does not exist), tolerating a cut last line."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return Loaded()
    if not stat.S_ISREG(mode):
        raise _refuse(path, "it is not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(path, "it is not UTF-8 text") from None
    body, _, tail = text.rpartition("\n")
    lines = body.split("\n") if body or text.endswith("\n") else []
    loaded = Loaded()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None and line.startswith(PREFIX):  # ours, damaged inside the file: not silently dropped
            raise NotResultsFile(f"--results {path}: its line {number} is a {SCHEMA} record damaged inside the "
                                 f"file (cut short or edited: not valid JSON); repair or delete that line (its run "
                                 f"then runs again) and rerun")
        if record is None:
            raise _refuse(path, f"its line {number} is not a {SCHEMA} record ({line[:60]!r})")
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise _refuse(path, f"its line {number} lacks {', '.join(missing)}")
        loaded.records.append(record)
    loaded.text = "".join(line + "\n" for line in lines if line.strip())
    if tail.strip():
        record = _parse(tail)
        if record is not None and all(k in record for k in REQUIRED):  # complete, only its newline is missing
            loaded.records.append(record)
            loaded.text += tail + "\n"
        elif tail.startswith(PREFIX) or PREFIX.startswith(tail):
            loaded.truncated = (f"the last line of {path} ({len(tail.encode())} bytes, line {len(lines) + 1}) was "
                                f"cut short: ignored; its run runs again and the next write drops it")
        else:
            raise _refuse(path, f"its last line is not a {SCHEMA} record ({tail[:60]!r})")
    return loaded


def append_result(path: str | os.PathLike, loaded: Loaded, record: dict[str, Any]) -> None:
    """Write the file's lines as they are now plus ``record`` to ``path`` atomically, and make ``loaded`` what was
    written. The file is read again first: lines another writer added since ``loaded`` was read (a ``cat >>``, a
    merge from another machine; the session lock keeps out only other sessions) are kept, and a file that
    stopped being ours meanwhile is refused with nothing written."""
    record = {"schema": SCHEMA, **{k: v for k, v in record.items() if k != "schema"}}  # first: PREFIX
    line = json.dumps(_finite(record), allow_nan=False, default=str)
    now = read_results(path)
    write_text(path, now.text + line + "\n")
    loaded.text = now.text + line + "\n"
    loaded.records[:] = [*now.records, json.loads(line)]
    loaded.truncated = None
