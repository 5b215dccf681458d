"""``sensimix evaluate``: inference time and accuracy of a BERT or SensiMix folder, with the certified log lines.

The functions here are also the measurement API of :mod:`sensimix.kotca` (keep their names and signatures):
:func:`load_for_inference`, :func:`task_inputs`, :func:`synthetic_inputs`, :func:`make_batches`,
:func:`run_inference` / :class:`InferenceResult`. Heavy imports (torch, transformers) stay inside functions so
that ``sensimix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import add_data_arguments

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HELP = "time inference and score accuracy of a BERT or SensiMix folder on a GLUE task"
DESCRIPTION = """\
Run a model folder over a GLUE task and print the certified log lines (KOTCA KST-21-049):

    Num examples = N
    Batch size = B
    duration: <ms> ms
    acc = <value>

--model is a plain BERT folder (the baseline: transformers' BertForSequenceClassification) or a packed
SensiMix folder (config.json has "sensimix_format"; served by sensimix.runtime). Examples are tokenized as the
certified cached features were: padded to --max-seq-length. --examples N larger than the split cycles through it
(the certified run used 104,743 QNLI examples).

What is timed ("duration"): only the model's forward passes over all batches, plus the argmax of the logits on
the device. Tokenization and host-to-device copies happen before the clock starts (inputs are staged on the
device); --warmup-batches untimed batches run first; on CUDA the device is synchronized before starting and
after stopping the clock. Everything runs under torch.inference_mode.

Precision: fp32 is the certified baseline math (BERT: eager attention; CUDA: TF32 disabled) and, for SensiMix,
exactly the quantization-aware model's eval forward. fp16 uses SDPA attention for BERT and the fp16 kernels for
SensiMix. bf16 runs all activations in bf16 (approximate). fast (SensiMix only; approximate) is the fastest
measured recipe: on CPU, bf16 GEMMs for the 8-bit linears (Q/K/V fused, bias and GELU in the GEMM epilogue;
fbgemm dynamic int8 where the CPU has no native bf16), the exact int8 +-1 GEMM for the 1-bit FFNs, an fp32
residual stream and LayerNorms, and padded tokens skipped (they cannot change the logits); on CUDA, fp16. On
SST-2 dev its predictions agreed with fp32 on 871 of 872 examples (SensiMix (2+1)). The BERT baseline has no
fast mode: time it in fp32, as certified.
"""

PRECISIONS = ("fp32", "fp16", "bf16", "fast")
FAST = "fast"  # sensimix.runtime.FAST (not imported here: this module stays light for `sensimix --help`)
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA request without CUDA is a ValueError."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was requested but CUDA is not available; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]")
    return device


def _dtype(precision: str) -> torch.dtype | str:
    """The torch dtype of ``precision``, or ``"fast"`` (a SensiMix recipe, resolved by the runtime per device)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == FAST:
        return FAST
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def certified_fp32(device: str) -> None:
    """fp32 as certified: no TF32 in CUDA matmuls/convolutions (a process-wide torch setting)."""
    import torch

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder, with a clear error when the folder is not one."""
    from .io import read_config_json

    return read_config_json(path, expected="a BERT or SensiMix checkpoint folder")


def model_kind(path: str | os.PathLike) -> str:
    """``sensimix`` for a packed SensiMix folder (config.json has ``sensimix_format``), else ``bert``."""
    return "sensimix" if "sensimix_format" in read_model_config(path) else "bert"


def load_for_inference(path: str | os.PathLike, device: str = "cpu", precision: str = "fp32", *,
                       binary_kernel: str | None = None, index8_kernel: str | None = None) -> torch.nn.Module:
    """A plain BERT or packed SensiMix folder, in eval mode on ``device``, returning logits.

    ``model(input_ids=..., attention_mask=..., token_type_ids=...)`` returns a logits tensor [B, num_labels] for
    both kinds. BERT runs in ``precision`` with eager attention for fp32 (the certified math; TF32 off on CUDA)
    and SDPA for fp16/bf16. SensiMix runs :class:`sensimix.runtime.SensiMixForSequenceClassification` with the
    activation dtype ``precision`` and the device's default (exact) kernels unless ``binary_kernel`` /
    ``index8_kernel`` name others. ``precision="fast"`` (SensiMix only) is the runtime's fast approximate recipe
    (``dtype="fast"``: see :meth:`SensiMixForSequenceClassification.from_pretrained`); ``"fp32"`` stays the
    exact path.
    """
    import torch

    device = resolve_device(device)
    dtype = _dtype(precision)
    raw = read_model_config(path)
    if dtype == torch.float32:
        certified_fp32(device)
    if "sensimix_format" in raw:
        from .runtime import SensiMixForSequenceClassification

        return SensiMixForSequenceClassification.from_pretrained(path, device=device, dtype=dtype,
                                                                 binary_kernel=binary_kernel,
                                                                 index8_kernel=index8_kernel)
    if raw.get("model_type", "bert") != "bert":
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is neither a BERT nor a packed SensiMix "
                         f"checkpoint (config.json has no sensimix_format)")
    if binary_kernel or index8_kernel:
        raise ValueError(f"{path} is a plain BERT folder: kernel choices apply to SensiMix checkpoints only")
    if dtype == FAST:
        raise ValueError(f"{path} is a plain BERT folder: precision 'fast' is SensiMix's approximate recipe; run "
                         f"the BERT baseline in fp32 (certified), fp16 or bf16")
    from transformers import BertForSequenceClassification

    from .runtime import BertLogits

    attn = "eager" if dtype == torch.float32 else "sdpa"
    model = BertForSequenceClassification.from_pretrained(os.fspath(path), dtype=dtype, attn_implementation=attn)
    return BertLogits(model).to(device).eval()


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def task_inputs(task: str, tokenizer, glue_dir: str | os.PathLike | None = None, split: str = "dev",
                max_seq_length: int = 128, *, hub: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` [N, max_seq_length] (padded to max length, like the
    certified cached features) and ``labels`` [N] of a GLUE task split (``hub``: from the hub when no local
    GLUE folder is given; online users only)."""
    import torch

    from .data import load_glue, tokenize

    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    ds = load_glue(task, split, glue_dir, hub=hub)
    if len(ds) == 0:
        raise ValueError(f"{task} {split} has no examples")
    rows = tokenize(ds, tokenizer, max_length=max_seq_length, pad_to_max=True)[:]
    return {k: torch.tensor(rows[k], dtype=torch.long) for k in (*INPUT_KEYS, "labels")}


def synthetic_inputs(num_examples: int, max_seq_length: int = 128, vocab_size: int = 30522,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Random QNLI-shaped pairs ``[CLS] a [SEP] b [SEP]`` padded to ``max_seq_length``, with random labels.

    Total lengths are uniform in [5, max_seq_length], the first segment gets token type 0 and the second 1.
    With a BERT-sized vocabulary (> 1000) the special ids are bert-base-uncased's ([CLS] 101, [SEP] 102, [PAD] 0)
    and words are drawn from ids >= 999; smaller vocabularies (tests) use [CLS] 1, [SEP] 2 and words >= 3.
    """
    import torch

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


def make_batches(inputs: dict[str, torch.Tensor], batch_size: int = 128, num_examples: int | None = None,
                 device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Split ``inputs`` into batches on ``device``, cycling through them to reach ``num_examples`` (default: all).

    The last batch is smaller when ``num_examples`` is not a multiple of ``batch_size``.
    """
    import torch

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
    batches = []
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(start + batch_size, total)) % available
        batches.append({k: inputs[k].index_select(0, idx).to(device) for k in keys})
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


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def run_inference(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, warmup_batches: int = 2,
                  device: str = "cpu") -> InferenceResult:
    """Time one pass of ``model`` over ``batches`` (already on the device) after ``warmup_batches`` untimed ones.

    The clock covers the forward passes and the on-device argmax only; CUDA is synchronized before and after.
    """
    import torch

    if not batches:
        raise ValueError("no batches to run")
    devices = {torch.device(device)} | {b["input_ids"].device for b in batches[:1]}
    cuda = [d for d in devices if d.type == "cuda"]

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    def forward(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return _logits(model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"),
                             token_type_ids=b.get("token_type_ids")))

    model.eval()
    with torch.inference_mode():
        for i in range(max(0, warmup_batches)):
            forward(batches[i % len(batches)])
        sync()
        predictions = []
        start = time.perf_counter()
        for b in batches:
            predictions.append(forward(b).argmax(dim=-1))
        sync()
        duration_ms = (time.perf_counter() - start) * 1e3
    preds = torch.cat(predictions).cpu()
    accuracy = None
    if all("labels" in b for b in batches):
        labels = torch.cat([b["labels"] for b in batches]).cpu()
        accuracy = (preds == labels).double().mean().item()
    return InferenceResult(duration_ms=duration_ms, num_examples=len(preds),
                           batch_size=int(batches[0]["input_ids"].shape[0]), predictions=preds, accuracy=accuracy)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="BERT folder or packed SensiMix folder")
    add_data_arguments(p, default_task="qnli")
    p.add_argument("--split", default="dev", choices=["dev", "train"], help="default: %(default)s")
    p.add_argument("--examples", type=int, default=None, metavar="N",
                   help="examples to run; more than the split cycles through it (certified: 104743)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s (certified)")
    p.add_argument("--max-seq-length", type=int, default=128,
                   help="pad/truncate to this many tokens (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="activation precision (default: %(default)s, the certified math; 'fast': SensiMix's "
                        "fastest recipe, approximate; see above)")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches before timing (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the --model folder)")
    p.add_argument("--synthetic", action="store_true",
                   help="random QNLI-shaped inputs instead of GLUE data (times only; accuracy is meaningless)")
    p.add_argument("--binary-kernel", default=None,
                   help="SensiMix 1-bit kernel (default: the device's fastest exact one)")
    p.add_argument("--index8-kernel", default=None,
                   help="SensiMix 8-bit kernel (default: exact, or the fast recipe's with --precision fast; "
                        "'int8', 'fbgemm' and 'bf16' round activations: approximate)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from .data import load_tokenizer

    for name in ("batch_size", "max_seq_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.examples is not None and args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    device = resolve_device(args.device)
    kind = model_kind(args.model)
    model = load_for_inference(args.model, device=device, precision=args.precision,
                               binary_kernel=args.binary_kernel, index8_kernel=args.index8_kernel)
    if args.synthetic:
        inputs = synthetic_inputs(args.examples or 5463, max_seq_length=args.max_seq_length,
                                  vocab_size=model.config.vocab_size)
        data = "synthetic"
    else:
        source = args.tokenizer or args.model
        try:
            tokenizer = load_tokenizer(source)
        except OSError as exc:
            raise OSError(f"{exc}. Pass --tokenizer <folder with vocab.txt>") from exc
        inputs = task_inputs(args.task, tokenizer, glue_dir=args.glue_dir, split=args.split,
                             max_seq_length=args.max_seq_length, hub=args.hub_data)
        data = f"{args.task} {args.split}"
    batches = make_batches(inputs, batch_size=args.batch_size, num_examples=args.examples, device=device)
    log.info("%s (%s, %s) on %s: %d batches of %s", args.model, kind, args.precision, device, len(batches), data)
    result = run_inference(model, batches, warmup_batches=args.warmup_batches, device=device)
    lines = result.log_lines()
    for line in lines:
        print(line, flush=True)
    if args.json:
        from .io import write_json

        write_json(args.json, {
            "num_examples": result.num_examples, "batch_size": result.batch_size,
            "duration_ms": result.duration_ms, "acc": result.accuracy, "log": lines,
            "model": os.fspath(args.model), "kind": kind, "data": data, "max_seq_length": args.max_seq_length,
            "device": device, "device_name": device_name(device), "precision": args.precision,
            "warmup_batches": args.warmup_batches, "torch": torch.__version__,
            "kernels": {"binary": getattr(model, "binary_kernel", None),
                        "index8": getattr(model, "index8_kernel", None)},
            "skip_padding": getattr(model, "skip_padding", False),
            "timed": "model forward passes + on-device argmax; inputs pre-staged; warm-up excluded; "
                     "device synchronized",
        })
    return 0


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
