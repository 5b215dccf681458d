"""Project-wide pytest options and fixtures (unit/ and acceptance/ share them).

Options (see docs/acceptance.md): data (``--glue-dir``), the KOTCA timing (``--kotca-*``) and the accuracy
criterion (``--accuracy-*``). Defaults keep ``pytest`` fast enough for a 2-core CI machine; on CUDA the timing
defaults to the certified 104,743 examples.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    from sensimix.vv.accuracy import add_accuracy_options

    g = parser.getgroup("sensimix", "SensiMix acceptance (KOTCA KST-21-049)")
    g.addoption("--glue-dir", default=None,
                help="glue_data folder (QNLI/dev.tsv for timing, SST-2/ for accuracy); default: $GLUE_DIR")
    g.addoption("--kotca-device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    g.addoption("--kotca-examples", type=int, default=None,
                help="examples per timing trial (default: 104,743 on CUDA as certified, 256 on CPU)")
    g.addoption("--kotca-trials", type=int, default=3, help="timing trials per model (default: 3, certified)")
    g.addoption("--kotca-warmup-batches", type=int, default=None,
                help="untimed batches per model before its first trial (default: 3 on CUDA, 1 on CPU)")
    g.addoption("--kotca-sensimix-precision", default="auto",
                help="SensiMix inference precision for timing and accuracy: auto ('fast': the exact path's fastest "
                     "kernels), fp32 (exact), fp16 (the paper's GPU inference, approximate), bf16, fast")
    g.addoption("--kotca-fp16-max-ratio", type=float, default=0.20,
                help="goal of the SensiMix / fp16 BERT time ratio on CUDA (default: 0.20); reported, gated only with "
                     "--kotca-gate-fp16")
    g.addoption("--kotca-activations", default="fp32", choices=["fp32", "a8"],
                help="the SensiMix (2+1) built here and the accuracy models: fp32 activations or a8 (8-bit "
                     "activations, exact integer kernels) (default: %(default)s)")
    g.addoption("--kotca-gate-fp16", action="store_true",
                help="fail when SensiMix / BERT fp16 misses --kotca-fp16-max-ratio (default: report it only)")
    g.addoption("--kotca-report", default=None, metavar="DIR",
                help="also write report.json / report.md / report.png (as `sensimix verify`) for this session")
    add_accuracy_options(g.addoption)  # --accuracy-*, shared with `sensimix verify`


def pytest_sessionstart(session: pytest.Session) -> None:
    # pytest-benchmark turns `--benchmark-compare-fail` without a stored run into a usage error at the end of
    # the session. The first run on a machine (and every fresh CI runner) has nothing to compare with: that
    # is not a regression, so drop the gate for this run and say so.
    bs = getattr(session.config, "_benchmarksession", None)
    if (bs is not None and getattr(bs, "compare", None) and getattr(bs, "compare_fail", None)
            and not getattr(bs, "compared_mapping", None)):
        warnings.warn(f"no previous benchmark run in {bs.storage}: the --benchmark-compare-fail regression gate "
                      f"is skipped for this first run (this run's results become the baseline when saved)",
                      pytest.PytestWarning, stacklevel=1)
        bs.compare_fail = []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    # pytest.ini autosaves benchmark runs; a run with no benchmark (e.g. `pytest unit`) has nothing to save,
    # and pytest-benchmark would warn about it.
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and not getattr(bs, "benchmarks", True):
        bs.autosave = False
    yield


@pytest.fixture(scope="session")
def glue_dir(request: pytest.FixtureRequest) -> Path | None:
    """``--glue-dir`` or ``$GLUE_DIR`` (a folder that must exist), else None: tests needing data skip."""
    from sensimix.data import resolve_glue_dir

    return resolve_glue_dir(request.config.getoption("--glue-dir"))
