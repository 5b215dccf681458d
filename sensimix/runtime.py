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

``model(input_ids, attention_mask=None, token_type_ids=None)`` returns the logits tensor [batch, num_labels].
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import SensiMixConfig
from .export import FORMAT, WEIGHTS_BIN, WEIGHTS_SAFETENSORS

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
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected a SensiMix checkpoint folder "
                                f"(config.json + {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN})")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
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
    """An 8-bit index linear held in the form its kernel computes with."""

    def __init__(self, q: torch.Tensor, weight_range: torch.Tensor, bias: torch.Tensor, kernel: kernels.Index8Kernel,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = kernel
        weight, params = kernel.prepare(q, weight_range, dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("params", params)
        self.register_buffer("bias", bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.weight, self.params, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel.name}"


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
                 dtype: torch.dtype, binary: kernels.BinaryKernel, index8: kernels.Index8Kernel) -> None:
        self.tensors, self.config, self.device, self.dtype = tensors, config, device, dtype
        self.binary, self.index8 = binary, index8

    def t(self, name: str) -> torch.Tensor:
        return self.tensors.pop(name).to(self.device)  # pop: the CPU copy is freed as we go

    def embedding(self, name: str) -> Index8Embedding:
        return Index8Embedding(self.t(f"{name}.weight_q"), self.t(f"{name}.weight_range"), self.dtype)

    def linear8(self, name: str) -> Index8Linear:
        return Index8Linear(self.t(f"{name}.weight_q"), self.t(f"{name}.weight_range"), self.t(f"{name}.bias"),
                            self.index8, self.dtype)

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

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_type = self.token_type[0] if token_type_ids is None else F.embedding(token_type_ids, self.token_type)
        # BERT's order: (word + token type) + position, then LayerNorm
        return self.norm(self.word(input_ids) + token_type + self.position(positions))


class SelfAttention(nn.Module):
    def __init__(self, b: _Builder, p: str) -> None:
        super().__init__()
        self.query = b.linear8(f"{p}.attention.self.query")
        self.key = b.linear8(f"{p}.attention.self.key")
        self.value = b.linear8(f"{p}.attention.self.value")
        self.output = b.linear8(f"{p}.attention.output.dense")
        self.norm = b.layer_norm(f"{p}.attention.output.LayerNorm")
        self.num_heads = b.config.num_attention_heads
        self.scale = (b.config.hidden_size // self.num_heads) ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seq, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, seq, self.num_heads, -1).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                             attn_mask=mask, scale=self.scale)
        return self.norm(self.output(ctx.transpose(1, 2).reshape(bsz, seq, hidden)) + x)


class FeedForward8(nn.Module):
    """The FFN of an 8-bit layer: 8-bit linear, activation, 8-bit linear."""

    def __init__(self, b: _Builder, p: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.intermediate = b.linear8(f"{p}.intermediate.dense")
        self.output = b.linear8(f"{p}.output.dense")
        self.norm = b.layer_norm(f"{p}.output.LayerNorm")
        self.act = ACT2FN[b.config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.output(self.act(self.intermediate(x))) + x)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.ffn(self.attention(x, mask))


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
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
                 check_inputs: bool = True) -> None:
        super().__init__()
        self.config, self.dtype, self.check_inputs = config, dtype, check_inputs
        self.binary_kernel, self.index8_kernel = binary.name, index8.name
        b = _Builder(dict(tensors), config, device, dtype, binary, index8)
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
    ) -> SensiMixForSequenceClassification:
        """Load a packed checkpoint folder (model.safetensors preferred, else pytorch_model.bin).

        Args:
            path: folder written by :func:`sensimix.export.export_checkpoint`.
            device: ``cpu`` or ``cuda[:i]``; the weights are prepared for this device's kernels.
            dtype: activation dtype; default fp32 on CPU (exact vs the QAT model), fp16 on CUDA (the paper's
                inference precision). bf16 on CPU is the fast approximate choice (AVX512-BF16 GEMMs).
            binary_kernel: 1-bit kernel name (:data:`sensimix.kernels.BINARY_KERNELS`); None = device default.
                All 1-bit kernels are exact.
            index8_kernel: 8-bit kernel name (:data:`sensimix.kernels.INDEX8_KERNELS`); None = device default
                (exact). ``int8`` quantizes activations: approximate, opt-in only.
            check_inputs: validate inputs in every forward (see the class docstring).
        """
        folder = Path(path)
        config = read_config(folder)
        tensors, source = read_packed_weights(folder)
        check_tensors(tensors, config, source)
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device)
        binary = kernels.binary_kernel(binary_kernel, device)
        index8 = kernels.index8_kernel(index8_kernel, device)
        model = cls(config, tensors, device, dtype, binary, index8, check_inputs=check_inputs).eval()
        log.info("loaded %s from %s on %s (%s; 1-bit kernel %s, 8-bit kernel %s)", config.describe(), source.name,
                 device, str(dtype).removeprefix("torch."), binary.name, index8.name)
        return model

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.check_inputs:
            self._check_inputs(input_ids, attention_mask, token_type_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))

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
        """Bytes held by the model's tensors (all weights are buffers)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"{self.config.describe()}, dtype={str(self.dtype).removeprefix('torch.')}, "
                f"binary_kernel={self.binary_kernel}, index8_kernel={self.index8_kernel}")


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
