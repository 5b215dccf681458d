"""What the GLUE table runs: the runs (task, model, activations, ablation, seed), the named plans that list them, and
the protocol (every training setting a run depends on besides those five) that makes a run the same run again.

A run is identified by its five fields and its protocol's digest (:func:`run_key`): rerunning a plan skips every
run whose key is already in the results file, and changing e.g. ``--train-limit`` makes new runs, never mixes them
with the old ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...vv.accuracy import parse_split

if TYPE_CHECKING:
    from ...train import TrainSettings

TASK_ORDER = ("sst-2", "mrpc", "rte", "cola")  # the GLUE tasks with a train split in the shared data
REFERENCE = "fp32"
SENSIMIX_MODELS = ("3+3", "2+1")
# What a user deploys instead of SensiMix: the reference's first N layers (N: the SensiMix model's depth), distilled
# from the reference for the SensiMix model's epochs (none when N is the reference's depth: the reference itself),
# quantized by ONNX Runtime's dynamic int8 (the benchmark's best CPU peer, sensimix.bench.peers). Model -> the
# SensiMix model it is the int8 peer of.
INT8_PEERS = {"bert6-int8": "3+3", "bert3-int8": "2+1"}
MODELS = (REFERENCE, *SENSIMIX_MODELS, *INT8_PEERS)
MODEL_TITLES = {REFERENCE: "fp32 reference", "3+3": "SensiMix (3+3)", "2+1": "SensiMix (2+1)",
                "bert6-int8": "6-layer BERT, ORT int8", "bert3-int8": "3-layer BERT, ORT int8"}
ACTIVATIONS = ("fp32", "a8")  # SensiMix's; the int8 peers quantize theirs per batch (INT8)
INT8 = "int8"
FULL = "full"
ABLATIONS = (FULL, "no-abwr", "no-pt", "no-ilf", "no-distill")
SEEDS = (42, 43, 44)

# max_seq_length per task, from the MiniLM tokenizer's lengths (train, p99 / max): SST-2 47 / 57, CoLA 27 / 47,
# MRPC 83 / 103 -> 64, 64, 128 truncate nothing; RTE 197 / 289: 128 (GLUE's usual) truncates 12% of its pairs
MAX_SEQ_LENGTH = {"sst-2": 64, "cola": 64, "mrpc": 128, "rte": 128}

# CPU train subsets (None: all). Measured here (2-core EPYC shared with another training run; docs/glue.md): a
# full-recipe (3+3) A8 run trains ~2 MRPC examples/s, so one MRPC seed of the five models is ~4.5 h. MRPC (3,668)
# and RTE (2,490) are small and noisy: all of them. CoLA's 8,551 sentences are ~12 tokens (4x cheaper than MRPC's
# pairs): all. SST-2: the README's 2,000-example protocol (all 67,349 would be ~20x the MRPC cost); CUDA: all.
CPU_TRAIN_LIMITS: dict[str, int | None] = {"sst-2": 2000, "mrpc": None, "rte": None, "cola": None}


@dataclass(frozen=True, order=True)
class RunSpec:
    """One finished run is one line of the results file."""

    task: str
    seed: int
    model: str                   # fp32 (the reference) | 3+3 | 2+1 | an int8 peer (INT8_PEERS)
    activations: str = "fp32"    # fp32 | a8 (the reference: fp32; an int8 peer: int8)
    ablation: str = FULL         # full | no-abwr | no-pt | no-ilf | no-distill (the reference: full)

    @property
    def is_reference(self) -> bool:
        return self.model == REFERENCE

    @property
    def is_int8_peer(self) -> bool:
        return self.model in INT8_PEERS

    @property
    def label(self) -> str:
        if self.is_reference or self.is_int8_peer:
            return f"{self.task} {MODEL_TITLES[self.model]} seed {self.seed}"
        ablation = "" if self.ablation == FULL else f" {self.ablation}"
        return f"{self.task} {MODEL_TITLES[self.model]} {self.activations}{ablation} seed {self.seed}"


def depth(model: str) -> int | None:
    """The encoder layers of a SensiMix model or an int8 peer (None: the reference's, whatever they are)."""
    if model == REFERENCE:
        return None
    return parse_split(INT8_PEERS.get(model, model))[0]


def same_as_full(model: str, ablation: str) -> str | None:
    """Why ``ablation`` of ``model`` trains exactly the full recipe (so it is not run), or None."""
    layers, eightbit = parse_split(model)
    if ablation == "no-ilf" and layers - eightbit == 1:
        return (f"{MODEL_TITLES[model]} has one 1-bit layer: ILF binarizes it right after PT, which is what no-ILF "
                f"does (the same schedule, the same run)")
    return None


@dataclass(frozen=True)
class Plan:
    """Axes whose product is the run list; the reference of every (task, seed) is always in it (each SensiMix model
    is compressed from it and distilled from it)."""

    name: str
    about: str
    seeds: dict[str, tuple[int, ...]]  # task -> seeds, in TASK_ORDER
    models: tuple[str, ...] = SENSIMIX_MODELS
    activations: tuple[str, ...] = ACTIVATIONS
    ablations: tuple[str, ...] = (FULL,)

    def runs(self) -> list[RunSpec]:
        """Task by task, seed by seed: the reference first, then each model / activations / ablation (an int8 peer
        has one variant: its int8, the full recipe)."""
        out: list[RunSpec] = []
        for task in (t for t in TASK_ORDER if t in self.seeds):
            for seed in self.seeds[task]:
                out.append(RunSpec(task, seed, REFERENCE))
                out += [RunSpec(task, seed, m, a, ab) for m in SENSIMIX_MODELS if m in self.models
                        for a in self.activations for ab in self.ablations if same_as_full(m, ab) is None]
                out += [RunSpec(task, seed, m, INT8) for m in INT8_PEERS if m in self.models and FULL in self.ablations]
        return out

    def with_axes(self, *, tasks: list[str] | None = None, seeds: list[int] | None = None,
                  models: list[str] | None = None, activations: list[str] | None = None,
                  ablations: list[str] | None = None) -> Plan:
        """The plan with each given axis replaced (a task the plan lacks takes the plan's first seeds list)."""
        chosen = dict(self.seeds)
        if tasks is not None:
            fallback = next(iter(self.seeds.values()), SEEDS[:1])
            chosen = {t: self.seeds.get(t, fallback) for t in tasks}
        if seeds is not None:
            chosen = {t: tuple(seeds) for t in chosen}
        return dataclasses.replace(
            self, seeds=chosen, models=tuple(models) if models is not None else self.models,
            activations=tuple(activations) if activations is not None else self.activations,
            ablations=tuple(ablations) if ablations is not None else self.ablations)


def plans(device: str = "cpu") -> dict[str, Plan]:
    """The named plans; on CUDA every task gets 3 seeds (the train splits are used whole there)."""
    cuda = str(device).startswith("cuda")
    one = SEEDS if cuda else SEEDS[:1]
    table = {"sst-2": one, "mrpc": SEEDS, "rte": SEEDS, "cola": one}
    return {
        "a8-decision": Plan("a8-decision", "issue 24 item 5: SST-2 and MRPC, (3+3) and (2+1) with fp32 and A8 "
                            "activations, 2 seeds, references included", {"sst-2": SEEDS[:2], "mrpc": SEEDS[:2]}),
        "table": Plan("table", "the GLUE table: SST-2, MRPC, RTE, CoLA; the reference, (3+3) and (2+1) with fp32 "
                      "and A8 activations, and the int8 BERT of each one's depth; 3 seeds on MRPC and RTE, "
                      + ("3" if cuda else "1") + " on SST-2 and CoLA", table, models=(*SENSIMIX_MODELS, *INT8_PEERS)),
        "ablation": Plan("ablation", "MRPC and RTE, (3+3) and (2+1), fp32 activations, 3 seeds: the full recipe vs "
                         "no ABWR, no PT, no ILF, no distillation", {"mrpc": SEEDS, "rte": SEEDS},
                         activations=("fp32",), ablations=ABLATIONS),
    }


def plan_runs(names: list[str], device: str = "cpu", **axes: Any) -> list[RunSpec]:
    """The runs of the named plans (each with ``axes`` replaced: :meth:`Plan.with_axes`), without repeats, in
    plan order (task, seed; the reference first)."""
    known = plans(device)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown plan {unknown[0]!r}; choose from {', '.join(known)}")
    runs = [r for n in names for r in known[n].with_axes(**axes).runs()]
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    unique = list(dict.fromkeys(runs))
    position = {r: i for i, r in enumerate(unique)}  # stable within a (task, seed): plan order
    return sorted(unique, key=lambda r: (order[r.task], r.seed, not r.is_reference, position[r]))


# ---------------------------------------------------------------------------------------------------
# the protocol: what a run's training depends on besides its five fields
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """One task's training protocol: the CI accuracy protocol (sensimix.vv.AccuracySettings) at table scale. The
    reference is fine-tuned from ``pretrained`` for ``reference_epochs``; SensiMix is compressed from the reference
    and distilled from it for ``epochs`` (None: just enough for PT + ILF to binarize every 1-bit FFN, the full
    recipe's count, which its ablations keep: one training budget per model)."""

    task: str
    train_limit: int | None
    max_seq_length: int
    pretrained: str                  # what identifies the pre-trained model (not its path on this machine)
    reference_epochs: float = 2.0
    epochs: float | None = None
    max_steps: int = -1              # > 0: every run stops there (smoke runs)
    batch_size: int = 32
    learning_rate: float = 5e-5
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    trainer_eval_limit: int = 200    # the trainers' per-epoch dev check: a log only, never a choice

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def sensimix_epochs(self, model: str) -> float:
        from ...train.recipe import epochs_to_binarize_all

        if self.epochs is not None:
            return self.epochs
        layers, eightbit = parse_split(model)
        return float(epochs_to_binarize_all(layers - eightbit))

    def settings(self, spec: RunSpec, device: str) -> TrainSettings:
        """The TrainSettings of ``spec`` (no fast calibration: the table scores the exact path)."""
        from ...train import TrainSettings

        common = dict(max_steps=self.max_steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                      max_seq_length=self.max_seq_length, seed=spec.seed, train_limit=self.train_limit,
                      eval_limit=self.trainer_eval_limit, fast_calibration=False,
                      device="cuda" if str(device).startswith("cuda") else "cpu")  # Trainer: cuda:N is its own
        if spec.is_reference:
            return TrainSettings(epochs=self.reference_epochs, **common)
        if spec.is_int8_peer:  # the training budget of the SensiMix model of its depth, distilled as it is
            return TrainSettings(epochs=self.sensimix_epochs(INT8_PEERS[spec.model]), abwr=False, pt=False, ilf=False,
                                 distill=True, distill_alpha=self.distill_alpha,
                                 distill_temperature=self.distill_temperature, **common)
        return TrainSettings(epochs=self.sensimix_epochs(spec.model), abwr=spec.ablation != "no-abwr",
                             pt=spec.ablation != "no-pt", ilf=spec.ablation != "no-ilf",
                             distill=spec.ablation != "no-distill", distill_alpha=self.distill_alpha,
                             distill_temperature=self.distill_temperature, **common)


def run_key(task: str, model: str, activations: str, ablation: str, seed: int, protocol: str) -> tuple:
    """What makes two runs the same run (``protocol``: :attr:`Protocol.digest`)."""
    return (task, model, activations, ablation, int(seed), protocol)


def spec_key(spec: RunSpec, protocol: Protocol) -> tuple:
    return run_key(spec.task, spec.model, spec.activations, spec.ablation, spec.seed, protocol.digest)


def record_key(record: dict[str, Any]) -> tuple:
    return run_key(record["task"], record["model"], record["activations"], record["ablation"], record["seed"],
                   record["protocol_digest"])


def protocol_for(task: str, device: str, pretrained: str, *, train_limits: dict[str, int | None] | None = None,
                 max_seq_length: int | None = None, **fields: Any) -> Protocol:
    """``task``'s protocol on ``device``: CPU subsets (:data:`CPU_TRAIN_LIMITS`) unless ``train_limits`` names the
    task (None: all); on CUDA all train examples. ``fields``: other :class:`Protocol` fields."""
    limits = train_limits or {}
    default = None if str(device).startswith("cuda") else CPU_TRAIN_LIMITS[task]
    return Protocol(task, limits.get(task, default), max_seq_length or MAX_SEQ_LENGTH[task], pretrained, **fields)
