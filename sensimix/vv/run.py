"""One V&V run: settings checked up front, then sizes, timing, accuracy and the report, step by step.

``sensimix verify`` runs every step in order; the acceptance suite runs them one test at a time (its timing
tests drive :meth:`VVRun.timer` under pytest-benchmark); the benchmark (:mod:`sensimix.bench.run`) takes the certified folders
and batches from it. All three therefore measure the same folders, inputs and models the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from ..inference.plan import A8_PRECISIONS
from ..measure import check_examples_fit, is_sensimix_folder, load_for_inference
from .accuracy import AccuracyReport, AccuracySettings, accuracy_data_missing, measure_accuracy
from .criteria import (
    Report,
    accuracy_criteria,
    agreement_criterion,
    fp16_time_criterion,
    size_criterion,
    time_criterion,
)
from .procedure import (
    BERT_FP16,
    BERT_FP32,
    SENSIMIX,
    default_examples,
    default_warmup_batches,
    environment,
    sensimix_precision,
)
from .sizes import SizeReport, build_bert_folder, build_sensimix_folder, measure_sizes, prove_bert_weight_files
from .timing import ModelTimer, TimingReport, time_models, timing_inputs

log = logging.getLogger(__name__)


def refuse_a8_precision(precision: str, flag: str, what: str) -> None:
    """An A8 SensiMix runs exact integer kernels only: fp16/bf16 would change its arithmetic (the runtime refuses
    them at load; the V&V refuses them before it builds or sizes anything)."""
    if precision not in A8_PRECISIONS:
        raise ValueError(f"{flag} {precision} would change the arithmetic of {what}, which runs exact integer "
                         f"kernels (sensimix.a8): use fp32, fast or auto (all exact for A8)")


@dataclass
class VVSettings:
    """What a V&V run measures and how (``None`` fields take their device defaults in :meth:`resolved`)."""

    device: str = "auto"
    examples: int | None = None          # per timing trial: 104,743 on CUDA (certified), 256 on CPU
    trials: int = 3
    warmup_batches: int | None = None
    batch_size: int = 128
    max_seq_length: int = 128
    sensimix_precision: str = "auto"
    fp16_baseline: bool = True           # on CUDA, also time BERT in fp16 (criterion 3)
    fp16_max_ratio: float = 0.20
    gate_fp16: bool = False              # a missed fp16 goal fails the run only when asked
    glue_dir: str | os.PathLike | None = None
    hub: bool = False
    bert: str = "random:bert-base"       # a BERT folder (measured as it is) or random:<geometry> (built)
    sensimix: str | os.PathLike | None = None  # an existing packed folder (else compressed from bert, untrained)
    layers: int = 3
    eightbit_layers: int = 2
    activations: str = "fp32"            # the built SensiMix's: fp32 activations, or a8 (sensimix.a8)
    seed: int = 0
    keep_models: str | os.PathLike | None = None  # write the folders built here to this folder and keep them
    overwrite: bool = False              # may replace keep_models/bert and keep_models/sensimix
    accuracy: AccuracySettings | None = field(default_factory=AccuracySettings)  # None: skipped
    accuracy_skip_reason: str | None = None
    progress: bool = True

    def resolved(self, flags: dict[str, str] | None = None) -> VVSettings:
        """Device defaults filled in and every value checked; raises ValueError naming the option: ``flags`` maps a
        field to its option's name where it is not ``sensimix verify``'s (pytest's ``--kotca-examples``, ...)."""
        import math

        from ..data import resolve_glue_dir

        def flag(name: str) -> str:
            return (flags or {}).get(name) or ("--8bit-layers" if name == "eightbit_layers" else
                                                f"--{name.replace('_', '-')}")

        try:
            device = resolve_device(self.device)
        except ValueError as exc:
            raise ValueError(f"{flag('device')}: {exc}") from None
        try:
            precision = sensimix_precision(self.sensimix_precision, device)
        except ValueError as exc:
            raise ValueError(f"{flag('sensimix_precision')}: {exc}") from None
        s = dataclasses.replace(
            self, device=device, examples=default_examples(device) if self.examples is None else self.examples,
            warmup_batches=default_warmup_batches(device) if self.warmup_batches is None else self.warmup_batches,
            sensimix_precision=precision, glue_dir=resolve_glue_dir(self.glue_dir))
        for name in ("examples", "trials", "batch_size", "layers"):
            value = getattr(s, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(name)} must be an integer >= 1, got {value!r}")
        if not 5 <= s.max_seq_length <= 512:
            raise ValueError(f"{flag('max_seq_length')} must be in [5, 512], got {s.max_seq_length}")
        check_examples_fit(s.examples, s.max_seq_length, flag("examples"))
        if not isinstance(s.warmup_batches, int) or s.warmup_batches < 0:
            raise ValueError(f"{flag('warmup_batches')} must be an integer >= 0, got {s.warmup_batches!r}")
        ratio = s.fp16_max_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"{flag('fp16_max_ratio')} must be a finite number > 0, got {ratio!r}")
        if not 0 <= s.eightbit_layers <= s.layers:
            raise ValueError(f"{flag('eightbit_layers')} must be in [0, --layers={s.layers}], got {s.eightbit_layers}")
        if s.activations not in ("fp32", "a8"):
            raise ValueError(f"{flag('activations')} must be fp32 or a8, got {s.activations!r}")
        if s.activations == "a8" and s.sensimix is None:
            refuse_a8_precision(s.sensimix_precision, flag("sensimix_precision"), f"{flag('activations')} a8")
        if s.accuracy is not None:
            s.accuracy = dataclasses.replace(s.accuracy, device=device, sensimix_precision=s.sensimix_precision,
                                             activations=s.activations)
        return s


class VVRun:
    """The state of one V&V run. Steps run on first use and are cached; ``report()`` judges what was measured."""

    def __init__(self, settings: VVSettings, workdir: str | os.PathLike) -> None:
        self.s = settings.resolved()
        self.workdir = Path(workdir)
        self.environment = environment(self.s.device)
        self.timers: dict[str, ModelTimer] = {}
        self.accuracy: AccuracyReport | None = None
        self.accuracy_reason: str | None = self.s.accuracy_skip_reason
        self._sizes: SizeReport | None = None
        self.check_locations()

    # -- inputs, checked before any work ---------------------------------------------------------
    def check_locations(self) -> None:
        """Given folders are what they claim to be; folders to keep can be written (nothing is deleted)."""
        from ..io import check_output_dir
        from ..sources import is_random

        s = self.s
        if not is_random(s.bert):
            bert = Path(s.bert)
            if is_sensimix_folder(bert):
                raise ValueError(f"--bert {bert} is a packed SensiMix folder; --bert names the BERT baseline "
                                 f"(pass the SensiMix folder with --sensimix)")
            if not (bert / "pytorch_model.bin").is_file():
                raise FileNotFoundError(f"--bert {bert} has no pytorch_model.bin: criterion 1 compares the "
                                        f"pytorch_model.bin files (save the BERT with torch.save of its state dict)")
        if s.sensimix is not None and not is_sensimix_folder(s.sensimix):
            raise ValueError(f"--sensimix {s.sensimix} is not a packed SensiMix folder (config.json has no "
                             f"sensimix_format)")
        self._check_pair()
        self._check_timing_data()
        self._check_accuracy_inputs()
        if s.keep_models is not None:
            keep = Path(s.keep_models)
            if is_random(s.bert):
                check_output_dir(keep / "bert", overwrite=s.overwrite, what="--keep-models DIR/bert")
            if s.sensimix is None:
                check_output_dir(keep / "sensimix", overwrite=s.overwrite, what="--keep-models DIR/sensimix")

    def _check_pair(self) -> None:
        """The SensiMix (given) is a compression of the BERT, or the one to build fits it (config files only)."""
        from ..checkpoint import read_config
        from ..sources import bert_config
        from .sizes import check_pair

        s = self.s
        bert = bert_config(s.bert, allow_qat=False)
        if s.sensimix is not None:
            config = read_config(s.sensimix)
            if config.a8:  # found now, not after BERT is built and sized
                refuse_a8_precision(s.sensimix_precision, "SensiMix precision", f"{s.sensimix}, an A8 folder")
            check_pair(bert, config, str(s.bert), str(s.sensimix))
        elif s.layers > bert.num_hidden_layers:
            raise ValueError(f"--layers {s.layers} is more than the {bert.num_hidden_layers} layers of --bert "
                             f"{s.bert}; choose --layers <= {bert.num_hidden_layers}")

    def _check_timing_data(self) -> None:
        """QNLI dev, when the GLUE folder has it, is read (and checked) now, not after the models are built."""
        from ..data import load_glue

        root = self.s.glue_dir
        dev = None if root is None else Path(root) / "QNLI" / "dev.tsv"
        if dev is not None and dev.exists():
            if not dev.is_file():
                raise ValueError(f"{dev} is not a file: the timing reads QNLI dev from it (GLUE layout "
                                 f"<glue-dir>/QNLI/dev.tsv)")
            load_glue("qnli", "dev", root)

    def _check_accuracy_inputs(self) -> None:
        """SST-2 and the accuracy models' sources, when accuracy will be measured: checked now, not after the
        timing (minutes on CUDA)."""
        from ..data import load_glue
        from ..sources import bert_config

        s = self.s
        if s.accuracy is None or accuracy_data_missing(s.glue_dir, hub=s.hub):
            return
        if s.glue_dir is not None:
            for split in ("train", "dev"):
                load_glue("sst-2", split, s.glue_dir)
        for flag, source in (("--accuracy-reference", s.accuracy.reference),
                             ("--accuracy-pretrained", s.accuracy.pretrained)):
            if source is not None:
                try:
                    bert_config(source, allow_qat=False)
                except (ValueError, OSError) as exc:
                    raise ValueError(f"{flag} {source}: {exc}") from None

    # -- the folders -----------------------------------------------------------------------------
    @cached_property
    def folders(self) -> tuple[Path, Path]:
        """(BERT folder, SensiMix folder): given ones as they are; otherwise built (random BERT weights, SensiMix
        compressed from it without training: sizes and speed do not depend on the values)."""
        from ..sources import is_random

        s = self.s
        root = Path(s.keep_models) if s.keep_models else self.workdir
        if is_random(s.bert):
            bert = build_bert_folder(root / "bert", s.bert, seed=s.seed, overwrite=s.overwrite)
        else:
            bert = Path(s.bert)
            prove_bert_weight_files(bert)  # before compressing it: a refused BERT leaves no SensiMix behind
        if s.sensimix is not None:
            sensimix = Path(s.sensimix)
        else:
            log.info("compressing %s into SensiMix (%d+%d)%s (quantize and export; no training)", bert,
                     s.eightbit_layers, s.layers - s.eightbit_layers, " A8" if s.activations == "a8" else "")
            sensimix = build_sensimix_folder(bert, root / "sensimix", layers=s.layers,
                                             eightbit_layers=s.eightbit_layers, seed=s.seed, overwrite=s.overwrite,
                                             activations=s.activations)
        return bert, sensimix

    # -- criterion 1 -----------------------------------------------------------------------------
    def sizes(self) -> SizeReport:
        if self._sizes is None:
            self._sizes = measure_sizes(*self.folders)
            sz = self._sizes
            log.info("pytorch_model.bin: BERT %.1f MB, %s %.1f MB: %.2f%%", sz.bert_bin / 1e6, sz.sensimix_model,
                     sz.sensimix_bin / 1e6, 100 * sz.ratio)
        return self._sizes

    # -- criteria 2 and 3 ------------------------------------------------------------------------
    @cached_property
    def batches(self) -> tuple[list[dict[str, Any]], str]:
        """(batches on the device, what they are). On CUDA each carries its token packing (made on the CPU while
        staging, as a variable-length collator would), so the timed SensiMix forward needs no host sync."""
        from ..measure import check_inputs_fit
        from ..sources import bert_config, load_tokenizer

        s = self.s
        bert, _ = self.folders
        config = bert_config(bert, allow_qat=False)
        batches, label = timing_inputs(load_tokenizer(bert), glue_dir=s.glue_dir, num_examples=s.examples,
                                       batch_size=s.batch_size, max_seq_length=s.max_seq_length, device=s.device,
                                       seed=s.seed, hub=s.hub, vocab_size=config.vocab_size,
                                       packing=s.device.startswith("cuda"))
        for i, b in enumerate(batches[:2]):
            check_inputs_fit({k: v.cpu() for k, v in b.items() if k in ("input_ids", "token_type_ids")}, config,
                             f"timing batch {i}")
        log.info("timing data: %s", label)
        return batches, label

    @property
    def model_names(self) -> list[str]:
        names = [BERT_FP32]
        if self.s.device.startswith("cuda") and self.s.fp16_baseline:
            names.append(BERT_FP16)
        return [*names, SENSIMIX]

    def precision_of(self, name: str) -> str:
        return {BERT_FP32: "fp32", BERT_FP16: "fp16", SENSIMIX: self.s.sensimix_precision}[name]

    def timer(self, name: str) -> ModelTimer:
        """The run's timer of ``bert-fp32``, ``bert-fp16`` or ``sensimix`` (its model loaded once, from the
        pytorch_model.bin that criterion 1 sizes)."""
        if name not in self.timers:
            bert, sensimix = self.folders
            folder = sensimix if name == SENSIMIX else bert
            model = load_for_inference(folder, device=self.s.device, precision=self.precision_of(name),
                                       weights="pytorch_model.bin")
            if name == SENSIMIX:
                model.check_inputs = False  # the batches were checked against the model once, when staged
            self.timers[name] = ModelTimer(name, model, self.batches[0], device=self.s.device,
                                           warmup_batches=self.s.warmup_batches, precision=self.precision_of(name))
        return self.timers[name]

    def time_all(self, names: list[str] | None = None) -> TimingReport:
        """Interleaved trials of the named models (default: all) that have not been timed in full yet (a partial
        set, e.g. the one round pytest-benchmark runs with --benchmark-disable, is timed again from the start)."""
        timers = [self.timer(n) for n in (names or self.model_names)]
        pending = [t for t in timers if len(t.results) < self.s.trials]
        for t in pending:
            t.results.clear()
        if pending:
            log.info("timing %s: %d trial(s) of %d examples each",
                     ", ".join(f"{t.name} ({t.precision})" for t in pending), self.s.trials, self.s.examples)
            time_models({}, self.batches[0], trials=self.s.trials, device=self.s.device, timers=pending,
                        progress=self.s.progress)
        return self.timing()

    def timing(self) -> TimingReport | None:
        if not any(t.results for t in self.timers.values()):
            return None
        batches = self.batches[0]  # what ran: a run of fewer examples than --batch-size has one smaller batch
        return TimingReport.from_timers(self.timers.values(), device=self.s.device, data=self.batches[1],
                                        num_examples=sum(len(b["input_ids"]) for b in batches),
                                        batch_size=len(batches[0]["input_ids"]),
                                        max_seq_length=self.s.max_seq_length,
                                        warmup_batches=min(self.s.warmup_batches, len(batches)))

    def release_models(self) -> None:
        """Free the timed models (and the GPU memory they hold)."""
        import torch

        for t in self.timers.values():
            t.model = None
        if self.s.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- accuracy --------------------------------------------------------------------------------
    def measure_accuracy(self, workdir: str | os.PathLike | None = None) -> AccuracyReport | None:
        """Train and evaluate (criteria 4-6) unless skipped; the reason is kept for the report."""
        s = self.s
        if s.accuracy is None:
            self.accuracy_reason = self.accuracy_reason or "skipped"
            return None
        reason = accuracy_data_missing(s.glue_dir, hub=s.hub)
        if reason:
            self.accuracy_reason = reason
            return None
        root = Path(workdir) if workdir else (Path(s.keep_models) / "accuracy" if s.keep_models else
                                              self.workdir / "accuracy")
        self.accuracy = measure_accuracy(s.glue_dir, root, s.accuracy, hub=s.hub)
        return self.accuracy

    # -- the report ------------------------------------------------------------------------------
    def report(self, *, not_run: str | None = None, source: str = "sensimix verify",
               settings: dict[str, Any] | None = None) -> Report:
        """Every criterion judged from what this run measured (``not_run``: the reason for steps not taken)."""
        s = self.s
        timing = self.timing()
        fp16_reason = None
        if s.device.startswith("cuda"):
            fp16_reason = not_run if s.fp16_baseline else "the fp16 BERT baseline was not asked for (--no-fp16)"
        acc_reason = self.accuracy_reason or not_run
        acc_settings = s.accuracy or AccuracySettings()
        criteria = [size_criterion(self._sizes, reason=not_run), time_criterion(timing, reason=not_run),
                    fp16_time_criterion(timing, s.fp16_max_ratio, reason=fp16_reason, gated=s.gate_fp16),
                    *accuracy_criteria(self.accuracy, max_gap=acc_settings.max_gap,
                                       min_accuracy=acc_settings.min_accuracy, reason=acc_reason),
                    agreement_criterion(self.accuracy, reason=acc_reason)]
        recorded = {k: (str(v) if isinstance(v, (os.PathLike, Path)) else v)
                    for k, v in dataclasses.asdict(s).items()}
        recorded.update(source=source, **(settings or {}))
        return Report(criteria=criteria, environment=self.environment, sizes=self._sizes, timing=timing,
                      accuracy=self.accuracy, settings=recorded)
