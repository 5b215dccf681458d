"""The packed encoder's module tree. Attribute names are transformers' BERT names, so every buffer's state-dict
name is the checkpoint's tensor name (``bert.encoder.layer.0.attention.self.query.weight_q``, ...)."""

from __future__ import annotations

import torch
from torch import nn

from .. import a8
from ..config import SensiMixConfig
from ..kernels import a8native
from ..kernels.base import add_residual
from .layers import BinaryLinear, Embedding, FusedIndex8Linear, Index8Embedding, Index8Linear, LayerNorm, Linear
from .packing import Attend, Packing, sdpa
from .plan import InferencePlan


class Embeddings(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.word_embeddings = Index8Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Index8Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids (positions 0..S-1), or packed [T] ids with their ``positions`` (:class:`Packing`)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        # BERT's order: (word + token type) + position, then LayerNorm; the sums into the fresh word rows
        x = add_residual(self.word_embeddings(input_ids), self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(add_residual(x, self.position_embeddings(positions)))


class SelfAttention(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.query, self.key, self.value = Index8Linear(h, h), Index8Linear(h, h), Index8Linear(h, h)


class AttentionOutput(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.dense = Index8Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = AttentionOutput(c)
        self.num_heads = c.num_attention_heads
        self.scale = (c.hidden_size // c.num_attention_heads) ** -0.5
        self.qkv: FusedIndex8Linear | None = None  # Q, K and V as one GEMM
        self.kv: FusedIndex8Linear | None = None  # K and V as one GEMM, Q apart (the last layer)
        self.attend: Attend = sdpa  # an A8 plan's: sensimix.a8.attention
        self.native = False  # an A8 plan on a CPU: the packed sequences' attention in C (the same bits)

    def prepare(self, plan: InferencePlan, query_apart: bool = False) -> None:
        """Kernel operands for ``plan``. Linears that read the same x run as one GEMM where the plan fuses (one
        activation pass): Q, K and V, or with ``query_apart`` (the last layer, whose forward needs the pooled tokens'
        queries only and folds keys and values into them) Q on its own, and K and V for a full-layer call."""
        s = self.self
        self.qkv = self.kv = None
        self.attend = a8.attention if plan.a8 else sdpa
        self.native = plan.a8 and plan.device.type == "cpu" and a8native.attention_unavailable() is None
        if plan.fuse_qkv and query_apart:
            self.kv = FusedIndex8Linear([s.key, s.value], plan)
            for part in (s.key, s.value):
                part.kernel, part.fused_into = self.kv.kernel, "kv"
            s.query.prepare(plan)
        elif plan.fuse_qkv:
            self.qkv = FusedIndex8Linear([s.query, s.key, s.value], plan)
            for part in (s.query, s.key, s.value):
                part.kernel, part.fused_into = self.qkv.kernel, "qkv"
        else:
            for part in (s.query, s.key, s.value):
                part.prepare(plan)
        self.output.dense.prepare(plan)

    def _heads(self, t: torch.Tensor, lead: torch.Size, n: int) -> torch.Tensor:
        return t.view(*lead, n, self.num_heads, -1)  # [..., n, heads, d]

    def _kv(self, x: torch.Tensor) -> torch.Tensor:
        """Keys and values of every token, [..., 2, heads, d], where K and V are not fused with Q."""
        lead, s = x.shape[:-1], self.self
        if self.kv is not None:
            return self._heads(self.kv(x), lead, 2)
        return torch.cat([self._heads(s.key(x), lead, 1), self._heads(s.value(x), lead, 1)], dim=-3)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values of every token: [..., 3, heads, d]."""
        lead = x.shape[:-1]
        if self.qkv is not None:
            return self._heads(self.qkv(x), lead, 3)
        return torch.cat([self._heads(self.self.query(x), lead, 1), self._kv(x)], dim=-3)

    def _first_token(self, x: torch.Tensor, mask: torch.Tensor | None,
                     packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, attention output) of each sequence's first token, [B, H] each: its query against every key.

        Keys and values are folded into the query instead of computed for every token. For head h, with
        k_j = Wk_h x_j + bk_h and v_j = Wv_h x_j + bv_h: q . k_j = (Wk_h^T q) . x_j + q . bk_h, where the last term
        is the same for every j and cancels in the softmax, and sum_j p_j v_j = Wv_h (sum_j p_j x_j) + bv_h since
        the p_j sum to 1. So u = Wk_h^T q (one [d, H] product per sequence) scores the tokens' x directly, and the
        weighted mean of x goes through Wv_h once: ~2 * heads * H products per token instead of the 2 * H * H of
        the key and value projections. The same numbers up to the summation order (fp32: ~1e-6 of the output)."""
        s, heads = self.self, self.num_heads
        first = x.index_select(0, packing.cls) if packing is not None else x[:, 0]
        if self.qkv is not None:  # Q fused with K and V (a layer not prepared as the last): Q of all rows
            qkv = self._qkv(x)
            q = qkv.index_select(0, packing.cls)[:, 0] if packing is not None else qkv[:, 0, 0]
        else:
            q = self._heads(s.query(first), first.shape[:-1], 1)[:, 0]  # [B, heads, d]
        q = q.to(x.dtype)  # a bf16 kernel's output; the folded products run in the residual stream's dtype
        wk, _ = s.key.dense_weight(x.dtype)
        wv, bv = s.value.dense_weight(x.dtype)
        hidden = wk.shape[1]
        u = torch.bmm(q.transpose(0, 1), wk.view(heads, -1, hidden)).transpose(0, 1)  # [B, heads, H]
        u = u.mul_(self.scale)
        if packing is not None:
            z = packing.mix_first(u, x)
        else:
            scores = torch.bmm(u, x.transpose(1, 2))  # [B, heads, S]
            if mask is not None:
                scores = scores.masked_fill_(~mask[:, 0], float("-inf"))  # mask [B, 1, 1, S]
            z = torch.bmm(scores.softmax(dim=-1), x)  # [B, heads, H]
        ctx = torch.bmm(z.transpose(0, 1), wv.view(heads, -1, hidden).transpose(1, 2)).transpose(0, 1)
        return first, (ctx + bv.view(heads, -1)).reshape(first.shape)  # [B, heads, d] -> [B, H]

    def _first_token_exact(self, x: torch.Tensor, mask: torch.Tensor | None,
                           packing: Packing | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`_first_token` computes, without folding: keys and values projected for every token, then
        ``self.attend`` of the first token's query. An A8 plan runs this: its projections round their input rows,
        which no fold into the query can reproduce bit for bit."""
        first = x.index_select(0, packing.cls) if packing is not None else x[:, 0]
        if self.qkv is not None:
            qkv = self._qkv(x)
            q = qkv.index_select(0, packing.cls)[:, 0] if packing is not None else qkv[:, 0, 0]
            kv = qkv[..., 1:, :, :]
        else:
            q, kv = self._heads(self.self.query(first), first.shape[:-1], 1)[:, 0], self._kv(x)  # q [B, heads, d]
        if packing is not None and self.native and packing.lens is not None:
            return first, a8native.packed_attention(q, kv, packing.cls, packing.lens, self.scale, first_only=True)
        if packing is not None:
            return first, packing.first_attention(q, kv, self.scale, self.attend)
        k, v = (t.transpose(1, 2) for t in kv.unbind(-3))  # [B, heads, S, d]
        ctx = self.attend(q[:, :, None, :], k, v, mask, self.scale)  # [B, heads, 1, d]
        return first, ctx.reshape(first.shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                first_only: bool = False) -> torch.Tensor:
        """``x`` [B, S, H] with ``mask``, or packed [T, H] with ``packing`` (then ``mask`` is unused). With
        ``first_only``, the output of each sequence's first token only, [B, H]: keys and values of every token,
        the query of the first."""
        if first_only:
            x, ctx = (self._first_token_exact if self.attend is not sdpa else self._first_token)(x, mask, packing)
        elif packing is not None and self.native and packing.lens is not None:
            qkv = self._qkv(x)
            ctx = a8native.packed_attention(qkv[:, 0], qkv[:, 1:], packing.cls, packing.lens, self.scale)
        elif packing is not None:
            ctx = packing.attention(self._qkv(x), self.scale, self.attend)
        else:
            # [B, S, heads, d] -> [B, heads, S, d] strided views (SDPA takes strided inputs)
            q, k, v = (t.transpose(1, 2) for t in self._qkv(x).unbind(-3))
            ctx = self.attend(q, k, v, mask, self.scale)
            ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.output.dense.forward_add_norm(ctx, x, self.output.LayerNorm)


class Intermediate(nn.Module):
    def __init__(self, c: SensiMixConfig, mixed: bool) -> None:
        super().__init__()
        # a mixed layer's intermediate returns sign(h) directly: its activation is skipped exactly
        self.dense = BinaryLinear(c.hidden_size, c.intermediate_size, sign_output=True) if mixed \
            else Index8Linear(c.hidden_size, c.intermediate_size)
        self.act = c.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dense, BinaryLinear):
            return self.dense(x)
        # a kernel may apply it in its GEMM epilogue, and hand it to Output's linear (same kernel) in its own form
        return self.dense.forward_act(x, self.act, operand=True)


class Output(nn.Module):
    def __init__(self, c: SensiMixConfig, mixed: bool) -> None:
        super().__init__()
        self.dense = BinaryLinear(c.intermediate_size, c.hidden_size) if mixed \
            else Index8Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dense, BinaryLinear):
            return self.LayerNorm(add_residual(self.dense(h), x))
        return self.dense.forward_add_norm(h, x, self.LayerNorm)


class Layer(nn.Module):
    def __init__(self, c: SensiMixConfig, n: int) -> None:
        super().__init__()
        mixed = n >= c.num_8bit_layers
        self.attention = Attention(c)
        self.intermediate = Intermediate(c, mixed)
        self.output = Output(c, mixed)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                first_only: bool = False) -> torch.Tensor:
        """The layer's output for every token, or with ``first_only`` for each sequence's first token, [B, H]."""
        x = self.attention(x, mask, packing, first_only)
        return self.output(self.intermediate(x), x)  # the FFN works token by token: any leading shape


class Encoder(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c, n) for n in range(c.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size)


class SensiMixModel(nn.Module):
    def __init__(self, c: SensiMixConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)
