"""Session state and fixtures of the KOTCA acceptance suite: one :class:`sensimix.vv.VVRun` per session.

The run is the same object ``sensimix verify`` drives: it builds the BERT-base folder and its SensiMix (2+1)
under a temp folder (no network), stages the timing batches, loads each timed model once, and trains the
accuracy models. Each test runs one step of it; at the end its report goes into the pytest-benchmark JSON
(``"kotca"`` key: the schema of ``sensimix verify``'s report.json) and, with ``--kotca-report DIR``, into
report.json / report.md / report.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sensimix.vv import VVRun, VVSettings
from sensimix.vv.accuracy import accuracy_settings_from

ACCEPTANCE_DIR = Path(__file__).resolve().parent
SETTINGS_KEY = pytest.StashKey[VVSettings]()
RUN_KEY = pytest.StashKey[VVRun]()
BAD_OPTION_KEY = pytest.StashKey[pytest.UsageError]()
NOT_RUN = "not measured in this pytest session (test deselected or skipped)"


# VVSettings field -> the pytest option that sets it (messages name the option the user typed, not verify's)
KOTCA_FLAGS = {name: "--kotca-" + name.replace("_", "-")
               for name in ("device", "examples", "trials", "warmup_batches", "sensimix_precision", "fp16_max_ratio",
                            "activations")}


def vv_settings(config: pytest.Config) -> VVSettings:
    """The run's settings from the command line (resolved once: device defaults filled in, values checked)."""
    if SETTINGS_KEY not in config.stash:
        opt = config.getoption
        try:
            report = opt("--kotca-report")
            if report and Path(report).exists() and not Path(report).is_dir():
                raise ValueError(f"--kotca-report {report} exists and is not a folder: name a folder for report.json "
                                 f"and report.md")
            settings = VVSettings(
                device=opt("--kotca-device"), examples=opt("--kotca-examples"), trials=opt("--kotca-trials"),
                warmup_batches=opt("--kotca-warmup-batches"), sensimix_precision=opt("--kotca-sensimix-precision"),
                fp16_max_ratio=opt("--kotca-fp16-max-ratio"), gate_fp16=opt("--kotca-gate-fp16"),
                activations=opt("--kotca-activations"),
                glue_dir=opt("--glue-dir"),
                accuracy=accuracy_settings_from(opt, "auto"), progress=False).resolved(KOTCA_FLAGS)
        except (ValueError, FileNotFoundError) as exc:
            raise pytest.UsageError(" ".join(str(exc).split())) from None
        config.stash[SETTINGS_KEY] = settings
    return config.stash[SETTINGS_KEY]


def run_id(s: VVSettings) -> str:
    """Part of every timing benchmark's name: histories compare like with like (device, data, count, precision)."""
    qnli = s.glue_dir is not None and (Path(s.glue_dir) / "QNLI" / "dev.tsv").is_file()
    data = "qnli" if qnli else "synthetic"
    variant = "" if s.activations == "fp32" else f"-{s.activations}"
    return f"{s.device.replace(':', '')}-{data}-{s.examples}-sensimix{s.sensimix_precision}{variant}"


# ---------------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    # Every --kotca-* / --accuracy-* value is checked once, here. A bad one is raised from
    # pytest_collection_modifyitems: pytest prints it as one usage-error line ("ERROR: --kotca-examples must be
    # ..."), whether this conftest was loaded at start-up or during collection (`pytest --kotca-examples 0`, where a
    # traceback from here or from pytest_generate_tests would be a collection error).
    if not config.option.help:
        try:
            vv_settings(config)
        except pytest.UsageError as exc:
            config.stash[BAD_OPTION_KEY] = exc


MODULE_ORDER = ("test_compression_ratio.py", "test_inference_time_ratio.py", "test_accuracy.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Mark acceptance tests, and run them cheapest first (sizes: seconds, timing: minutes, accuracy: the
    # longest) so a broken criterion fails fast; pytest's default order is alphabetical.
    if BAD_OPTION_KEY in config.stash:
        raise config.stash[BAD_OPTION_KEY]
    slots = [i for i, item in enumerate(items) if ACCEPTANCE_DIR in Path(str(item.path)).parents]
    ours = [items[i] for i in slots]
    for item in ours:
        item.add_marker(pytest.mark.acceptance)
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    for i, item in zip(slots, sorted(ours, key=lambda it: rank.get(Path(str(it.path)).name, len(rank)))):
        items[i] = item


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Timing benchmarks are named after the run (e.g. test_sensimix_inference[cuda-qnli-104743-sensimixfp16]) so
    # that `--benchmark-compare` only pairs runs of the same device, data, size and SensiMix precision.
    if "kotca_run" in metafunc.fixturenames:
        bad = BAD_OPTION_KEY in metafunc.config.stash  # refused after collection (pytest_collection_modifyitems)
        rid = "refused" if bad else run_id(vv_settings(metafunc.config))
        metafunc.parametrize("kotca_run", [rid], ids=[rid])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    if RUN_KEY in config.stash:
        env = dict(config.stash[RUN_KEY].environment)
        for key in ("git_commit", "git_dirty"):  # commit_info has them; here they would flag every run as another
            env.pop(key, None)                   # machine
        machine_info["sensimix"] = env


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    if RUN_KEY in config.stash:
        output_json["kotca"] = config.stash[RUN_KEY].report(not_run=NOT_RUN, source="pytest acceptance").to_dict()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = session.config.getoption("--kotca-report")
    if out and RUN_KEY in session.config.stash:
        from sensimix.vv import write_report

        report = session.config.stash[RUN_KEY].report(not_run=NOT_RUN, source="pytest acceptance")
        files = write_report(report, out)
        print(f"\nKOTCA report: {files.markdown}")


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def vv_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> VVRun:
    """The session's V&V run: bert-base geometry with random weights and its SensiMix (2+1), like the certified
    folders, under a temp folder."""
    config = request.config
    if RUN_KEY not in config.stash:
        config.stash[RUN_KEY] = VVRun(vv_settings(config), tmp_path_factory.mktemp("kotca"))
    return config.stash[RUN_KEY]


@pytest.fixture(scope="session")
def accuracy_report(vv_run: VVRun):
    report = vv_run.measure_accuracy()
    if report is None:
        pytest.skip(f"{vv_run.accuracy_reason}. CI runs it: .ci/run sets GLUE_DIR to the shared glue_data folder")
    return report
