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

from .. import a8, checkpoint
from ..config import SensiMixConfig
from . import loading
from .encoder import Attention, SensiMixModel
from .graphs import PackedGraphs
from .inputs import check_inputs, check_labels, check_logits
from .layers import Embedding, Index8Embedding, Linear, PackedModule
from .packing import Packing
from .plan import InferencePlan, check_request, checkpoint_plan, make_plan

log = logging.getLogger(__name__)


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
    accepts_loss_kwargs = False  # Trainer must not pass num_items_in_batch: forward computes the mean CE itself

    def __init__(self, config: SensiMixConfig) -> None:
        super().__init__(config)
        self.bert = SensiMixModel(config)
        self.classifier = Linear(config.hidden_size, config.num_labels)
        self.plan: InferencePlan | None = None
        self.graphs: PackedGraphs | None = None  # the plan's CUDA graphs (made anew by each prepare)
        self.check_inputs = True
        self._built_from = self._digests(tensors=False)[0]  # the model fields the module tree is built from
        self._holds_weights = False  # until a state dict is loaded: the buffers are uninitialised memory
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
                        plan: InferencePlan | None = None, *, source: str = "state dict",
                        check: bool = True) -> SensiMixForSequenceClassification:
        """The model holding ``tensors`` (checked against ``config`` unless the caller did), prepared for ``plan``
        (None: not prepared)."""
        with torch.device("meta"):
            model = cls(config)
        if check:
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
                        weights: str = "auto", verify_all_files: bool = False, compile: bool = False,
                        cuda_graphs: bool = False, **kwargs: Any) -> SensiMixForSequenceClassification:
        """Load a packed checkpoint folder (model.safetensors preferred, else pytorch_model.bin).

        Args:
            pretrained_model_name_or_path: a folder written by ``sensimix compress`` / ``export_checkpoint``, or a
                hub id (online users).
            device: ``cpu`` or ``cuda[:i]`` (transformers' ``device_map`` is accepted too); default cpu.
            precision: ``fp32`` (exact, the default), ``fp16`` (the paper's GPU inference), ``bf16`` or ``fast``
                (the fastest recipe that keeps trained-model predictions: the exact path's fastest kernels, or on
                AVX2 CPUs the ``int16`` 8-bit kernel for a folder whose calibration passed); see
                :mod:`sensimix.inference.plan`. transformers' ``dtype`` / ``torch_dtype`` is accepted too.
            binary_kernel / index8_kernel: kernel names (:mod:`sensimix.kernels`); None = the plan's choice.
            fuse_qkv / skip_padding: None = the plan's choice (both on when the kernel allows).
            check_inputs: validate input values in every forward (token ids in range: one host sync on CUDA), and
                fp16 logits after it (an overflow is an error naming the fix: another host read on CUDA).
            weights: ``auto``, ``model.safetensors`` or ``pytorch_model.bin``: the file to load.
            verify_all_files: also prove the other weight file holds the same tensors.
            compile: ``torch.compile`` the forward (``dynamic=True``: the packed token count varies per batch).
                The first calls compile (seconds to minutes): run them before any timing. Input value checks are
                turned off (their host reads would split the graph); give checked inputs.
            cuda_graphs: replay the forward from CUDA graphs, one per batch shape and token bucket, each captured at
                its first batch (:mod:`sensimix.inference.graphs`); CUDA only. Pass ``packing=`` made on the CPU
                beforehand to spare the host sync of making it (as with any skip_padding plan).
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments after the path, got "
                            f"{len(model_args)}")
        device = loading.pop_device(kwargs, device)
        precision = loading.pop_precision(kwargs, precision)
        override = kwargs.pop("config", None)  # the Auto classes pass the folder's config with their kwargs applied
        fields = {k: kwargs.pop(k) for k in (*loading.SETTABLE_FIELDS, "num_labels") if k in kwargs}  # given directly
        subfolder = kwargs.pop("subfolder", None) or ""
        hub = {k: v for k in loading.HUB_KWARGS if (v := kwargs.pop(k, None)) is not None}
        loading.drop_loader_kwargs(kwargs)
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected argument(s) {sorted(kwargs)}; a packed "
                            f"checkpoint's config cannot be changed at load time")
        for name, value in (("check_inputs", check_inputs), ("compile", compile), ("verify_all_files",
                                                                                    verify_all_files),
                            ("cuda_graphs", cuda_graphs)):
            if not isinstance(value, bool):
                raise TypeError(f"{cls.__name__}.from_pretrained: {name} must be True or False, got {value!r}")
        if compile and cuda_graphs:
            raise ValueError(f"{cls.__name__}.from_pretrained: choose compile=True or cuda_graphs=True, not both (each "
                             f"replaces the other's launches)")
        request = dict(precision=precision, binary_kernel=binary_kernel, index8_kernel=index8_kernel,
                       fuse_qkv=fuse_qkv, skip_padding=skip_padding, cuda_graphs=cuda_graphs)
        check_request(request)  # a bad request fails here, before any file is read
        folder = loading.local_folder(pretrained_model_name_or_path, subfolder, hub)
        raw = checkpoint.read_raw_config(folder)
        config = checkpoint.config_from_raw(raw, folder / "config.json")
        plan, request = checkpoint_plan(device or "cpu", request, folder=folder, raw_config=raw)
        if override is not None and not hasattr(override, "to_dict"):
            raise ValueError(f"config must be a SensiMixConfig, got {type(override).__name__}")
        if override is not None or fields:
            asked = (config if override is None else override).to_dict()
            loading.apply_config_override(config, {**asked, **fields}, folder)
        tensors, source = checkpoint.read_tensors(folder, cls.checkpoint_spec(config), raw, cls._geometry(config),
                                                  weights=weights, verify_all=verify_all_files)
        model = cls.from_state_dict(config, tensors, plan, source=str(source), check=False)  # read_tensors checked
        model.plan_request = request
        model.check_inputs = check_inputs and not compile
        if compile:
            from ..kernels.native import private_compile_cache

            private_compile_cache()  # not inductor's shared /tmp default
            model.compile(dynamic=True)
        model.config._name_or_path = str(folder)
        model.source_file = source
        log.info("loaded %s from %s on %s (%s)", config.describe(), source, plan.device, plan.describe())
        return model

    def prepare(self, plan: InferencePlan) -> None:
        """Move the stored tensors to ``plan.device`` and build every kernel operand for ``plan``.

        The kernels compute with operands built here, some copied and repacked, some the stored tensors themselves:
        after editing a stored tensor in place, call ``prepare`` again (``load_state_dict`` and ``.to(device)`` do),
        which checks the tensors and rebuilds every operand; until then which kernels see the edit is undefined.
        ``save_pretrained`` refuses to write tensors or model fields other than those the model computes with.
        """
        self._check_model_fields("prepare")
        wanted = "a8" if self.config.a8 else "fp32"
        if plan.activations != wanted:
            raise ValueError(f"prepare: the plan is for {plan.activations} activations, but this is "
                             f"{'an A8 checkpoint' if self.config.a8 else 'a checkpoint with fp32 activations'}: "
                             f"make_plan(..., activations={wanted!r})")
        if not getattr(self, "_holds_weights", True):
            raise RuntimeError("this model holds no weights (built from a config, its buffers are uninitialised): "
                               "load a folder with from_pretrained, or export a quantization-aware model "
                               "(sensimix.export.convert)")
        # what load_state_dict refuses (NaN/inf, a range with lo > hi, another shape) is refused when put in place too
        self._check_spec(self.state_dict(), "prepare: the model's stored tensors")
        self._prepared_from = self._digests()
        for name, t in list(self.state_dict().items()):
            owner, attr = name.rsplit(".", 1)
            self.get_submodule(owner)._buffers[attr] = t.to(plan.device)
        done: set[int] = set()
        last = self.bert.encoder.layer[-1].attention  # runs queries for the pooled tokens only (see forward)
        for module in self.modules():
            if isinstance(module, Attention):  # Q, K, V (fused or not) and the output projection
                module.prepare(plan, query_apart=module is last)
                s = module.self
                done |= {id(m) for m in (s.query, s.key, s.value, module.output.dense, module.qkv, module.kv)}
        for module in self.modules():
            if isinstance(module, PackedModule) and id(module) not in done:
                module.prepare(plan)
        self.plan = plan
        self.graphs = PackedGraphs(self) if plan.cuda_graphs else None  # graphs of old operands are void

    def _digests(self, tensors: bool = True) -> tuple[str, str | None]:
        """Checksums of the model fields and of the stored tensors (those of the checkpoint format)."""
        fields = {**self.config.to_dict(), "num_labels": self.config.num_labels, **checkpoint.FORMAT_FIELDS}
        return checkpoint.config_digest(fields), checkpoint.tensors_digest(self.state_dict()) if tensors else None

    def _check_model_fields(self, action: str) -> None:
        """The model fields (layer_norm_eps, hidden_act, sizes, ...) fix the module tree when the model is built:
        edited afterwards, they are not what runs, and no prepare can change that."""
        if self._digests(tensors=False)[0] != getattr(self, "_built_from", None):
            raise ValueError(f"{action}: model fields of the config (layer_norm_eps, hidden_act, sizes, ...) were "
                             f"changed after the model was built from them; they fix its layers, so what runs is not "
                             f"what the config says. Restore them, or export a model trained with the new values")

    def _check_spec(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        checkpoint.check_tensors({k: v.detach().cpu() for k, v in tensors.items()},
                                 type(self).checkpoint_spec(self.config), source, self._geometry(self.config))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load stored tensors (names, dtypes and shapes of the format, checked first); a prepared model rebuilds
        its kernel operands from them (see :meth:`prepare`)."""
        if strict and self.plan is not None:
            self._check_spec(dict(state_dict), "load_state_dict")
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if strict:
            self._holds_weights = True
        if self.plan is not None:
            self.prepare(self.plan)
        return result

    def save_pretrained(self, save_directory: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
                        extra_json: dict[str, object] | None = None, **kwargs: Any) -> Path:
        """Write the packed-v1 folder (atomically; see :func:`sensimix.checkpoint.write_folder`).

        ``overwrite=True`` replaces a packed folder's weights and config and keeps its other files (tokenizer,
        notes), as transformers does. A model whose stored tensors or model fields (``config.json``'s
        ``layer_norm_eps``, ``hidden_act``, ...) were changed after its kernels were prepared is refused: it would
        write a model other than the one that runs.
        """
        kwargs.pop("safe_serialization", None)
        kwargs.pop("is_main_process", None)
        if kwargs.pop("push_to_hub", False) or kwargs:
            raise TypeError(f"save_pretrained: unsupported argument(s) {sorted(kwargs) or ['push_to_hub']}")
        self._check_model_fields("save_pretrained")
        prepared = getattr(self, "_prepared_from", None)
        if prepared is not None and self._digests()[1] != prepared[1]:
            raise ValueError("save_pretrained: stored tensors were changed in place after the kernels were prepared "
                             "from them, so what runs mixes old and new values; saving would write a model other "
                             "than the one that runs. Call model.prepare(model.plan) to compute with the change (and "
                             "check it), or reload")
        self._check_spec(self.state_dict(), "save_pretrained")
        target = Path(save_directory)
        if target.is_symlink():  # write the folder the link names, not a new one in the link's place
            target = target.resolve()
        return checkpoint.write_folder(target, self.config, self.state_dict(), tokenizer=tokenizer,
                                       overwrite=overwrite, extra_json=extra_json, keep_other_files=True)

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
            # the same request on the new device: kernels named at load stay (or fail clearly there), defaults are
            # the new device's defaults
            p = self.plan
            request = getattr(self, "plan_request", None) or dict(precision=p.precision, fuse_qkv=p.fuse_qkv,
                                                                   skip_padding=p.skip_padding,
                                                                   activations=p.activations,
                                                                   cuda_graphs=p.cuda_graphs)
            self.prepare(make_plan(device, **request))
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

    def double(self, *args: Any) -> SensiMixForSequenceClassification:
        return self.to(dtype=torch.float64)

    def type(self, dst_type: Any) -> SensiMixForSequenceClassification:
        # nn.Module.type casts every buffer, int8 indices and sign bits included: never a valid packed model
        raise ValueError(f"a packed SensiMix model cannot be cast with .type({dst_type}); load it with "
                         f"from_pretrained(..., precision='fp16'|'bf16'|'fp32'|'fast')")

    def train(self, mode: bool = True) -> SensiMixForSequenceClassification:
        """Eval only (``train(False)`` / ``eval()``): a packed model holds no trainable weights."""
        if mode:
            raise ValueError("a packed SensiMix model is inference-only (int8 indices and sign bits, no trainable "
                             "weights): train the quantization-aware model (sensimix.qat.from_bert, or sensimix "
                             "compress) and export it")
        return super().train(False)

    def weight_bytes(self) -> int:
        """Bytes held by the model's weights: stored tensors, kernel operands and opaque prepacked operands."""
        opaque = sum(m.opaque_bytes() for m in self.modules() if hasattr(m, "opaque_bytes"))
        return sum(t.numel() * t.element_size() for t in self.buffers()) + opaque

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The parameters of the BERT this model computes, as the QAT model counts them: an 8-bit or 1-bit matrix
        counts out x in (not its bytes: see :meth:`weight_bytes`), its stored [min, max] pair none, every fp16
        tensor its elements. Its tensors are buffers, which transformers' count skips (it would say 0). Nothing in a
        packed model trains: ``only_trainable`` gives 0. ``exclude_embeddings``: without the embedding tables."""
        if only_trainable:
            return 0
        total = 0
        for name, tensor in self.state_dict().items():
            owner, _, field = name.rpartition(".")
            module = self.get_submodule(owner)
            if exclude_embeddings and isinstance(module, (Embedding, Index8Embedding)):
                continue
            if field == "weight_bits":
                total += module.out_features * module.in_features
            elif field != "weight_range":
                total += tensor.numel()
        return total

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
        used = [k for k, v in unsupported.items() if v is not None and not (isinstance(v, (bool, int)) and not v)]
        if used:
            raise ValueError(f"{type(self).__name__} does not support {used}: it takes input_ids, attention_mask, "
                             f"token_type_ids (and labels)")
        check_inputs(self, input_ids, attention_mask, token_type_ids, packing)
        if labels is not None:
            check_labels(self, labels, input_ids.shape[0])
        skip = self.plan.skip_padding
        if packing is None and skip and attention_mask is not None:
            packing = Packing.of(attention_mask, keep_full=self.graphs is not None)
        if self.graphs is not None and (packing is not None or attention_mask is None or not skip):
            logits = self.graphs(input_ids, attention_mask, token_type_ids, packing, padded=not skip)
        else:
            logits = self._logits(input_ids, attention_mask, token_type_ids, packing)
        if self.check_inputs and self.plan.dtype == torch.float16:  # the one precision whose range can overflow
            check_logits(self, logits)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).view(-1))
        if return_dict is False or (return_dict is None and getattr(self.config, "return_dict", True) is False):
            return (logits,) if loss is None else (loss, logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None, packing: Packing | None) -> torch.Tensor:
        """The forward's arithmetic on checked inputs (what a CUDA graph captures): packed rows with ``packing``,
        else the padded batch with ``attention_mask``."""
        bert, mask = self.bert, None
        if packing is not None:
            types = None if token_type_ids is None else packing.tokens(token_type_ids)
            x = bert.embeddings(packing.tokens(input_ids), types, positions=packing.positions)
        else:
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
            x = bert.embeddings(input_ids, token_type_ids)
        *layers, last = bert.encoder.layer
        for layer in layers:
            x = layer(x, mask, packing)
        # the pooler reads each sequence's first token only: the last layer runs its query, attention output and
        # FFN for that token alone (the same numbers for it; the other tokens' last outputs were never used), with
        # its keys and values folded into that query instead of projected for every token (Attention._first_token)
        cls_rows = last(x, mask, packing, first_only=True)
        pooled = bert.pooler.dense(cls_rows)
        return self.classifier(a8.tanh(pooled) if self.plan.a8 else torch.tanh(pooled))
