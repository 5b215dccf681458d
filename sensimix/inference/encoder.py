"""The packed encoder's module tree. Attribute names are transformers' BERT names, so every buffer's state-dict
name is the checkpoint's tensor name (``bert.encoder.layer.0.attention.self.query.weight_q``, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SensiMixConfig
from .layers import BinaryLinear, Embedding, FusedIndex8Linear, Index8Embedding, Index8Linear, LayerNorm, Linear
from .packing import Packing
from .plan import InferencePlan


def _residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x`` in x's dtype, into ``out`` (a linear's fresh output: no new [tokens, H] tensor) unless autograd
    needs it; a bf16 kernel output is cast first, in one pass (torch's mixed-dtype add promotes elementwise and
    measured ~1.8x slower)."""
    if out.dtype != x.dtype:
        return out.to(x.dtype).add_(x)
    if torch.is_grad_enabled() and (out.requires_grad or x.requires_grad):
        return out + x
    return out.add_(x)


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
        # BERT's order: (word + token type) + position, then LayerNorm
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


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
        self.qkv: FusedIndex8Linear | None = None

    def prepare(self, plan: InferencePlan) -> None:
        parts = [self.self.query, self.self.key, self.self.value]
        if plan.fuse_qkv:  # Q, K and V read the same x: one GEMM (one activation cast/quantization)
            self.qkv = FusedIndex8Linear(parts, plan)
            for part in parts:
                part.kernel, part.fused_into = self.qkv.kernel, "qkv"
        else:
            self.qkv = None
            for part in parts:
                part.prepare(plan)
        self.output.dense.prepare(plan)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None,
                first_only: bool = False) -> torch.Tensor:
        """``x`` [B, S, H] with ``mask``, or packed [T, H] with ``packing`` (then ``mask`` is unused). With
        ``first_only``, the output of each sequence's first token only, [B, H]: keys and values of every token,
        the query of the first."""
        lead, hidden = x.shape[:-1], x.shape[-1]
        if self.qkv is not None:
            qkv = self.qkv(x).view(*lead, 3, self.num_heads, -1)  # [..., 3, heads, d]
            parts = qkv.unbind(-3)
        else:
            s = self.self
            parts = [t(x).view(*lead, self.num_heads, -1) for t in (s.query, s.key, s.value)]
            qkv = None
        if packing is not None:
            ctx = packing.attention(qkv if qkv is not None else torch.stack(parts, dim=1), self.scale, first_only)
            if first_only:
                x = x.index_select(0, packing.cls)
        else:
            # [B, S, heads, d] -> [B, heads, S, d] strided views (SDPA takes strided inputs)
            q, k, v = (t.transpose(1, 2) for t in parts)
            if first_only:
                q, x, lead = q[:, :, :1], x[:, 0], lead[:1]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            ctx = ctx.transpose(1, 2).reshape(*lead, hidden)
        return self.output.LayerNorm(_residual(self.output.dense(ctx), x))


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
        return self.dense.forward_act(x, self.act)  # a kernel may apply it in its GEMM epilogue


class Output(nn.Module):
    def __init__(self, c: SensiMixConfig, mixed: bool) -> None:
        super().__init__()
        self.dense = BinaryLinear(c.intermediate_size, c.hidden_size) if mixed \
            else Index8Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(_residual(self.dense(h), x))


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
