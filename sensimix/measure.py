"""How a model folder is loaded, fed and timed: the measurement primitives of ``sensimix evaluate``, the V&V run,
the acceptance suite and the benchmark.

* :func:`load_for_inference`: a plain BERT folder (the baseline, transformers) or a packed SensiMix folder, both
  returning ``.logits``;
* :func:`task_inputs` / :func:`synthetic_inputs` / :func:`make_batches`: inputs padded to ``max_seq_length`` like
  the certified cached features, checked against the model, staged on the device before any clock starts;
* :func:`run_inference`: one timed pass -- forward passes and the on-device argmax only, warm-up excluded, CUDA
  synchronized -- that refuses NaN/inf logits instead of scoring them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .devices import certified_fp32, resolve_device

log = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class NonFiniteLogits(ValueError):
    """A model produced NaN/inf logits: nothing it scored or timed can be reported."""


def is_sensimix_folder(path: str | os.PathLike) -> bool:
    """A packed SensiMix folder (config.json has ``sensimix_format``), as opposed to a plain BERT folder."""
    from .io import read_config_json

    config = read_config_json(path, expected="a BERT or SensiMix checkpoint folder")
    if "sensimix_format" in config:
        return True
    if config.get("model_type") == "sensimix" or "num_8bit_layers" in config:  # not a BERT: say so, in one line
        raise ValueError(f"{Path(path) / 'config.json'} describes a SensiMix model but has no sensimix_format: a "
                         f"QAT training checkpoint, or a packed config.json that was edited; pass the packed folder "
                         f"compress wrote (or restore it, or re-export the model)")
    return False


def load_for_inference(path: str | os.PathLike, device: str = "cpu", precision: str = "fp32", *,
                       binary_kernel: str | None = None, index8_kernel: str | None = None,
                       weights: str = "auto") -> torch.nn.Module:
    """A plain BERT or packed SensiMix folder, in eval mode on ``device``; ``model(**inputs).logits`` for both.

    BERT runs in ``precision`` with eager attention for fp32 (the certified math; TF32 off on CUDA) and SDPA for
    fp16/bf16. SensiMix runs :class:`sensimix.inference.SensiMixForSequenceClassification` in ``precision``
    (``fast``: its approximate fastest recipe). ``weights`` names the file to load (``pytorch_model.bin``: the one
    the size criterion judges).
    """
    from .inference.plan import FAST, PRECISIONS

    device = resolve_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        certified_fp32(device)
    if is_sensimix_folder(path):
        from .inference import SensiMixForSequenceClassification

        return SensiMixForSequenceClassification.from_pretrained(
            path, device=device, precision=precision, binary_kernel=binary_kernel, index8_kernel=index8_kernel,
            weights=weights)
    if binary_kernel or index8_kernel:
        raise ValueError(f"{path} is a plain BERT folder: kernel choices apply to SensiMix checkpoints only")
    if precision == FAST:
        raise ValueError(f"{path} is a plain BERT folder: precision 'fast' is SensiMix's approximate recipe; run "
                         f"the BERT baseline in fp32 (certified), fp16 or bf16")
    from .devices import torch_dtype
    from .sources import bert_config, load_bert_classifier

    config = bert_config(path, allow_qat=False)
    if config.is_decoder or config.add_cross_attention:
        raise ValueError(f"{path}/config.json makes the BERT a decoder (is_decoder / add_cross_attention): not the "
                         f"encoder classifier the criteria compare; save a BertForSequenceClassification")
    model = load_bert_classifier(path, config.num_labels, dtype=torch_dtype(precision),
                                 attn_implementation="eager" if precision == "fp32" else "sdpa",
                                 use_safetensors=None if weights == "auto" else weights.endswith(".safetensors"),
                                 config_overrides=BASELINE_RUNTIME)
    return model.to(device).eval()


# runtime options of a BERT's config.json that change its speed, not its logits: the baseline always runs with
# transformers' defaults (a chunked FFN, or attentions and hidden states returned, would slow it and flatter SensiMix)
BASELINE_RUNTIME = {"chunk_size_feed_forward": 0, "output_attentions": False, "output_hidden_states": False}


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def task_inputs(task: str, tokenizer: Any, glue_dir: str | os.PathLike | None = None, split: str = "dev",
                max_seq_length: int = 128, *, hub: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` [N, max_seq_length] (padded to max length, like the
    certified cached features) and ``labels`` [N] of a GLUE task split (``hub``: from the hub when no local
    GLUE folder is given; online users only)."""
    from .data import load_glue

    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    return examples_inputs(load_glue(task, split, glue_dir, hub=hub), tokenizer, max_seq_length)


def examples_inputs(examples: Any, tokenizer: Any, max_seq_length: int = 128) -> dict[str, torch.Tensor]:
    """:func:`task_inputs` of examples already loaded (a :class:`sensimix.data.Examples`)."""
    from .data import tokenize

    features = tokenize(examples, tokenizer, max_length=max_seq_length, pad_to_max=True)
    return {k: torch.tensor(features.columns[k], dtype=torch.long) for k in (*INPUT_KEYS, "labels")}


STAGED_BYTES_PER_EXAMPLE_TOKEN = 2 * 3 * 8  # ids, mask, token types as int64; the inputs and their staged batches


def available_memory_bytes() -> int | None:
    """Memory the kernel says is available now (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_examples_fit(num_examples: int, max_seq_length: int, what: str = "--examples") -> None:
    """The timed examples are tokenized and staged as tensors before the clock starts: refuse, before any work, a
    count whose tensors would take more than half of the memory available."""
    need = num_examples * max_seq_length * STAGED_BYTES_PER_EXAMPLE_TOKEN
    avail = available_memory_bytes()
    if avail is not None and need > avail // 2:
        fit = avail // 2 // (max_seq_length * STAGED_BYTES_PER_EXAMPLE_TOKEN)
        raise ValueError(f"{what} {num_examples:,} would stage {need / 2**30:,.1f} GiB of input tensors, more than "
                         f"half of the {avail / 2**30:,.1f} GiB of memory available; use {what} {fit:,} or fewer "
                         f"(the certified run used 104,743)")


def device_free_bytes(device: str) -> int | None:
    """Memory free for tensors on ``device`` now: the GPU's free memory on CUDA, MemAvailable on the CPU."""
    if str(device).startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    return available_memory_bytes()


def check_batch_fits(batch_size: int, inputs: dict[str, torch.Tensor], model: Any, device: str,
                     num_examples: int | None = None, what: str = "--batch-size") -> None:
    """Refuse, before any batch runs, a batch size whose forward cannot fit in the free memory of ``device``.

    The bound is one the forward cannot go below: one FFN's intermediate activations, [tokens, intermediate_size]
    in the model's dtype, for the largest batch ``make_batches`` will make (at most ``num_examples`` rows; only
    the attended tokens for a SensiMix model that skips padding). The real peak is a few times that, so a batch
    that passes may still fail; :func:`is_out_of_memory` tells that failure apart."""
    ids = inputs["input_ids"]
    rows = min(batch_size, len(ids) if num_examples is None else num_examples)
    tokens = rows * ids.shape[1]
    if getattr(model, "skip_padding", False) and inputs.get("attention_mask") is not None:
        tokens = int(tokens * float(inputs["attention_mask"].float().mean()))  # padding never reaches the FFNs
    dtype = getattr(model, "dtype", torch.float32)
    need = tokens * model.config.intermediate_size * (torch.finfo(dtype).bits // 8)
    free = device_free_bytes(device)
    if free is not None and need > free:
        fit = max(1, rows * free // need)
        raise ValueError(f"{what} {batch_size:,}: one batch of {rows:,} examples x {ids.shape[1]} tokens needs at "
                         f"least {need / 2**30:,.1f} GiB on {device} for one FFN's activations alone, more than the "
                         f"{free / 2**30:,.1f} GiB free; use {what} {fit:,} or fewer (certified: 128)")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's failure (CPU or CUDA), not a bug."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def synthetic_inputs(num_examples: int, max_seq_length: int = 128, vocab_size: int = 30522,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Random QNLI-shaped pairs ``[CLS] a [SEP] b [SEP]`` padded to ``max_seq_length``, with random labels.

    Total lengths are uniform in [5, max_seq_length], the first segment gets token type 0 and the second 1.
    With a BERT-sized vocabulary (> 1000) the special ids are bert-base-uncased's ([CLS] 101, [SEP] 102, [PAD] 0)
    and words are drawn from ids >= 999; smaller vocabularies (tests) use [CLS] 1, [SEP] 2 and words >= 3.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be >= 5 for [CLS] a [SEP] b [SEP], got {max_seq_length}")
    cls_id, sep_id, first_word = (101, 102, 999) if vocab_size > 1000 else (1, 2, 3)
    if vocab_size <= first_word:
        raise ValueError(f"vocab_size must be > {first_word}, got {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    n, length = num_examples, max_seq_length
    total = torch.randint(5, length + 1, (n, 1), generator=g)  # [CLS] a [SEP] b [SEP]
    sep1 = 1 + (1 + (torch.rand(n, 1, generator=g) * (total - 4)).long().clamp_max(total - 5))  # len(a) in [1, total-4]
    pos = torch.arange(length).unsqueeze(0)
    ids = torch.randint(first_word, vocab_size, (n, length), generator=g)
    ids[:, 0] = cls_id
    ids = torch.where((pos == sep1) | (pos == total - 1), torch.tensor(sep_id), ids)
    mask = pos < total
    return {
        "input_ids": ids.masked_fill(~mask, 0),
        "attention_mask": mask.long(),
        "token_type_ids": ((pos > sep1) & mask).long(),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def check_length_fits(max_seq_length: int, config: Any, what: str) -> None:
    """Refuse a padded length longer than ``what``'s position table before any data is tokenized to it (a huge
    length would fill the memory with padding first)."""
    limit = config.max_position_embeddings
    if max_seq_length > limit:
        raise ValueError(f"--max-seq-length {max_seq_length} is longer than the position table of {what} "
                         f"(max_position_embeddings={limit}): use --max-seq-length {limit} or less")


def check_inputs_fit(inputs: dict[str, torch.Tensor], config: Any, what: str = "the inputs") -> None:
    """Refuse inputs the model cannot take, once, before timing: sequence length vs the position table, token
    ids vs the vocabulary, segment ids vs the token-type table."""
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"{what}: input_ids must be a non-empty [N, seq_len] tensor, got {list(ids.shape)}")
    limit = config.max_position_embeddings
    if ids.shape[1] > limit:
        raise ValueError(f"{what}: sequence length {ids.shape[1]} > max_position_embeddings={limit} of the model: "
                         f"use --max-seq-length {limit} or less")
    for key, bound, field in (("input_ids", config.vocab_size, "vocab_size"),
                              ("token_type_ids", config.type_vocab_size, "type_vocab_size")):
        t = inputs.get(key)
        if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"{what}: {key} outside [0, {bound}) ({field} of the model): was the data tokenized "
                             f"with this model's tokenizer?")


def make_batches(inputs: dict[str, torch.Tensor], batch_size: int = 128, num_examples: int | None = None,
                 device: str = "cpu", *, packing: bool = False) -> list[dict[str, Any]]:
    """Split ``inputs`` into batches on ``device``, cycling through them to reach ``num_examples`` (default: all).

    The last batch is smaller when ``num_examples`` is not a multiple of ``batch_size``. With ``packing`` each
    batch also carries the :class:`~sensimix.inference.Packing` of its mask, made here from the CPU copy (a
    variable-length collator's job), so a padding-skipping model needs no host sync to make it when timed.
    """
    if "input_ids" not in inputs:
        raise ValueError(f"inputs need input_ids (got {sorted(inputs)})")
    available = len(inputs["input_ids"])
    if available == 0:
        raise ValueError("inputs hold no examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = available if num_examples is None else num_examples
    if total < 1:
        raise ValueError(f"num_examples must be >= 1, got {total}")
    keys = [k for k in (*INPUT_KEYS, "labels") if k in inputs]
    batches: list[dict[str, Any]] = []
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(start + batch_size, total)) % available
        cpu = {k: inputs[k].index_select(0, idx) for k in keys}
        batch: dict[str, Any] = {k: v.to(device) for k, v in cpu.items()}
        if packing and "attention_mask" in cpu:
            from .inference.packing import Packing

            made = Packing.of(cpu["attention_mask"])
            if made is not None:
                batch["packing"] = made.to(device)
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    duration_ms: float  # the timed pass over all batches (model forward + argmax on the device)
    num_examples: int
    batch_size: int
    predictions: torch.Tensor  # [num_examples] int64, on CPU
    accuracy: float | None  # None when the batches carry no labels

    def log_lines(self) -> list[str]:
        """The certified log lines."""
        acc = "n/a" if self.accuracy is None else self.accuracy
        return [f"Num examples = {self.num_examples}", f"Batch size = {self.batch_size}",
                f"duration: {self.duration_ms:.0f} ms", f"acc = {acc}"]


def _takes_packing(model: torch.nn.Module) -> bool:
    """Whether a batch's staged :class:`Packing` goes to ``model``: SensiMix models that skip padding only (a packing
    passed in wins over the plan, so a model told to keep padding would otherwise run packed, unnoticed)."""
    from .inference import SensiMixForSequenceClassification

    return isinstance(model, SensiMixForSequenceClassification) and model.skip_padding


def forward_batch(model: torch.nn.Module, batch: dict[str, Any], packs: bool | None = None) -> torch.Tensor:
    """The logits of ``model`` on a staged batch (its staged packing only where :func:`_takes_packing`; ``packs``:
    that answer, computed once by a caller that runs many batches)."""
    kwargs = {k: batch.get(k) for k in INPUT_KEYS}
    if (_takes_packing(model) if packs is None else packs) and batch.get("packing") is not None:
        kwargs["packing"] = batch["packing"]
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out


def run_inference(model: torch.nn.Module, batches: list[dict[str, Any]], *, warmup_batches: int = 2,
                  device: str = "cpu") -> InferenceResult:
    """Time one pass of ``model`` over ``batches`` (already on the device) after ``warmup_batches`` untimed ones.

    The clock covers the forward passes and the on-device argmax only; CUDA is synchronized before and after.
    NaN/inf logits in any batch raise :class:`NonFiniteLogits` (checked on the device, reported after the pass).
    """
    if not batches:
        raise ValueError("no batches to run")
    devices = {torch.device(device)} | {b["input_ids"].device for b in batches[:1]}
    cuda = [d for d in devices if d.type == "cuda"]
    packs = _takes_packing(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "max_position_embeddings"):
        width = batches[0]["input_ids"].shape[1]
        if width > config.max_position_embeddings:
            raise ValueError(f"sequence length {width} > max_position_embeddings={config.max_position_embeddings} "
                             f"of this model: use --max-seq-length {config.max_position_embeddings} or less")

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    def forward(b: dict[str, Any]) -> torch.Tensor:
        return forward_batch(model, b, packs)

    model.eval()
    with torch.inference_mode():
        for i in range(max(0, warmup_batches)):
            forward(batches[i % len(batches)])
        sync()
        predictions, finite = [], []
        start = time.perf_counter()
        for b in batches:
            logits = forward(b)
            predictions.append(logits.argmax(dim=-1))
            finite.append(torch.isfinite(logits).all())
        sync()
        duration_ms = (time.perf_counter() - start) * 1e3
    bad = [i for i, ok in enumerate(torch.stack(finite).cpu().tolist()) if not ok]
    if bad:
        fix = ("it runs in fp16, whose range ends at 65,504: run it in fp32 or bf16 (--precision)"
               if getattr(model, "dtype", None) == torch.float16 else
               "check its config.json (e.g. layer_norm_eps) and weights")
        raise NonFiniteLogits(f"the model produced NaN/inf logits on {len(bad)} of {len(batches)} batches (first: "
                              f"batch {bad[0]}); nothing is scored or timed. {fix[0].upper()}{fix[1:]}")
    preds = torch.cat(predictions).cpu()
    accuracy = None
    if all("labels" in b for b in batches):
        labels = torch.cat([b["labels"] for b in batches]).cpu()
        accuracy = (preds == labels).double().mean().item()
    return InferenceResult(duration_ms=duration_ms, num_examples=len(preds),
                           batch_size=int(batches[0]["input_ids"].shape[0]), predictions=preds, accuracy=accuracy)
