"""Session state and fixtures of the KOTCA acceptance suite.

Every model is built once per session under a temp folder (no network): the BERT-base folder and its
SensiMix (2+1) for criteria 1-3, the fine-tuned MiniLM and its SensiMix (3+3) for the accuracy criterion.
What the tests measure is collected in one :class:`KotcaSession`; at the end it goes into the
pytest-benchmark JSON (``"kotca"`` key: the same schema as ``sensimix verify``'s report.json) and, with
``--kotca-report DIR``, into report.json / report.md / report.png.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sensimix import kotca

ACCEPTANCE_DIR = Path(__file__).resolve().parent
KOTCA_KEY = pytest.StashKey["KotcaSession"]()


@dataclass
class KotcaSession:
    """Settings of this run (from the command line) and what the acceptance tests measured."""

    device: str
    sensimix_precision: str
    examples: int
    trials: int
    warmup_batches: int
    glue_dir: Path | None
    fp16_max_ratio: float
    accuracy_settings: kotca.AccuracySettings
    environment: dict[str, Any]
    sizes: kotca.SizeReport | None = None
    timers: dict[str, kotca.ModelTimer] = field(default_factory=dict)
    timing_data: str = ""
    accuracy: kotca.AccuracyReport | None = None
    accuracy_reason: str | None = None

    @property
    def data_kind(self) -> str:
        qnli = self.glue_dir is not None and (self.glue_dir / "QNLI" / "dev.tsv").is_file()
        return "qnli" if qnli else "synthetic"

    @property
    def run_id(self) -> str:
        """Part of every timing benchmark's name: histories compare like with like (device, data, count)."""
        return f"{self.device.replace(':', '')}-{self.data_kind}-{self.examples}-sensimix{self.sensimix_precision}"

    def extra_info(self) -> dict[str, Any]:
        env = self.environment
        return {"device": self.device, "device_name": env["device_name"], "torch": env["torch"],
                "cuda": env["cuda"], "data": self.timing_data or self.data_kind, "num_examples": self.examples,
                "batch_size": kotca.BATCH_SIZE, "max_seq_length": kotca.MAX_SEQ_LENGTH,
                "trials": self.trials, "warmup_batches": self.warmup_batches}

    def timing(self) -> kotca.TimingReport | None:
        if not any(t.results for t in self.timers.values()):
            return None
        return kotca.TimingReport.from_timers(
            self.timers.values(), device=self.device, data=self.timing_data, num_examples=self.examples,
            batch_size=kotca.BATCH_SIZE, max_seq_length=kotca.MAX_SEQ_LENGTH, warmup_batches=self.warmup_batches)

    def report(self) -> kotca.Report:
        not_run = "not measured in this pytest session (test deselected or skipped)"
        timing = self.timing()
        fp16_reason = not_run if self.device.startswith("cuda") else None  # None: the CPU reason
        s = self.accuracy_settings
        return kotca.Report(
            criteria=[kotca.size_criterion(self.sizes, reason=not_run), kotca.time_criterion(timing, reason=not_run),
                      kotca.fp16_time_criterion(timing, self.fp16_max_ratio, reason=fp16_reason),
                      *kotca.accuracy_criteria(self.accuracy, max_gap=s.max_gap, min_accuracy=s.min_accuracy,
                                               reason=self.accuracy_reason or not_run)],
            environment=self.environment, sizes=self.sizes, timing=timing, accuracy=self.accuracy,
            settings={"source": "pytest acceptance", "device": self.device, "examples": self.examples,
                      "sensimix_precision": self.sensimix_precision,
                      "trials": self.trials, "warmup_batches": self.warmup_batches,
                      "glue_dir": str(self.glue_dir) if self.glue_dir else None,
                      "accuracy": dataclasses.asdict(s)},
        )


def kotca_session(config: pytest.Config) -> KotcaSession:
    """The run's KotcaSession, created on first use from the command-line options."""
    if KOTCA_KEY not in config.stash:
        from sensimix.data import resolve_glue_dir
        from sensimix.evaluate import resolve_device

        opt = config.getoption
        try:
            device = resolve_device(opt("--kotca-device"))
            precision = kotca.sensimix_precision(opt("--kotca-sensimix-precision"), device)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from exc
        examples = opt("--kotca-examples") or kotca.default_examples(device)
        warmup = opt("--kotca-warmup-batches")
        for name, value in (("--kotca-examples", examples), ("--kotca-trials", opt("--kotca-trials"))):
            if value < 1:
                raise pytest.UsageError(f"{name} must be >= 1, got {value}")
        config.stash[KOTCA_KEY] = KotcaSession(
            device=device, sensimix_precision=precision, examples=examples, trials=opt("--kotca-trials"),
            warmup_batches=kotca.default_warmup_batches(device) if warmup is None else warmup,
            glue_dir=resolve_glue_dir(opt("--glue-dir")), fp16_max_ratio=opt("--kotca-fp16-max-ratio"),
            accuracy_settings=dataclasses.replace(kotca.accuracy_settings_from(opt, device),
                                                  sensimix_precision=precision),
            environment=kotca.environment(device),
        )
    return config.stash[KOTCA_KEY]


# ---------------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------------
MODULE_ORDER = ("test_compression_ratio.py", "test_inference_time_ratio.py", "test_accuracy.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Mark acceptance tests, and run them cheapest first (sizes: seconds, timing: minutes, accuracy: the
    # longest) so a broken criterion fails fast; pytest's default order is alphabetical.
    slots = [i for i, item in enumerate(items) if ACCEPTANCE_DIR in Path(str(item.path)).parents]
    ours = [items[i] for i in slots]
    for item in ours:
        item.add_marker(pytest.mark.acceptance)
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    for i, item in zip(slots, sorted(ours, key=lambda it: rank.get(Path(str(it.path)).name, len(rank)))):
        items[i] = item


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Timing benchmarks are named after the run (e.g. test_sensimix_inference[cuda-qnli-104743]) so that
    # `--benchmark-compare` only pairs runs of the same device, data and size.
    if "kotca_run" in metafunc.fixturenames:
        run_id = kotca_session(metafunc.config).run_id
        metafunc.parametrize("kotca_run", [run_id], ids=[run_id])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    if KOTCA_KEY in config.stash:
        env = dict(config.stash[KOTCA_KEY].environment)
        env.pop("git_commit", None)  # commit_info has it; here it would flag every run as another machine
        machine_info["sensimix"] = env


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    if KOTCA_KEY in config.stash:
        output_json["kotca"] = config.stash[KOTCA_KEY].report().to_dict()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = session.config.getoption("--kotca-report")
    if out and KOTCA_KEY in session.config.stash:
        files = kotca.write_report(session.config.stash[KOTCA_KEY].report(), out)
        print(f"\nKOTCA report: {files.markdown}")


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kotca_state(request: pytest.FixtureRequest) -> KotcaSession:
    return kotca_session(request.config)


@pytest.fixture(scope="session")
def certified_folders(kotca_state: KotcaSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(BERT folder, SensiMix (2+1) folder) like the certified ones: bert-base geometry, random weights."""
    root = tmp_path_factory.mktemp("kotca-models")
    bert = kotca.build_bert_folder(root / "bert-base", "random:bert-base", seed=0)
    sensimix = kotca.build_sensimix_folder(bert, root / "sensimix-2+1", layers=3, eightbit_layers=2, seed=0)
    return bert, sensimix


@pytest.fixture(scope="session")
def timing_batches(kotca_state: KotcaSession, certified_folders: tuple[Path, Path]) -> list[dict]:
    from sensimix.data import load_tokenizer

    batches, label = kotca.timing_inputs(
        load_tokenizer(certified_folders[0]), glue_dir=kotca_state.glue_dir, num_examples=kotca_state.examples,
        batch_size=kotca.BATCH_SIZE, max_seq_length=kotca.MAX_SEQ_LENGTH, device=kotca_state.device)
    kotca_state.timing_data = label
    return batches


@pytest.fixture(scope="session")
def kotca_timer(kotca_state: KotcaSession, certified_folders: tuple[Path, Path],
                timing_batches: list[dict]) -> Callable[[str], kotca.ModelTimer]:
    """``kotca_timer(name)``: the session's timer of ``bert-fp32``, ``bert-fp16`` or ``sensimix`` (loaded once)."""
    from sensimix.evaluate import load_for_inference

    bert, sensimix = certified_folders
    models = {kotca.BERT_FP32: (bert, "fp32"), kotca.BERT_FP16: (bert, "fp16"),
              kotca.SENSIMIX: (sensimix, kotca_state.sensimix_precision)}

    def get(name: str) -> kotca.ModelTimer:
        if name not in kotca_state.timers:
            folder, precision = models[name]
            model = load_for_inference(folder, device=kotca_state.device, precision=precision)
            kotca_state.timers[name] = kotca.ModelTimer(name, model, timing_batches, device=kotca_state.device,
                                                        warmup_batches=kotca_state.warmup_batches,
                                                        precision=precision)
        return kotca_state.timers[name]

    return get


@pytest.fixture(scope="session")
def ensure_trials(kotca_state: KotcaSession, kotca_timer: Callable[[str], kotca.ModelTimer]
                  ) -> Callable[[Iterable[str]], None]:
    """Time the named models now (interleaved, like `sensimix verify`) if their benchmark tests did not run,
    e.g. when a ratio test is selected on its own or pytest-benchmark is told to skip."""

    def ensure(names: Iterable[str]) -> None:
        missing = [kotca_timer(n) for n in names if not kotca_timer(n).results]
        for t in missing:
            t.warm_up()
        for _ in range(kotca_state.trials if missing else 0):
            for t in missing:
                t.trial()

    return ensure


@pytest.fixture(scope="session")
def accuracy_report(kotca_state: KotcaSession, tmp_path_factory: pytest.TempPathFactory) -> kotca.AccuracyReport:
    reason = kotca.accuracy_data_missing(kotca_state.glue_dir)
    if reason:
        kotca_state.accuracy_reason = reason
        pytest.skip(f"{reason}. CI runs it: .ci/run sets GLUE_DIR to the shared glue_data folder")
    report = kotca.measure_accuracy(kotca_state.glue_dir, tmp_path_factory.mktemp("kotca-accuracy"),
                                    kotca_state.accuracy_settings)
    kotca_state.accuracy = report
    return report
