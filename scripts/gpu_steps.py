"""Running one step of the GPU check (scripts/gpu_check.py): its own process group, output to the console and the
log, SIGINT before its limit (results so far are still written), SIGKILL at it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 15  # SIGINT this long before a step's limit, SIGKILL at it


class Console:
    """Lines to stdout and to the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.file.write(line + "\n")

    def move(self, path: Path) -> None:
        with self.lock:
            self.file.close()
            os.replace(self.path, path)
            self.path = path
            self.file = open(path, "a", buffering=1)  # noqa: SIM115

    def close(self) -> None:
        self.file.close()


@dataclass
class StepResult:
    name: str
    exit: int | None
    seconds: float
    limit_s: int
    cap_s: int
    timed_out: bool = False
    last_line: str = ""


def run_step(name: str, argv: list[str], limit_s: int, cap_s: int, env: dict[str, str], say: Console,
             lines: list[str] | None = None) -> StepResult:
    say(f"=== {name}: limit {limit_s} s (cap {cap_s} s) ===")
    say("$ " + shlex.join(argv))
    if limit_s <= GRACE_S // 3:
        say(f"=== {name}: SKIPPED, no time left before the deadline ===")
        return StepResult(name, None, 0.0, limit_s, cap_s, timed_out=True, last_line="skipped: no time left")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, start_new_session=True)
    except OSError as exc:
        say(f"=== {name}: could not start: {exc} ===")
        return StepResult(name, 127, 0.0, limit_s, cap_s, last_line=f"could not start: {exc}")
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            seen.append(line)
            say(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    grace = min(GRACE_S, max(1, limit_s // 4))
    try:
        proc.wait(timeout=limit_s - grace)
    except subprocess.TimeoutExpired:
        timed_out = True
        say(f"=== {name}: {limit_s - grace} s reached: SIGINT (results so far are still written) ===")
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            say(f"=== {name}: limit {limit_s} s reached: SIGKILL ===")
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    seconds = time.monotonic() - t0
    last = next((ln.strip() for ln in reversed(seen) if ln.strip()), "")
    say(f"=== {name}: exit {proc.returncode} after {seconds:.0f} s{' (limit reached)' if timed_out else ''} ===")
    if lines is not None:
        lines.extend(seen)
    return StepResult(name, proc.returncode, round(seconds, 1), limit_s, cap_s, timed_out, last[:300])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
