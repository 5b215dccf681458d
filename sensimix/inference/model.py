"""The packed SensiMix classifier: a transformers ``PreTrainedModel`` whose buffers are the packed-v1 tensors.

``SensiMixForSequenceClassification.from_pretrained(folder)`` reads ``config.json``, builds the module tree on
the meta device, checks the weight file against it (names, dtypes, shapes, finiteness, checksum), loads it with a
strict ``load_state_dict(assign=True)`` and prepares the kernels of an :class:`InferencePlan`. After
``import sensimix`` the Auto classes and ``pipeline("text-classification", model=folder)`` load it too.

It computes what the quantization-aware model computes in eval mode with every 1-bit FFN binarized: same
embeddings, SDPA attention, 8-bit linears, and 1-bit FFNs whose GELU is skipped exactly. ``forward`` returns a
``SequenceClassifierOutput`` (``.logits`` [batch, num_labels]); inputs are checked first, so bad input raises a
``ValueError`` naming the problem instead of failing inside a kernel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .. import checkpoint
from ..config import SensiMixConfig
from .layers import (
    BinaryLinear,
    Embedding,
    FusedIndex8Linear,
    Index8Embedding,
    Index8Linear,
    LayerNorm,
    Linear,
    PackedModule,
)
from .packing import Packing
from .plan import InferencePlan, make_plan

log = logging.getLogger(__name__)


def _residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out + x`` in x's dtype: a bf16 kernel output is cast first, in one pass, then added in place (torch's
    mixed-dtype add promotes elementwise and measured ~1.8x slower)."""
    if out.dtype == x.dtype:
        return out + x
    return out.to(x.dtype).add_(x)


# ---------------------------------------------------------------------------------------------------
# the module tree (attribute names are transformers' BERT names: they are the checkpoint's tensor names)
# ---------------------------------------------------------------------------------------------------
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        """``x`` [B, S, H] with ``mask``, or packed [T, H] with ``packing`` (then ``mask`` is unused)."""
        lead, hidden = x.shape[:-1], x.shape[-1]
        if self.qkv is not None:
            qkv = self.qkv(x).view(*lead, 3, self.num_heads, -1)  # [..., 3, heads, d]
            parts = qkv.unbind(-3)
        else:
            s = self.self
            parts = [t(x).view(*lead, self.num_heads, -1) for t in (s.query, s.key, s.value)]
            qkv = None
        if packing is not None:
            ctx = packing.attention(qkv if qkv is not None else torch.stack(parts, dim=1), self.scale)
        else:
            # [B, S, heads, d] -> [B, heads, S, d] strided views (SDPA takes strided inputs)
            q, k, v = (t.transpose(1, 2) for t in parts)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        x = self.attention(x, mask, packing)
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


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------
class SensiMixForSequenceClassification(PreTrainedModel):
    """Packed SensiMix (a+b) BERT classifier for inference. Load it with :meth:`from_pretrained`."""

    config_class = SensiMixConfig
    base_model_prefix = "bert"
    main_input_name = "input_ids"
    _no_split_modules = ["Layer"]
    _supports_sdpa = True  # its attention is SDPA (a config copied from a transformers BERT may ask for it)

    def __init__(self, config: SensiMixConfig) -> None:
        super().__init__(config)
        self.bert = SensiMixModel(config)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.plan: InferencePlan | None = None
        self.check_inputs = True
        self.post_init()

    # -- the format ------------------------------------------------------------------------------
    @classmethod
    def checkpoint_spec(cls, config: SensiMixConfig) -> checkpoint.Spec:
        """Name -> (dtype, shape) of every tensor of a packed-v1 checkpoint of ``config``: this model's buffers."""
        with torch.device("meta"):
            model = cls(config)
        return {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}

    @staticmethod
    def _geometry(config: SensiMixConfig) -> str:
        return (f"config.json: {config.describe()}, hidden_size={config.hidden_size}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, config: SensiMixConfig, tensors: dict[str, torch.Tensor],
                        plan: InferencePlan | None = None, *, source: str = "state dict") -> SensiMixForSequenceClassification:
        """The model holding ``tensors`` (checked against ``config``), prepared for ``plan`` (None: not prepared)."""
        with torch.device("meta"):
            model = cls(config)
        spec = {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}
        checkpoint.check_tensors(tensors, spec, source, cls._geometry(config))
        model.load_state_dict({k: v.cpu() for k, v in tensors.items()}, strict=True, assign=True)
        model.eval()
        if plan is not None:
            model.prepare(plan)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        device: torch.device | str | None = None, precision: str | torch.dtype | None = None,
                        binary_kernel: str | None = None, index8_kernel: str | None = None,
                        fuse_qkv: bool | None = None, skip_padding: bool | None = None, check_inputs: bool = True,
                        weights: str = "auto", verify_all_files: bool = False,
                        **kwargs: Any) -> SensiMixForSequenceClassification:
        """Load a packed checkpoint folder (model.safetensors preferred, else pytorch_model.bin).

        Args:
            pretrained_model_name_or_path: a folder written by ``sensimix compress`` / ``export_checkpoint``, or a
                hub id (online users).
            device: ``cpu`` or ``cuda[:i]`` (transformers' ``device_map`` is accepted too); default cpu.
            precision: ``fp32`` (exact, CPU default), ``fp16`` (CUDA default), ``bf16`` or ``fast`` (approximate,
                the fastest measured recipe); see :mod:`sensimix.inference.plan`. transformers' ``dtype`` /
                ``torch_dtype`` is accepted too.
            binary_kernel / index8_kernel: kernel names (:mod:`sensimix.kernels`); None = the plan's choice.
            fuse_qkv / skip_padding: None = the plan's choice (both on when the kernel allows).
            check_inputs: validate input values in every forward (token ids in range: one host sync on CUDA).
            weights: ``auto``, ``model.safetensors`` or ``pytorch_model.bin``: the file to load.
            verify_all_files: also prove the other weight file holds the same tensors.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments after the path, got "
                            f"{len(model_args)}")
        device = _pop_device(kwargs, device)
        precision = _pop_precision(kwargs, precision)
        _drop_loader_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected argument(s) {sorted(kwargs)}; a packed "
                            f"checkpoint's config cannot be changed at load time")
        plan = make_plan(device or "cpu", precision, binary_kernel=binary_kernel, index8_kernel=index8_kernel,
                         fuse_qkv=fuse_qkv, skip_padding=skip_padding)
        folder = _local_folder(pretrained_model_name_or_path)
        raw = checkpoint.read_raw_config(folder)
        config = checkpoint.config_from_raw(raw, folder / "config.json")
        tensors, source = checkpoint.read_tensors(folder, cls.checkpoint_spec(config), raw, cls._geometry(config),
                                                  weights=weights, verify_all=verify_all_files)
        model = cls.from_state_dict(config, tensors, plan, source=str(source))
        model.check_inputs = check_inputs
        model.config._name_or_path = str(folder)
        model.source_file = source
        log.info("loaded %s from %s on %s (%s)", config.describe(), source, plan.device, plan.describe())
        return model

    def prepare(self, plan: InferencePlan) -> None:
        """Move the stored tensors to ``plan.device`` and build every kernel operand for ``plan``."""
        for name, t in list(self.state_dict().items()):
            owner, attr = name.rsplit(".", 1)
            self.get_submodule(owner)._buffers[attr] = t.to(plan.device)
        done: set[int] = set()
        for module in self.modules():
            if isinstance(module, Attention):  # Q, K, V (fused or not) and the output projection
                module.prepare(plan)
                s = module.self
                done |= {id(m) for m in (s.query, s.key, s.value, module.output.dense, module.qkv)}
        for module in self.modules():
            if isinstance(module, PackedModule) and id(module) not in done:
                module.prepare(plan)
        self.plan = plan

    def save_pretrained(self, save_directory: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
                        extra_json: dict[str, object] | None = None, **kwargs: Any) -> Path:
        """Write the packed-v1 folder (atomically; see :func:`sensimix.checkpoint.write_folder`)."""
        kwargs.pop("safe_serialization", None)
        kwargs.pop("is_main_process", None)
        if kwargs.pop("push_to_hub", False) or kwargs:
            raise TypeError(f"save_pretrained: unsupported argument(s) {sorted(kwargs) or ['push_to_hub']}")
        return checkpoint.write_folder(save_directory, self.config, self.state_dict(), tokenizer=tokenizer,
                                       overwrite=overwrite, extra_json=extra_json)

    # -- devices -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.plan.device if self.plan else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.plan.dtype if self.plan else torch.float32

    @property
    def precision(self) -> str:
        return self.plan.precision if self.plan else "unprepared"

    @property
    def exact(self) -> bool:
        return bool(self.plan and self.plan.exact)

    @property
    def skip_padding(self) -> bool:
        return bool(self.plan and self.plan.skip_padding)

    @property
    def binary_kernel(self) -> str | None:
        return self.plan.binary_kernel if self.plan else None

    @property
    def index8_kernel(self) -> str | None:
        return self.plan.index8_kernel if self.plan else None

    def to(self, *args: Any, **kwargs: Any) -> SensiMixForSequenceClassification:
        """Move to another device: the kernels are prepared anew for it (same precision). A dtype cannot be
        changed this way: load with ``precision=...``."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"a packed SensiMix model cannot be cast to {dtype} with .to(); load it with "
                             f"from_pretrained(..., precision='fp16'|'bf16'|'fp32'|'fast')")
        if device is not None and self.plan is not None and torch.device(device) != self.plan.device:
            p = self.plan
            self.prepare(make_plan(device, p.precision, fuse_qkv=p.fuse_qkv, skip_padding=p.skip_padding))
        return self

    def cuda(self, device: Any = None) -> SensiMixForSequenceClassification:
        return self.to("cuda" if device is None else torch.device("cuda", device) if isinstance(device, int)
                       else device)

    def cpu(self) -> SensiMixForSequenceClassification:
        return self.to("cpu")

    def half(self, *args: Any) -> SensiMixForSequenceClassification:
        return self.to(dtype=torch.float16)

    def float(self, *args: Any) -> SensiMixForSequenceClassification:
        return self.to(dtype=torch.float32)

    def bfloat16(self, *args: Any) -> SensiMixForSequenceClassification:
        return self.to(dtype=torch.bfloat16)

    def weight_bytes(self) -> int:
        """Bytes held by the model's weights: stored tensors, kernel operands and opaque prepacked operands."""
        opaque = sum(m.opaque_bytes() for m in self.modules() if isinstance(m, Index8Linear))
        return sum(t.numel() * t.element_size() for t in self.buffers()) + opaque

    def get_input_embeddings(self) -> nn.Module:
        return self.bert.embeddings.word_embeddings

    def can_generate(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"{self.config.describe()}, " + (self.plan.describe() if self.plan else "not prepared")

    # -- inference -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                packing: Packing | None = None, return_dict: bool | None = None,
                **unsupported: Any) -> SequenceClassifierOutput | tuple:
        """Logits [batch, num_labels] (and the cross-entropy loss when ``labels`` are given).

        ``packing``: a :class:`Packing` of this batch's attention mask made beforehand (e.g. on the CPU while
        staging inputs), which spares the host sync of making it here.
        """
        if self.plan is None:
            raise RuntimeError("this model is not prepared for a device: load it with from_pretrained, or call "
                               "prepare(make_plan(...))")
        used = [k for k, v in unsupported.items() if v is not None and v is not False]
        if used:
            raise ValueError(f"{type(self).__name__} does not support {used}: it takes input_ids, attention_mask, "
                             f"token_type_ids (and labels)")
        _check_inputs(self, input_ids, attention_mask, token_type_ids, packing)
        if packing is None and self.plan.skip_padding and attention_mask is not None:
            packing = Packing.of(attention_mask)
        bert = self.bert
        if packing is not None:
            types = None if token_type_ids is None else packing.tokens(token_type_ids)
            x = bert.embeddings(packing.tokens(input_ids), types, positions=packing.positions)
            for layer in bert.encoder.layer:
                x = layer(x, None, packing)
            cls_rows = x.index_select(0, packing.cls)
        else:
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
            x = bert.embeddings(input_ids, token_type_ids)
            for layer in bert.encoder.layer:
                x = layer(x, mask)
            cls_rows = x[:, 0]
        logits = self.classifier(torch.tanh(bert.pooler.dense(cls_rows)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).view(-1))
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
_IGNORED_LOADER_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "revision", "cache_dir",
                          "local_files_only", "token", "force_download", "subfolder", "low_cpu_mem_usage",
                          "attn_implementation", "use_safetensors", "proxies", "_commit_hash", "code_revision",
                          "adapter_kwargs", "config")


def _drop_loader_kwargs(kwargs: dict[str, Any]) -> None:
    """transformers' loader options that do not apply to a local packed folder (the Auto classes and
    ``pipeline`` pass some of them); ``config`` is read from the folder itself."""
    for key in _IGNORED_LOADER_KWARGS:
        kwargs.pop(key, None)


def _pop_device(kwargs: dict[str, Any], device: Any) -> Any:
    device_map = kwargs.pop("device_map", None)
    if device is None and device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError("device_map as a dict is not supported: a packed SensiMix model runs on one device")
        device = f"cuda:{device_map}" if isinstance(device_map, int) else device_map
    return device


def _pop_precision(kwargs: dict[str, Any], precision: Any) -> Any:
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if precision is None:
        precision = dtype if dtype is not None else torch_dtype
    return None if precision == "auto" else precision


def _local_folder(name: str | os.PathLike) -> Path:
    """A local folder, or a hub snapshot of the packed files (online users)."""
    path = Path(name).expanduser()
    if path.exists() or os.path.isabs(os.fspath(name)) or str(name).startswith((".", "~")) or \
            str(name).count("/") != 1:
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, ...: say what was looked for
        raise FileNotFoundError(f"{name} is not a local folder, and the hub did not give it "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _check_inputs(model: SensiMixForSequenceClassification, input_ids: Any, attention_mask: Any,
                  token_type_ids: Any, packing: Packing | None) -> None:
    """Shapes, dtypes and devices always; value ranges when ``model.check_inputs`` (a host sync on CUDA)."""
    cfg = model.config
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids [batch, seq_len], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq_len] tensor, got shape {list(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0:
        raise ValueError("input_ids is an empty batch (shape [0, L]): nothing to classify")
    limit = cfg.max_position_embeddings
    if not 0 < seq <= limit:
        raise ValueError(f"sequence length {seq} is outside [1, max_position_embeddings={limit}] of this model: "
                         f"truncate the inputs (e.g. --max-seq-length {limit})")
    if input_ids.device != model.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {model.device}: move them with "
                         f".to(model.device)")
    for name, t, dtypes in (("attention_mask", attention_mask, None),
                            ("token_type_ids", token_type_ids, (torch.int64, torch.int32))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor like input_ids, got {type(t).__name__}")
        if tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(input_ids.shape)} like input_ids")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} must be int64 or int32 segment ids, got {t.dtype}")
        if t.dtype.is_complex:
            raise ValueError(f"{name} must be a real tensor, got {t.dtype}")
    if packing is not None and (packing.batch_shape != tuple(input_ids.shape) or packing.device != input_ids.device):
        raise ValueError(f"packing was made for a {list(packing.batch_shape)} mask on {packing.device}, but the "
                         f"inputs are {list(input_ids.shape)} on {input_ids.device}")
    if not model.check_inputs:
        return
    for name, t, limit, field in (("input_ids", input_ids, cfg.vocab_size, "vocab_size"),
                                  ("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")):
        if t is None:
            continue
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}) ({field} of this model), got values in [{lo}, {hi}]; "
                             f"were the inputs made with this model's tokenizer?")
    if attention_mask is not None and not attention_mask.dtype == torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (1 = attend)")
