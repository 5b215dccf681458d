"""SensiMix inference runtime: load a packed checkpoint ("packed-v1", see :mod:`sensimix.export`) and run it.

Weights stay packed: word/position embeddings as int8 rows (gathered, then only those rows dequantized),
8-bit linears as int8 indices + fp16 range (or dequantized once, by the CPU ``dense`` kernel), 1-bit FFN weights
as sign bits unpacked once to the kernel's ±1 operand. Every runtime module's ``forward`` is a kernel call
(:mod:`sensimix.kernels`); the encoder is a compact BERT written here, so no fp32 copy of the model is built.

It computes what the quantization-aware model computes in eval mode with every 1-bit FFN binarized
(``qat.set_binarized_layers(qat.config.mixed_layers); qat.eval()``): same embeddings, SDPA attention, 8-bit
linears, and 1-bit FFNs whose GELU is skipped exactly (sign(0) = -1 and GELU(z) > 0 iff z > 0, so the
intermediate returns sign(h) directly). In fp32 on CPU the logits equal the QAT model's bit for bit in the unit
tests (asserted to 1e-5), with every exact kernel; the checkpoint holds biases, LayerNorms, pooler and classifier
in fp16, so compare with a QAT model rounded likewise (``qat.half().float()`` before export).

``dtype="fast"`` (``sensimix evaluate --precision fast``) trades that exactness for speed on CPU: bf16 GEMMs for
the 8-bit linears (Q/K/V fused; bias and GELU in oneDNN's epilogue), SDPA in bf16, the 1-bit FFNs still exact,
the residual stream and LayerNorms in fp32, and padded tokens skipped (:class:`Packing`, exact by itself). See
:meth:`SensiMixForSequenceClassification.from_pretrained` for the recipe and its fallbacks.

``model(input_ids, attention_mask=None, token_type_ids=None)`` returns the logits tensor [batch, num_labels].
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import SensiMixConfig
from .export import FORMAT, WEIGHTS_BIN, WEIGHTS_SAFETENSORS
from .io import read_config_json

log = logging.getLogger(__name__)

# activations f with f(z) > 0 iff z > 0: sign(f(z)) == sign(z), so a mixed layer may skip f exactly
SIGN_PRESERVING_ACTS = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_python", "gelu_pytorch_tanh", "quick_gelu",
                                  "relu", "silu", "swish", "tanh"})
_CONFIG_ONLY_KEYS = ("sensimix_format", "sign_of_zero", "bit_order", "architectures", "model_type",
                     "transformers_version")


class CheckpointError(ValueError):
    """A SensiMix checkpoint that cannot be loaded; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------------
# reading and checking a packed checkpoint
# ---------------------------------------------------------------------------------------------------
def read_config(folder: str | os.PathLike) -> SensiMixConfig:
    """The :class:`SensiMixConfig` of a packed checkpoint folder, after checking it is one."""
    folder = Path(folder)
    path = folder / "config.json"
    raw = read_config_json(folder, error=CheckpointError, expected=f"a SensiMix checkpoint folder "
                           f"(config.json + {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN})")
    fmt = raw.get("sensimix_format")
    if fmt is None:
        raise CheckpointError(
            f"{path} has no 'sensimix_format': {folder} is not a SensiMix packed checkpoint (a plain BERT folder? "
            f"load it with transformers, or use `sensimix evaluate`, which accepts both). "
            f"Write a packed checkpoint with sensimix.export.export_checkpoint / `sensimix compress`")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: sensimix_format {fmt!r} is not supported; this runtime reads {FORMAT!r}")
    for key, want in (("sign_of_zero", -1), ("bit_order", "little")):
        if raw.get(key, want) != want:
            raise CheckpointError(f"{path}: {key} = {raw[key]!r}, but {FORMAT} requires {want!r}")
    try:
        config = SensiMixConfig.from_dict({k: v for k, v in raw.items() if k not in _CONFIG_ONLY_KEYS})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {config.position_embedding_type!r} is not "
                              f"supported; the runtime implements absolute position embeddings")
    if config.num_mixed_layers and config.hidden_act not in SIGN_PRESERVING_ACTS:
        raise CheckpointError(f"{path}: hidden_act {config.hidden_act!r} is not known to keep the sign, so the 1-bit "
                              f"FFN cannot skip it; supported: {sorted(SIGN_PRESERVING_ACTS)}")
    if config.num_labels < 2:
        raise CheckpointError(f"{path}: num_labels must be >= 2 (classification), got {config.num_labels}")
    return config


def read_packed_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The packed tensors (on CPU) and the file they came from: model.safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    st, pt = folder / WEIGHTS_SAFETENSORS, folder / WEIGHTS_BIN
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st
        except Exception as exc:  # SafetensorError, OSError: all mean "cannot read this file"
            raise CheckpointError(
                f"{st}: cannot read the safetensors file ({exc}); it is truncated or corrupt. Re-export the "
                f"checkpoint (or delete it to fall back to {WEIGHTS_BIN})") from exc
    if pt.is_file():
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError: truncated, corrupt or not weights-only
            raise CheckpointError(f"{pt}: cannot load it with torch.load(weights_only=True) ({type(exc).__name__}: "
                                  f"{exc}); it is truncated, corrupt or holds more than tensors. Re-export it") from exc
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise CheckpointError(f"{pt} does not hold a state dict of named tensors")
        return tensors, pt
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_BIN}")


def expected_tensors(config: SensiMixConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor a packed-v1 checkpoint of ``config`` holds."""
    h, i = config.hidden_size, config.intermediate_size
    spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def index8(name: str, shape: tuple[int, int]) -> None:
        spec[f"{name}.weight_q"] = (torch.int8, shape)
        spec[f"{name}.weight_range"] = (torch.float16, (2,))

    def dense(name: str, shape: tuple[int, ...], bias: bool = True) -> None:
        spec[f"{name}.weight"] = (torch.float16, shape)
        if bias:
            spec[f"{name}.bias"] = (torch.float16, shape[:1])

    def linear(name: str, out_f: int, in_f: int, bits: bool) -> None:
        if bits:
            spec[f"{name}.weight_bits"] = (torch.uint8, (out_f, math.ceil(in_f / 8)))
        else:
            index8(name, (out_f, in_f))
        spec[f"{name}.bias"] = (torch.float16, (out_f,))

    emb = "bert.embeddings"
    index8(f"{emb}.word_embeddings", (config.vocab_size, h))
    index8(f"{emb}.position_embeddings", (config.max_position_embeddings, h))
    spec[f"{emb}.token_type_embeddings.weight"] = (torch.float16, (config.type_vocab_size, h))
    dense(f"{emb}.LayerNorm", (h,))
    for n in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{n}"
        mixed = n >= config.num_8bit_layers
        for attr in ("query", "key", "value"):
            linear(f"{p}.attention.self.{attr}", h, h, bits=False)
        linear(f"{p}.attention.output.dense", h, h, bits=False)
        dense(f"{p}.attention.output.LayerNorm", (h,))
        linear(f"{p}.intermediate.dense", i, h, bits=mixed)
        linear(f"{p}.output.dense", h, i, bits=mixed)
        dense(f"{p}.output.LayerNorm", (h,))
    dense("bert.pooler.dense", (h, h))
    dense("classifier", (config.num_labels, h))
    return spec


def check_tensors(tensors: dict[str, torch.Tensor], config: SensiMixConfig, source: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the tensor if ``tensors`` do not match ``config`` exactly."""
    spec = expected_tensors(config)
    geometry = (f"config.json: {config.describe()}, hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}")

    def listing(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    missing = sorted(set(spec) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {listing(missing)}; the file is incomplete or does not "
                              f"match {geometry}")
    unexpected = sorted(set(tensors) - set(spec))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {listing(unexpected)}; the file does not match "
                              f"{geometry}")
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise CheckpointError(f"{source}: {name} has dtype {t.dtype}, expected {dtype} ({FORMAT})")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {list(t.shape)}, expected {list(shape)} from {geometry}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: {name} contains NaN or inf")
        if name.endswith(".weight_range") and not t[0] <= t[1]:
            raise CheckpointError(f"{source}: {name} = [lo, hi] = {t.tolist()} needs lo <= hi")


# ---------------------------------------------------------------------------------------------------
# runtime modules: buffers only, forward = a kernel call
# ---------------------------------------------------------------------------------------------------
class Index8Embedding(nn.Module):
    """An int8-index embedding table; rows are gathered as int8, then dequantized."""

    def __init__(self, q: torch.Tensor, weight_range: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_range", weight_range)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.index8_embedding(ids, self.weight_q, self.weight_range, self.dtype)


class Index8Linear(nn.Module):
    """An 8-bit index linear held in the form its kernel computes with.

    ``parts`` is one (int8 Q, fp16 range, bias) triple, or several that read the same input (Q, K, V) and run as
    one GEMM whose outputs are concatenated in order (kernels with ``fusable = True``).
    """

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], kernel: kernels.Index8Kernel,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = parts[0][0].shape[1]
        self.out_features = sum(q.shape[0] for q, _, _ in parts)
        self.kernel, self.fused = kernel, len(parts)
        if len(parts) == 1:
            weight, params, bias = kernel.prepare_linear(*parts[0], dtype)
        else:
            weight, params, bias = kernel.prepare_fused(parts, dtype)
        if isinstance(weight, torch.Tensor):
            self.register_buffer("weight", weight)
        else:  # an opaque prepacked operand (fbgemm): not a tensor, so not a buffer; CPU-only, never moved
            self.weight = weight
        self.register_buffer("params", params)
        self.register_buffer("bias", bias)  # None when the kernel folded it into the weight operand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.weight, self.params, self.bias)

    def opaque_bytes(self) -> int:
        """Bytes of a weight operand that is not a buffer (0 for tensor operands, counted as buffers)."""
        return self.kernel.weight_bytes(self.weight)

    def extra_repr(self) -> str:
        fused = f", fused={self.fused}" if self.fused > 1 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel.name}{fused}"


class BinaryLinear(nn.Module):
    """A 1-bit linear ``sign(x) @ sign(W)^T + b`` (x: float activations or the kernel's ±1 operand)."""

    def __init__(self, bits: torch.Tensor, in_features: int, bias: torch.Tensor, kernel: kernels.BinaryKernel,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, bits.shape[0]
        self.kernel, self.dtype = kernel, dtype
        self.register_buffer("weight", kernel.prepare_weight(bits, in_features))
        self.register_buffer("bias", bias.float())  # fp32: the exact integer + bias rounds once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.weight, self.bias, self.in_features, self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel.name}"


class BinarySignLinear(BinaryLinear):
    """The 1-bit FFN intermediate: returns the ±1 operand of ``sign(sign(x) @ sign(W)^T + b)`` (GELU skipped)."""

    def __init__(self, bits, in_features, bias, kernel, dtype) -> None:
        super().__init__(bits, in_features, bias, kernel, dtype)
        self.register_buffer("sign_bias", kernel.prepare_sign_bias(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear_sign(x, self.weight, self.sign_bias, self.in_features)


class Dense(nn.Module):
    """A floating-point linear (pooler, classifier)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", bias.to(dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------------
class _Builder:
    """Takes tensors by checkpoint name, moves them to the device, and builds runtime modules from them."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: SensiMixConfig, device: torch.device,
                 dtype: torch.dtype, binary: kernels.BinaryKernel, index8: kernels.Index8Kernel,
                 fuse_qkv: bool) -> None:
        self.tensors, self.config, self.device, self.dtype = tensors, config, device, dtype
        self.binary, self.index8, self.fuse_qkv = binary, index8, fuse_qkv

    def t(self, name: str) -> torch.Tensor:
        return self.tensors.pop(name).to(self.device)  # pop: the CPU copy is freed as we go

    def embedding(self, name: str) -> Index8Embedding:
        return Index8Embedding(self.t(f"{name}.weight_q"), self.t(f"{name}.weight_range"), self.dtype)

    def linear8(self, *names: str) -> Index8Linear:
        """One 8-bit linear, or several reading the same input fused into one GEMM."""
        parts = [(self.t(f"{n}.weight_q"), self.t(f"{n}.weight_range"), self.t(f"{n}.bias")) for n in names]
        return Index8Linear(parts, self.index8, self.dtype)

    def linear1(self, name: str, in_features: int, sign_output: bool) -> BinaryLinear:
        cls = BinarySignLinear if sign_output else BinaryLinear
        return cls(self.t(f"{name}.weight_bits"), in_features, self.t(f"{name}.bias"), self.binary, self.dtype)

    def dense(self, name: str) -> Dense:
        return Dense(self.t(f"{name}.weight"), self.t(f"{name}.bias"), self.dtype)

    def layer_norm(self, name: str) -> LayerNorm:
        return LayerNorm(self.t(f"{name}.weight"), self.t(f"{name}.bias"), self.config.layer_norm_eps, self.dtype)


class Embeddings(nn.Module):
    def __init__(self, b: _Builder) -> None:
        super().__init__()
        p = "bert.embeddings"
        self.word = b.embedding(f"{p}.word_embeddings")
        self.position = b.embedding(f"{p}.position_embeddings")
        self.register_buffer("token_type", b.t(f"{p}.token_type_embeddings.weight").to(b.dtype))
        self.norm = b.layer_norm(f"{p}.LayerNorm")

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids (positions 0..S-1), or packed [T] ids with their ``positions`` (:class:`Packing`)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_type = self.token_type[0] if token_type_ids is None else F.embedding(token_type_ids, self.token_type)
        # BERT's order: (word + token type) + position, then LayerNorm
        return self.norm(self.word(input_ids) + token_type + self.position(positions))


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


@dataclass(frozen=True, eq=False)
class Packing:
    """The attended tokens of a padded batch, packed: what ``skip_padding`` runs the layers on.

    Every op but attention works token by token, and BERT's attention mask removes padded positions as keys,
    so a padded position never influences an attended one: dropping padded tokens before the first layer leaves
    the logits unchanged (up to the floating-point summation order of GEMMs with fewer rows) and saves their
    work. For attention, sequences are grouped by span (last attended position + 1, rounded up to a multiple
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

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing | None:
        """The packing of a [B, S] mask, or None when packing does not apply: no padding to drop, or a sequence
        whose first token is masked (there is no attended [CLS] to pool; the padded path handles it as before)."""
        m = attention_mask.bool()
        if m.all() or not m[:, 0].all():
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
                                     slots=slots, mask=mg[:, None, None, :]))
            start += len(slots)
            first = last
        flat_index = torch.cat(index)
        where = torch.empty(bsz * seq, dtype=torch.long, device=m.device)
        where[flat_index] = torch.arange(len(flat_index), device=m.device)
        return cls(index=flat_index, positions=flat_index % seq,
                   cls=where[torch.arange(bsz, device=m.device) * seq], groups=tuple(groups))

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The attended entries of a [B, S] input (ids, token types), packed: [T]."""
        return t.reshape(-1).index_select(0, self.index)

    def attention(self, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        """SDPA of packed [T, 3, heads, d] Q/K/V, one call per span group; returns packed [T, heads * d]."""
        tokens, heads = qkv.shape[0], qkv.shape[2]
        flat = qkv.reshape(tokens, -1)
        out = flat.new_empty(tokens, flat.shape[1] // 3)
        for g in self.groups:
            layout = flat.index_select(0, g.gather).view(g.rows, g.span, 3, heads, -1)
            q, k, v = (t.transpose(1, 2) for t in layout.unbind(2))
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scale)
            # [rows, heads, span, d] -> [rows * span, heads * d]: a view when SDPA's output is stored
            # [rows, span, heads, d] (the CPU kernels do), so the gather below is the only pass
            ctx = ctx.transpose(1, 2).reshape(g.rows * g.span, -1)
            torch.index_select(ctx, 0, g.slots, out=out[g.start:g.start + g.count])
        return out


class SelfAttention(nn.Module):
    def __init__(self, b: _Builder, p: str) -> None:
        super().__init__()
        names = [f"{p}.attention.self.{attr}" for attr in ("query", "key", "value")]
        # Q, K and V read the same x: one GEMM (one activation cast/quantization) when the builder fuses them
        self.qkv = b.linear8(*names) if b.fuse_qkv else None
        if self.qkv is None:
            self.query, self.key, self.value = (b.linear8(n) for n in names)
        self.output = b.linear8(f"{p}.attention.output.dense")
        self.norm = b.layer_norm(f"{p}.attention.output.LayerNorm")
        self.num_heads = b.config.num_attention_heads
        self.scale = (b.config.hidden_size // self.num_heads) ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        """``x`` [B, S, H] with ``mask``, or packed [T, H] with ``packing`` (then ``mask`` is unused)."""
        lead, hidden = x.shape[:-1], x.shape[-1]
        if self.qkv is not None:
            qkv = self.qkv(x).view(*lead, 3, self.num_heads, -1)  # [..., 3, heads, d]
            parts = qkv.unbind(-3)
        else:
            parts = [t(x).view(*lead, self.num_heads, -1) for t in (self.query, self.key, self.value)]
            qkv = None
        if packing is not None:
            ctx = packing.attention(qkv if qkv is not None else torch.stack(parts, dim=1), self.scale)
        else:
            # [B, S, heads, d] -> [B, heads, S, d] strided views (SDPA takes strided inputs)
            q, k, v = (t.transpose(1, 2) for t in parts)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            ctx = ctx.transpose(1, 2).reshape(*lead, hidden)
        return self.norm(_residual(self.output(ctx), x))


class FeedForward8(nn.Module):
    """The FFN of an 8-bit layer: 8-bit linear, activation, 8-bit linear."""

    def __init__(self, b: _Builder, p: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.intermediate = b.linear8(f"{p}.intermediate.dense")
        self.output = b.linear8(f"{p}.output.dense")
        self.norm = b.layer_norm(f"{p}.output.LayerNorm")
        self.act = ACT2FN[b.config.hidden_act]
        # a kernel that applies the activation in its GEMM epilogue saves two passes over [tokens, intermediate]
        fuses = getattr(b.index8, "fuses_activation", None)
        self.fused_act = b.config.hidden_act if fuses is not None and fuses(b.config.hidden_act, b.device) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_act is not None:
            lin = self.intermediate
            h = lin.kernel.linear_act(x, lin.weight, lin.params, lin.bias, self.fused_act)
        else:
            h = self.act(self.intermediate(x))
        return self.norm(_residual(self.output(h), x))


def _residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x`` in x's dtype (the model dtype): a bf16 kernel output is cast first, in one vectorized pass,
    then added in place; torch's mixed-dtype add promotes elementwise and measured ~1.8x slower."""
    if out.dtype == x.dtype:
        return out + x
    return out.to(x.dtype).add_(x)


class FeedForward1(nn.Module):
    """The FFN of a mixed layer: 1-bit linear straight to sign(h) (activation skipped exactly), 1-bit linear."""

    def __init__(self, b: _Builder, p: str) -> None:
        super().__init__()
        self.intermediate = b.linear1(f"{p}.intermediate.dense", b.config.hidden_size, sign_output=True)
        self.output = b.linear1(f"{p}.output.dense", b.config.intermediate_size, sign_output=False)
        self.norm = b.layer_norm(f"{p}.output.LayerNorm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.output(self.intermediate(x)) + x)


class Layer(nn.Module):
    def __init__(self, b: _Builder, n: int) -> None:
        super().__init__()
        p = f"bert.encoder.layer.{n}"
        self.attention = SelfAttention(b, p)
        self.ffn = FeedForward1(b, p) if n >= b.config.num_8bit_layers else FeedForward8(b, p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        return self.ffn(self.attention(x, mask, packing))  # the FFN works token by token: any leading shape


FAST = "fast"
# 8-bit kernels of precision "fast" on CPU, best first (see fast_index8_kernel; scripts/benchmark.py measures them)
FAST_CPU_INDEX8 = ("bf16", "fbgemm")


def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 GEMMs run natively (elsewhere oneDNN emulates them, slower than fp32)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # private torch API: treat an error as "unknown", i.e. not native
        return False


def fast_index8_kernel(device: torch.device | str) -> str:
    """The 8-bit kernel of ``dtype="fast"``: the device default on CUDA; on CPU the first usable of
    :data:`FAST_CPU_INDEX8`, skipping ``bf16`` without native bf16 GEMMs and ``fbgemm`` without its engine
    (each skip is logged with its reason); the exact ``dense`` kernel when neither is usable."""
    device = torch.device(device)
    if device.type == "cuda":
        return kernels.default_index8_kernel(device)
    for name in FAST_CPU_INDEX8:
        if name == "bf16" and not _cpu_has_bf16():
            log.info("fast precision: skipping the bf16 8-bit kernel (this CPU has no native bf16 GEMM)")
            continue
        reason = kernels.INDEX8_KERNELS[name].unavailable(device)
        if reason is None:
            return name
        log.warning("fast precision: 8-bit kernel %r unavailable (%s); trying the next choice", name, reason)
    log.warning("fast precision: no approximate 8-bit kernel usable on this CPU; using the exact 'dense' kernel")
    return "dense"


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype == FAST:  # the fast recipe keeps the residual stream, LayerNorms and 1-bit outputs in fp32 on CPU
            return torch.float16 if device.type == "cuda" else torch.float32
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose fp32, fp16, bf16 or fast")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (or 'fast'), got {dtype}")
    return dtype


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available "
                             f"(torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return device


class SensiMixForSequenceClassification(nn.Module):
    """Packed SensiMix (a+b) BERT classifier for inference. Build it with :meth:`from_pretrained`.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns the logits [batch, num_labels] in
    the model dtype. Inputs are checked first (shapes, sequence length vs max_position_embeddings, token id
    ranges) so bad input raises a ``ValueError`` instead of failing inside a kernel; on CUDA the id range check
    costs one host sync per call (set ``check_inputs = False`` to skip it for inputs known to be valid).
    """

    def __init__(self, config: SensiMixConfig, tensors: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, binary: kernels.BinaryKernel, index8: kernels.Index8Kernel,
                 check_inputs: bool = True, fuse_qkv: bool = False, skip_padding: bool = False) -> None:
        super().__init__()
        self.config, self.dtype, self.check_inputs = config, dtype, check_inputs
        self.skip_padding = skip_padding  # a plain attribute: may be switched after loading (see Packing)
        self.binary_kernel, self.index8_kernel = binary.name, index8.name
        # exact: computes what the QAT model computes (to 1e-5 in the tests); only fp32 with exact kernels is
        self.exact = binary.exact and index8.exact and dtype == torch.float32
        # "fp32" / "fp16" / "bf16" (the activation dtype), or "fast" (set by from_pretrained for that recipe)
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        b = _Builder(dict(tensors), config, device, dtype, binary, index8, fuse_qkv)
        self.embeddings = Embeddings(b)
        self.layers = nn.ModuleList(Layer(b, n) for n in range(config.num_hidden_layers))
        self.pooler = b.dense("bert.pooler.dense")
        self.classifier = b.dense("classifier")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        binary_kernel: str | None = None,
        index8_kernel: str | None = None,
        check_inputs: bool = True,
        fuse_qkv: bool | None = None,
        skip_padding: bool | None = None,
    ) -> SensiMixForSequenceClassification:
        """Load a packed checkpoint folder (model.safetensors preferred, else pytorch_model.bin).

        Args:
            path: folder written by :func:`sensimix.export.export_checkpoint`.
            device: ``cpu`` or ``cuda[:i]``; the weights are prepared for this device's kernels.
            dtype: activation dtype; default fp32 on CPU (exact vs the QAT model), fp16 on CUDA (the paper's
                inference precision). ``"fast"`` selects the fastest measured recipe (APPROXIMATE): on CPU the
                residual stream, embeddings, LayerNorms, pooler and classifier stay fp32, the 8-bit linears run
                :func:`fast_index8_kernel` (bf16 GEMMs on AVX512-BF16/AMX CPUs, else fbgemm dynamic int8) with
                Q, K and V fused into one GEMM and SDPA in that kernel's output dtype, and the 1-bit FFNs stay
                exact (int8 ±1 GEMM, int32 sums, fp32 bias); on CUDA it is fp16 with the default kernels.
                bf16 is all-bf16 activations (its 1-bit FFN outputs are rounded to bf16 too).
            binary_kernel: 1-bit kernel name (:data:`sensimix.kernels.BINARY_KERNELS`); None = device default.
                All 1-bit kernels are exact.
            index8_kernel: 8-bit kernel name (:data:`sensimix.kernels.INDEX8_KERNELS`); None = device default
                (exact), or the fast recipe's with ``dtype="fast"``. ``int8``, ``fbgemm`` and ``bf16`` round
                activations: approximate, opt-in only.
            check_inputs: validate inputs in every forward (see the class docstring).
            fuse_qkv: run Q, K, V as one GEMM; None = when the 8-bit kernel can and is approximate anyway (the
                exact path keeps the QAT model's three GEMMs).
            skip_padding: run the layers on the attended tokens only (:class:`Packing`); the logits do not
                depend on padded positions, so this changes only the work done (and the GEMMs' summation order).
                None = on for ``dtype="fast"``, off otherwise (the exact path stays the QAT model's computation).
                Its gain is the batch's padding fraction: report timings with and without it.
        """
        folder = Path(path)
        config = read_config(folder)
        tensors, source = read_packed_weights(folder)
        check_tensors(tensors, config, source)
        device = _resolve_device(device)
        fast = isinstance(dtype, str) and dtype == FAST
        dtype = _resolve_dtype(dtype, device)
        if fast and index8_kernel in (None, "auto"):
            index8_kernel = fast_index8_kernel(device)
        binary = kernels.binary_kernel(binary_kernel, device)
        index8 = kernels.index8_kernel(index8_kernel, device)
        if fuse_qkv is None:
            fuse_qkv = index8.fusable and not index8.exact
        elif fuse_qkv and not index8.fusable:
            raise ValueError(f"fuse_qkv=True, but the index8 kernel {index8.name!r} cannot fuse linears; use one of "
                             f"{', '.join(n for n, k in kernels.INDEX8_KERNELS.items() if k.fusable)}")
        model = cls(config, tensors, device, dtype, binary, index8, check_inputs=check_inputs,
                    fuse_qkv=fuse_qkv, skip_padding=fast if skip_padding is None else skip_padding).eval()
        if fast:
            model.precision = FAST
        log.info("loaded %s from %s on %s (precision %s, %s; 1-bit kernel %s, 8-bit kernel %s%s%s)",
                 config.describe(), source.name, device, model.precision, "exact" if model.exact else "approximate",
                 binary.name, index8.name, ", Q/K/V fused" if fuse_qkv else "",
                 ", padding skipped" if model.skip_padding else "")
        return model

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.check_inputs:
            self._check_inputs(input_ids, attention_mask, token_type_ids)
        packing = Packing.of(attention_mask) if self.skip_padding and attention_mask is not None else None
        if packing is not None:
            types = None if token_type_ids is None else packing.tokens(token_type_ids)
            x = self.embeddings(packing.tokens(input_ids), types, positions=packing.positions)
            for layer in self.layers:
                x = layer(x, None, packing)
            cls = x.index_select(0, packing.cls)
        else:
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
            x = self.embeddings(input_ids, token_type_ids)
            for layer in self.layers:
                x = layer(x, mask)
            cls = x[:, 0]
        return self.classifier(torch.tanh(self.pooler(cls)))

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        seq = input_ids.shape[1]
        if not 0 < seq <= cfg.max_position_embeddings:
            limit = cfg.max_position_embeddings
            raise ValueError(f"sequence length {seq} is outside [1, max_position_embeddings={limit}] of this model: "
                             f"truncate the inputs (e.g. --max-seq-length {limit})")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(input_ids.shape)} like input_ids")
        for name, t, limit, field in (("input_ids", input_ids, cfg.vocab_size, "vocab_size"),
                                      ("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")):
            if t is None or t.numel() == 0:
                continue
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < 0 or hi >= limit:
                raise ValueError(f"{name} must lie in [0, {limit}) ({field} of this model), got values in "
                                 f"[{lo}, {hi}]; were the inputs made with this model's tokenizer?")

    # -- introspection -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def weight_bytes(self) -> int:
        """Bytes held by the model's weights: its buffers plus prepacked operands that are not tensors."""
        opaque = sum(m.opaque_bytes() for m in self.modules() if isinstance(m, Index8Linear))
        return sum(t.numel() * t.element_size() for t in self.buffers()) + opaque

    def extra_repr(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.config.describe()}, precision={self.precision}, dtype={dtype}, "
                f"binary_kernel={self.binary_kernel}, index8_kernel={self.index8_kernel}, "
                f"skip_padding={self.skip_padding}")


class BertLogits(nn.Module):
    """A Hugging Face sequence classifier seen through the runtime's interface: ``forward`` returns the logits.

    Lets a plain BERT baseline and a packed SensiMix model be timed and scored by the same code.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        limit = self.model.config.max_position_embeddings
        if input_ids.dim() != 2 or not 0 < input_ids.shape[1] <= limit:
            raise ValueError(f"input_ids must be [batch, seq_len] with 1 <= seq_len <= "
                             f"max_position_embeddings={limit}, got shape {list(input_ids.shape)}: truncate the "
                             f"inputs (e.g. --max-seq-length {limit})")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
