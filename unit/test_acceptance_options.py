"""The acceptance suite's own options (``pytest acceptance --kotca-*``): a bad value is one usage-error line naming
the option as typed, before any work (issue 21, class 5)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sensimix.vv import VVSettings

ROOT = Path(__file__).resolve().parent.parent
KOTCA = {name: "--kotca-" + name.replace("_", "-")
         for name in ("device", "examples", "trials", "warmup_batches", "sensimix_precision", "fp16_max_ratio")}


@pytest.mark.parametrize("field, value, message", [
    ("examples", 0, "--kotca-examples must be an integer >= 1, got 0"),
    ("examples", 10**12, "--kotca-examples 1,000,000,000,000 would stage"),
    ("trials", 0, "--kotca-trials must be an integer >= 1, got 0"),
    ("warmup_batches", -1, "--kotca-warmup-batches must be an integer >= 0, got -1"),
    ("fp16_max_ratio", float("nan"), "--kotca-fp16-max-ratio must be a finite number > 0, got nan"),
    ("fp16_max_ratio", 0.0, "--kotca-fp16-max-ratio must be a finite number > 0, got 0.0"),
    ("device", "tpu", "--kotca-device: unknown device 'tpu'"),
    ("sensimix_precision", "int3", "--kotca-sensimix-precision: SensiMix precision must be auto or one of"),
])
def test_each_timing_option_is_refused_under_the_name_given(field, value, message):
    settings = VVSettings(**{field: value}, accuracy=None)
    with pytest.raises(ValueError) as named:
        settings.resolved(KOTCA)
    assert str(named.value).startswith(message)
    with pytest.raises(ValueError) as verify:  # sensimix verify's own names by default
        settings.resolved()
    assert str(verify.value).startswith(message.replace("--kotca-", "--"))


@pytest.mark.parametrize("args, line", [
    (["acceptance", "--kotca-examples", "0"], "ERROR: --kotca-examples must be an integer >= 1, got 0"),
    # no path: the acceptance conftest is loaded during collection (pytest takes the "0" for a path at first)
    (["--kotca-trials", "0"], "ERROR: --kotca-trials must be an integer >= 1, got 0"),
], ids=["acceptance", "all-suites"])
def test_pytest_refuses_a_bad_kotca_option_in_one_line(args, line):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # --collect-only: should the refusal ever break, nothing is timed or trained
    done = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    errors = [x for x in out.splitlines() if "ERROR" in x or "Error" in x]
    assert errors == [line], out[-3000:]  # before: a 30-line traceback naming --examples
    assert "Traceback" not in out
    assert not [x for x in out.splitlines() if "::" not in x and re.search(r"(?<!kotca)-examples", x)]
