"""Skipping padded tokens: the attended tokens of a padded batch, packed, and attention over them.

Every op of a BERT layer but attention works token by token, and BERT's attention mask removes padded positions
as keys, so a padded position never influences an attended one: dropping padded tokens before the first layer
leaves the logits unchanged (up to the floating-point summation order of GEMMs with fewer rows) and saves their
work. QNLI dev padded to 128 attends ~40% of its tokens.

A :class:`Packing` is computed from the attention mask (one host sync, to size the layouts). Where that sync
matters (CUDA timing), compute it beforehand from the CPU mask and pass it in: ``model(..., packing=packing)``,
the way variable-length attention pipelines pass ``cu_seqlens`` from the data collator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..kernels.torch_ops import scratch


def _gather(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t.index_select(0, rows)`` into a reused buffer on CPU (a group's layout is dead once its attention ran; a
    fresh tens-of-MB layout per group and layer cost its page faults every time)."""
    if torch.is_grad_enabled() and t.requires_grad:  # out= has no autograd (off CPU scratch is a fresh tensor)
        return t.index_select(0, rows)
    shape = (rows.numel(), *t.shape[1:])
    out = scratch(math.prod(shape), t, t.dtype, slot="attention layout").view(shape)
    return torch.index_select(t, 0, rows, out=out)


# attention of [rows, heads, Lq, d] queries over [rows, heads, Lk, d] keys and values with a bool mask of the keys
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's scaled dot-product attention (the fp32 models' attention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


@dataclass(frozen=True, eq=False)  # holds tensors: identity, not elementwise, equality
class _SpanGroup:
    """Sequences whose attention runs as one SDPA call in a [rows, span] layout (see :class:`Packing`)."""

    start: int  # the group's tokens are packed rows [start, start + count)
    count: int
    rows: int
    span: int  # the group's last attended column + 1
    gather: torch.Tensor  # [rows * span] packed row of every layout slot (a finite stand-in for padded slots)
    slots: torch.Tensor  # [count] layout slots of the attended tokens, in packed order
    mask: torch.Tensor  # [rows, 1, 1, span] bool, for SDPA
    seqs: torch.Tensor  # [rows] the batch index of each layout row


@dataclass(frozen=True, eq=False)
class Packing:
    """The attended tokens of a padded batch, packed: what ``skip_padding`` runs the layers on.

    For attention, sequences are grouped by span (last attended position + 1, rounded up to a multiple
    of :attr:`SPAN_STEP`); each group gathers its Q, K, V into a [rows, span] layout, runs one SDPA call with
    the mask there, and its attended output rows are gathered back. Tokens are packed group by group.

    The gather fills a padded slot with an attended token's row instead of zeros: any finite row will do, since
    a padded key gets probability exactly 0 (its score is masked to -inf, and 0 * finite = 0) and a padded
    query's output is never gathered. One gather replaces a zero fill plus a scatter. On CPU, SDPA's time
    grows with rows * span^1.3-2 (bf16, 2 cores: [64 rows, span 32/64/128] = 16/36/94 ms), so grouping by span
    roughly halves attention on the benchmark's lengths (uniform in [5, 128]).
    """

    SPAN_STEP: ClassVar[int] = 32

    index: torch.Tensor  # [T] flat positions b * S + s of the attended tokens, in packed order
    positions: torch.Tensor  # [T] their positions s
    cls: torch.Tensor  # [B] packed row of each sequence's first token ([CLS], pooled), in batch order
    groups: tuple[_SpanGroup, ...]
    batch_shape: tuple[int, int] = (0, 0)  # [B, S] of the mask it was made from (checked against the inputs)
    lens: torch.Tensor | None = None  # [B] attended tokens of each sequence: its packed rows are cls .. cls + lens - 1

    @classmethod
    def of(cls, attention_mask: torch.Tensor, keep_full: bool = False) -> Packing | None:
        """The packing of a [B, S] mask, or None when packing does not apply: no padding to drop (unless
        ``keep_full``: then every token, packed, as a CUDA graph of the packed forward wants), or a sequence whose
        first token is masked (there is no attended [CLS] to pool; the padded path handles it as before)."""
        m = attention_mask.bool()
        if not m[:, 0].all() or (not keep_full and m.all()):
            return None
        bsz, seq = m.shape
        span = torch.where(m, torch.arange(1, seq + 1, device=m.device), 0).amax(dim=1)
        bucket = torch.div(span + cls.SPAN_STEP - 1, cls.SPAN_STEP, rounding_mode="floor")
        order = torch.argsort(bucket, stable=True)
        buckets, spans = bucket[order].tolist(), span[order].tolist()  # the host sync that sizes the layouts
        groups, index, start, first = [], [], 0, 0
        while first < bsz:
            last = first
            while last < bsz and buckets[last] == buckets[first]:
                last += 1
            rows, width = order[first:last], max(spans[first:last])
            mg = m.index_select(0, rows)[:, :width]
            flat = mg.reshape(-1)
            slots = flat.nonzero().squeeze(1)
            index.append(rows[slots // width] * seq + slots % width)
            gather = torch.where(flat, flat.cumsum(0) - 1 + start, start)  # padded -> the group's first token
            groups.append(_SpanGroup(start=start, count=len(slots), rows=len(rows), span=width, gather=gather,
                                     slots=slots, mask=mg[:, None, None, :], seqs=rows))
            start += len(slots)
            first = last
        flat_index = torch.cat(index)
        where = torch.empty(bsz * seq, dtype=torch.long, device=m.device)
        where[flat_index] = torch.arange(len(flat_index), device=m.device)
        return cls(index=flat_index, positions=flat_index % seq, cls=where[torch.arange(bsz, device=m.device) * seq],
                   groups=tuple(groups), batch_shape=(bsz, seq), lens=m.sum(dim=1))

    def to(self, device: torch.device | str) -> Packing:
        """The same packing with its index tensors on ``device`` (e.g. computed from a CPU mask, then staged)."""
        groups = tuple(replace(g, **{f.name: getattr(g, f.name).to(device) for f in fields(g)
                                     if isinstance(getattr(g, f.name), torch.Tensor)}) for g in self.groups)
        return Packing(index=self.index.to(device), positions=self.positions.to(device), cls=self.cls.to(device),
                       groups=groups, batch_shape=self.batch_shape,
                       lens=None if self.lens is None else self.lens.to(device))

    @property
    def device(self) -> torch.device:
        return self.index.device

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The attended entries of a [B, S] input (ids, token types), packed: [T]."""
        return t.reshape(-1).index_select(0, self.index)

    def attention(self, qkv: torch.Tensor, scale: float, attend: Attend = sdpa) -> torch.Tensor:
        """``attend`` (default SDPA) of packed [T, 3, heads, d] Q/K/V, one call per span group; returns packed
        [T, heads * d]."""
        tokens, heads = qkv.shape[0], qkv.shape[2]
        flat = qkv.reshape(tokens, -1)
        if torch.is_grad_enabled() and qkv.requires_grad:  # out= has no autograd: the groups' rows, concatenated
            return torch.cat([self._group_attention(flat, g, heads, scale, attend).index_select(0, g.slots)
                              for g in self.groups])
        out = flat.new_empty(tokens, flat.shape[1] // 3)
        for g in self.groups:
            torch.index_select(self._group_attention(flat, g, heads, scale, attend), 0, g.slots,
                               out=out[g.start:g.start + g.count])
        return out

    @staticmethod
    def _group_attention(flat: torch.Tensor, g: _SpanGroup, heads: int, scale: float,
                         attend: Attend) -> torch.Tensor:
        """``attend`` of one group's [rows, span] layout: [rows * span, heads * d], padded slots included."""
        layout = _gather(flat, g.gather).view(g.rows, g.span, 3, heads, -1)
        q, k, v = (t.transpose(1, 2) for t in layout.unbind(2))
        ctx = attend(q, k, v, g.mask, scale)
        # [rows, heads, span, d] -> [rows * span, heads * d]: a view when SDPA's output is stored
        # [rows, span, heads, d] (the CPU kernels do), so the caller's gather is the only pass
        return ctx.transpose(1, 2).reshape(g.rows * g.span, -1)

    def first_attention(self, q: torch.Tensor, kv: torch.Tensor, scale: float, attend: Attend) -> torch.Tensor:
        """``attend`` of each sequence's query q [B, heads, d] (batch order) over its packed keys and values
        kv [T, 2, heads, d]: [B, heads * d] in batch order (the last layer's attention for its first token)."""
        heads = kv.shape[2]
        flat = kv.reshape(kv.shape[0], -1)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for g in self.groups:
            layout = _gather(flat, g.gather).view(g.rows, g.span, 2, heads, -1)  # padded slots: finite stand-ins
            k, v = (t.transpose(1, 2) for t in layout.unbind(2))
            ctx = attend(q.index_select(0, g.seqs)[:, :, None, :], k, v, g.mask, scale)  # [rows, heads, 1, d]
            out.index_copy_(0, g.seqs, ctx.reshape(g.rows, -1))
        return out

    def mix_first(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's softmax-weighted mean of its packed tokens x [T, H], weighted by the scores u . x_j of
        its rows u [B, heads, H] (batch order): returns [B, heads, H] in batch order (the last layer's attention
        for its first token, keys and values folded into u; see ``Attention._first_token``)."""
        out = u.new_empty(u.shape)
        for g in self.groups:
            layout = _gather(x, g.gather).view(g.rows, g.span, -1)  # padded slots: finite stand-ins
            scores = torch.bmm(u.index_select(0, g.seqs), layout.transpose(1, 2))  # [rows, heads, span]
            scores.masked_fill_(~g.mask.view(g.rows, 1, g.span), float("-inf"))  # padded slots get p = 0
            out.index_copy_(0, g.seqs, torch.bmm(scores.softmax(dim=-1), layout))
        return out
