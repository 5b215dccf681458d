"""CUDA graphs for the packed forward: one graph per batch shape and token bucket, captured at its first use and
replayed after (``from_pretrained(..., cuda_graphs=True)``, the plan's ``cuda_graphs``).

Why: a SensiMix (2+1) forward launches ~190 kernels; on an H200 its fp16 path did 1.07 ms of device work in 7.3 ms of
host time per 128 x 128 batch (scripts/profile_forward.py). A replay launches them all at once.

A graph runs fixed shapes; skipping padding makes the packed token count T differ from batch to batch. So:

* T is rounded up to a bucket (:func:`token_bucket`: 8 steps per octave, so at most 12.5% extra rows, at least 64) and
  the attention's span (the longest sequence) up to a multiple of 32 (:func:`span_bucket`); the key of a graph is
  (batch size, padded length, T bucket, span bucket, whether token types are given);
* the batch's :class:`Packing` is laid out for its key (:func:`padded_packing`): its T tokens, then pad rows, and one
  attention group of all B sequences over the bucketed span;
* a pad row is the batch's first token (finite), is no key of any sequence (the layout gathers real rows only and
  masks every slot that is not one), and no valid row reads its output: every op of a layer works row by row except
  attention, so the valid rows compute what they compute without pad rows -- bit for bit where a row's arithmetic
  does not depend on the other rows (A8: integer GEMMs and row rules; fp32 GEMMs as long as the library picks the
  same algorithm for the padded M), which unit/test_graphs.py checks on the CPU by running this very code with eager
  calls in place of capture and replay (``capture=False``);
* :class:`GraphCache` keeps static buffers per key (inputs and the padded packing's index tensors, allocated outside
  the graphs' memory pool), captures on first use after a warm-up on a side stream, and then per call copies the
  inputs into the key's buffers, replays, and returns a copy of the logits. All graphs share one memory pool: replays
  run one after another on one stream, and each output is copied out before the next replay.

``torch.compile(mode="reduce-overhead")`` would also replay graphs, but it recompiles per dynamic shape (the token
count) and its compile took ~100 s on an H200 machine, longer than a whole device check allows; this needs none.
The packing (a host sync) is best made on the CPU beforehand and passed in (``model(..., packing=packing)``), as
the V&V's staged batches do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .packing import Packing, _SpanGroup

log = logging.getLogger(__name__)

MIN_TOKENS = 64  # the smallest token bucket
STEPS_PER_OCTAVE = 8  # token buckets between two powers of two: at most 1/8 of the rows are padding
MAX_GRAPHS = 64  # graphs one model keeps; a batch of another key beyond runs eagerly (said once)


def token_bucket(tokens: int) -> int:
    """The packed token count a graph runs for ``tokens`` attended tokens: at least :data:`MIN_TOKENS`, else rounded
    up to a multiple of 2^(e - 4) for tokens in (2^(e-1), 2^e] -- 8 buckets per octave, <= 12.5% padding."""
    if tokens < 0:
        raise ValueError(f"token_bucket: {tokens} tokens")
    if tokens <= MIN_TOKENS:
        return MIN_TOKENS
    octave = (tokens - 1).bit_length() - 1  # tokens in (2^octave, 2^(octave + 1)]
    step = 1 << max(0, octave - (STEPS_PER_OCTAVE.bit_length() - 1))
    return -(-tokens // step) * step


def span_bucket(span: int, seq: int) -> int:
    """The attention layout's width for a longest sequence of ``span`` positions: a multiple of 32, at most ``seq``."""
    step = Packing.SPAN_STEP
    return min(seq, -(-span // step) * step)


def longest_span(packing: Packing | None, seq: int) -> int:
    """The last attended position + 1 of the batch's longest sequence (its groups know it without a host sync)."""
    return seq if packing is None else max(g.span for g in packing.groups)


def padded_packing(packing: Packing | None, batch: int, seq: int, tokens: int, span: int,
                   device: torch.device | None = None) -> Packing:
    """``packing`` (None: every token of the [batch, seq] inputs attended, on ``device``) laid out for a graph's key:
    its T tokens in their packed order, then ``tokens - T`` pad rows (the first token of the batch: position 0 of
    sequence 0), and one attention group of all ``batch`` sequences over ``span`` columns (module docstring)."""
    device = packing.device if packing is not None else (device or torch.device("cpu"))
    index = torch.arange(batch * seq, device=device) if packing is None else packing.index
    t = index.numel()
    if tokens < t:
        raise ValueError(f"padded_packing: {t} tokens do not fit a bucket of {tokens}")
    if span < longest_span(packing, seq) or span > seq:
        raise ValueError(f"padded_packing: a span of {span} for sequences of up to {longest_span(packing, seq)} "
                         f"positions padded to {seq}")
    rows = torch.arange(t, device=device)
    slots = torch.div(index, seq, rounding_mode="floor") * span + index % seq  # layout slot of each real row
    gather = torch.zeros(batch * span, dtype=torch.long, device=device)  # a masked slot reads row 0 (finite)
    gather[slots] = rows
    mask = torch.zeros(batch * span, dtype=torch.bool, device=device)
    mask[slots] = True
    pad = index.new_zeros(tokens - t)
    flat = torch.cat([index, pad])
    cls = packing.cls if packing is not None else torch.arange(batch, device=device) * seq
    group = _SpanGroup(start=0, count=tokens, rows=batch, span=span, gather=gather,
                       slots=torch.cat([slots, pad]),  # a pad row takes the output of slot 0 (never read)
                       mask=mask.view(batch, 1, 1, span), seqs=torch.arange(batch, device=device))
    return Packing(index=flat, positions=flat % seq, cls=cls, groups=(group,), batch_shape=(batch, seq))


# ---------------------------------------------------------------------------------------------------
# static buffers, capture, replay
# ---------------------------------------------------------------------------------------------------
def _static(value: Any) -> Any:
    """A copy of a call's input that the graph owns: tensors cloned (normal tensors, so later calls may copy into
    them inside or outside inference mode), a Packing with each of its tensors cloned."""
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(False):
            return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _static(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        return tuple(_static(v) for v in value)
    return value


def _load(static: Any, value: Any) -> None:
    """Copy a call's input into the graph's buffers (same shapes: the key says so)."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif dataclasses.is_dataclass(static):
        for f in dataclasses.fields(static):
            _load(getattr(static, f.name), getattr(value, f.name))
    elif isinstance(static, tuple):
        for s, v in zip(static, value):
            _load(s, v)
    elif static != value:
        raise ValueError(f"a graph's key should fix {static!r}, got {value!r}")


@dataclass
class _Entry:
    inputs: dict[str, Any]  # the static buffers the graph reads
    graph: Any = None  # torch.cuda.CUDAGraph; None: the eager twin
    output: torch.Tensor | None = None
    calls: int = 0


@dataclass
class GraphCache:
    """``fn(**inputs)`` through one CUDA graph per key (module docstring); ``capture=False`` is the eager twin: the
    same buffers and calls, ``fn`` run on them where a graph would be replayed (CPU tests)."""

    fn: Callable[..., torch.Tensor]
    capture: bool = True
    max_graphs: int = MAX_GRAPHS
    warmup: int = 2  # eager calls on a side stream before a capture (lazy inits, compilation, cuBLAS workspaces)
    entries: dict[Hashable, _Entry] = field(default_factory=dict)
    captures: int = 0
    pool: Any = None
    _said_full: bool = False

    def __call__(self, key: Hashable, inputs: dict[str, Any]) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                if not self._said_full:
                    log.warning("CUDA graphs: %d shapes captured already; batches of other shapes run eagerly",
                                self.max_graphs)
                    self._said_full = True
                return self.fn(**inputs)
            entry = self.entries[key] = _Entry({k: _static(v) for k, v in inputs.items()})
            if self.capture:
                self._capture(entry)
        else:
            for name, value in inputs.items():
                _load(entry.inputs[name], value)
        entry.calls += 1
        if entry.graph is None:
            return self.fn(**entry.inputs).clone()
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, entry: _Entry) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(**entry.inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.output = self.fn(**entry.inputs)
        entry.graph = graph
        self.captures += 1


class PackedGraphs:
    """The packed SensiMix forward through :class:`GraphCache`: ``model._logits`` of the batch laid out for its key
    (padding skipped: :func:`padded_packing`; padding kept: the batch's own shape)."""

    def __init__(self, model: torch.nn.Module, capture: bool = True) -> None:
        self.model = model
        self.cache = GraphCache(self._run, capture=capture)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             token_type_ids: torch.Tensor | None, packing: Packing | None) -> torch.Tensor:
        return self.model._logits(input_ids, attention_mask, token_type_ids, packing)

    def key(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, packing: Packing | None,
            padded: bool, token_type_ids: torch.Tensor | None) -> tuple:
        batch, seq = input_ids.shape
        if padded:
            return batch, seq, "padded", attention_mask is not None, token_type_ids is not None
        tokens = batch * seq if packing is None else packing.index.numel()
        return batch, seq, token_bucket(tokens), span_bucket(longest_span(packing, seq), seq), \
            token_type_ids is not None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None, packing: Packing | None, padded: bool) -> torch.Tensor:
        """Logits of a checked batch: ``padded`` runs the padded forward (``attention_mask`` as given), else the packed
        one (``packing``: the batch's, or None when every token is attended)."""
        key = self.key(input_ids, attention_mask, packing, padded, token_type_ids)
        if padded:
            inputs = {"attention_mask": attention_mask, "packing": None}
        else:
            batch, seq, tokens, span, _ = key
            inputs = {"attention_mask": None,
                      "packing": padded_packing(packing, batch, seq, tokens, span, input_ids.device)}
        return self.cache(key, {"input_ids": input_ids, "token_type_ids": token_type_ids, **inputs})
