#!/usr/bin/env python
"""Inference benchmark (not a test): BERT-base vs SensiMix on one device, in one process.

Models (batch 128 x seq 128 by default, random weights, synthetic QNLI-shaped inputs):

* BERT-base fp32 (``BertConfig()``, eager attention, TF32 off): the certified baseline;
* BERT-base fp16 + SDPA (CUDA only): what a user would run instead;
* SensiMix (2+1) and (3+3), built with ``sensimix.qat.from_bert("random:bert-base", ...)``, exported with
  ``sensimix.export.export_checkpoint`` and loaded with ``sensimix.SensiMixForSequenceClassification``: the exact
  path (fp32), the ``fast`` precision, ``fast`` with padding kept (the kernels' share of the gain), and other
  approximate variants, each with its logit gap against the exact runtime on the first batch;
* on CPU, a like-for-like baseline for the padding skip: BERT-base's FLOPs through the same runtime with padded
  tokens skipped (a (12+0) checkpoint, i.e. 12 layers of 8-bit weights dequantized to fp32 at load: dense fp32
  GEMMs of BERT-base's shapes), so ``ratio_vs_bert_fp32_skip_padding`` shows what the kernels alone buy.

Timing: every model is timed over the same batches in each of ``--rounds`` rounds, models interleaved within a
round (A, B, C, A, B, C, ...), and the median round is reported, so that load from other processes on a shared
machine hits all models alike; compare the ratios, not the absolute times. Times use
``sensimix.vv.measure.run_inference`` (model work only, warm-up excluded, device synchronized).

Then per-kernel GEMM throughput for M=16384 tokens and the BERT shapes (K, N) in {768, 3072}, against fp32 GEMM
(CPU) or fp16 cuBLAS (CUDA). Usage::

    python scripts/benchmark.py                     # CPU: 3 rounds of 1 batch per model, ~5 minutes on 2 cores
    python scripts/benchmark.py --device cuda --json benchmark-h100.json

On CPU, large temporaries are fresh mmap'd memory by default and page faults cost a sizeable share of every
memory-bound op; ``THP_MEM_ALLOC_ENABLE=1`` (a PyTorch setting: 2 MB transparent huge pages for large CPU
tensors) removes most of that for every model in the process. The JSON records whether it was set.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sensimix import SensiMixForSequenceClassification, kernels
from sensimix.devices import certified_fp32, device_name, resolve_device
from sensimix.quant import index8_quantize, pack_signs
from sensimix.vv.measure import make_batches, run_inference, synthetic_inputs

log = logging.getLogger("benchmark")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per model and round (default: 1 CPU, 20 CUDA)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches per model (default: 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gemm-m", type=int, default=16384, help="rows of the GEMM benchmark (default: 128 x 128)")
    p.add_argument("--gemm-reps", type=int, default=None, help="timed calls per GEMM (default: 2 CPU, 50 CUDA)")
    p.add_argument("--skip-gemm", action="store_true", help="model timings only")
    p.add_argument("--skip-models", action="store_true", help="GEMM timings only")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
LIKE_FOR_LIKE = "BERT-base fp32, padding skipped (runtime)"


def bert_base(device: str, half: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig()
    model = BertForSequenceClassification(config, attn_implementation="sdpa" if half else "eager")  # eager: certified
    if half:
        model = model.half()
    return model.to(device).eval()


def export_sensimix(layers: int, eightbit: int, root: Path) -> Path:
    from sensimix.export import export_checkpoint
    from sensimix.qat import from_bert

    qat = from_bert("random:bert-base", num_hidden_layers=layers, num_8bit_layers=eightbit, seed=0)
    qat.set_binarized_layers(qat.config.mixed_layers)
    return export_checkpoint(qat, root / f"sensimix-{eightbit}+{layers - eightbit}")


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def time_once(model: torch.nn.Module, batches, device: str) -> float:
    """ms per batch of one timed pass (warm-up done by the caller)."""
    result = run_inference(model, batches, warmup_batches=0, device=device)
    return result.duration_ms / len(batches)


def logit_gap(model: torch.nn.Module, exact: torch.nn.Module, batch: dict) -> dict:
    with torch.inference_mode():
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        got, want = model(*args).logits.float(), exact(*args).logits.float()
    gap = (got - want).abs().max().item()
    return {"max_abs_logit_gap": gap, "max_abs_logit": want.abs().max().item(),
            "relative_gap": gap / max(want.abs().max().item(), 1e-12),
            "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).double().mean().item()}


def sensimix_variants(cuda: bool) -> list[tuple[str, dict]]:
    """(label, from_pretrained kwargs) for SensiMix (2+1); the first is the exact reference of the logit gaps."""
    if cuda:
        return [("fp32 (exact vs QAT)", dict(precision="fp32")),
                ("fp16", dict(precision="fp16")),
                ("fp16, 1-bit int8", dict(precision="fp16", binary_kernel="int8")),
                ("fp16, 8-bit int8 act. (approx.)", dict(precision="fp16", index8_kernel="int8"))]
    return [("fp32 (exact)", dict(precision="fp32")),
            ("fast", dict(precision="fast")),
            ("fast, padding kept", dict(precision="fast", skip_padding=False)),
            ("fast, 8-bit fbgemm", dict(precision="fast", index8_kernel="fbgemm")),
            ("bf16 (approx.)", dict(precision="bf16"))]


def run_models(args: argparse.Namespace, device: str) -> list[dict]:
    cuda = device.startswith("cuda")
    n_batches = args.batches or (20 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    inputs = synthetic_inputs(args.batch_size * n_batches, max_seq_length=args.seq_len, seed=0)
    batches = make_batches(inputs, batch_size=args.batch_size, device=device)
    fill = float(inputs["attention_mask"].float().mean())
    log.info("%d batch(es) of %d x %d, %.0f%% of the tokens attended (the rest is padding)", n_batches,
             args.batch_size, args.seq_len, 100 * fill)
    certified_fp32(device)
    models: list[tuple[str, torch.nn.Module, dict]] = [("BERT-base fp32", bert_base(device, half=False), {})]
    if cuda:
        models.append(("BERT-base fp16+SDPA", bert_base(device, half=True), {}))
    with tempfile.TemporaryDirectory() as tmp:  # the loaded models keep their weights in memory
        if not cuda:
            folder = export_sensimix(12, 12, Path(tmp))
            models.append((LIKE_FOR_LIKE, SensiMixForSequenceClassification.from_pretrained(
                folder, device=device, precision="fp32", skip_padding=True), {}))
        for layers, eightbit in ((3, 2), (6, 3)):
            folder = export_sensimix(layers, eightbit, Path(tmp))
            variants = sensimix_variants(cuda)
            exact = None
            for label, kw in variants if (layers, eightbit) == (3, 2) else variants[:2]:
                model = SensiMixForSequenceClassification.from_pretrained(folder, device=device, **kw)
                if exact is None:
                    exact = model
                info = {"kernels": {"binary": model.binary_kernel, "index8": model.index8_kernel},
                        "dtype": str(model.dtype).removeprefix("torch."), "precision": model.precision,
                        "skip_padding": model.skip_padding, "plan": model.plan.describe(),
                        **logit_gap(model, exact, batches[0])}
                models.append((f"SensiMix ({eightbit}+{layers - eightbit}) {label}", model, info))
    for name, model, _ in models:
        run_inference(model, batches[:1], warmup_batches=warmup, device=device)  # warm-up, untimed
    times: dict[str, list[float]] = {name: [] for name, _, _ in models}
    for r in range(args.rounds):
        for name, model, _ in models:
            times[name].append(time_once(model, batches, device))
            log.info("round %d  %-44s %10.1f ms/batch", r + 1, name, times[name][-1])
    rows = []
    for name, model, info in models:
        ms = sorted(times[name])[len(times[name]) // 2]
        weight_bytes = model.weight_bytes() if hasattr(model, "weight_bytes") else model_bytes(model)
        rows.append({"name": name, "ms_per_batch": ms, "ms_per_round": times[name], "batches": len(batches),
                     "weight_bytes": weight_bytes, **info})
    base = rows[0]
    fp16 = next((r for r in rows if r["name"] == "BERT-base fp16+SDPA"), None)
    skip = next((r for r in rows if r["name"] == LIKE_FOR_LIKE), None)
    for r in rows:
        r["ratio_vs_bert_fp32"] = r["ms_per_batch"] / base["ms_per_batch"]
        # the same ratio per round (each round's models ran back to back): its spread shows the noise
        r["ratio_per_round"] = [a / b for a, b in zip(r["ms_per_round"], base["ms_per_round"])]
        r["weight_ratio_vs_bert_fp32"] = r["weight_bytes"] / base["weight_bytes"]
        if fp16:
            r["ratio_vs_bert_fp16"] = r["ms_per_batch"] / fp16["ms_per_batch"]
        if skip:
            r["ratio_vs_bert_fp32_skip_padding"] = r["ms_per_batch"] / skip["ms_per_batch"]
    return rows


# ---------------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------------
def time_call(fn, reps: int, device: str) -> float:
    """Seconds per call (one warm-up call, device synchronized)."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def run_gemms(args: argparse.Namespace, device: str) -> list[dict]:
    cuda = device.startswith("cuda")
    reps = args.gemm_reps or (50 if cuda else 2)
    dtype = torch.float16 if cuda else torch.float32
    m = args.gemm_m
    dev = torch.device(device)
    rows = []
    for k, n in ((768, 3072), (3072, 768), (768, 768)):
        first = len(rows)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g) * 0.05
        bias = torch.zeros(n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        dense = w.to(device, dtype)
        base_s = time_call(lambda: F.linear(x, dense, bias), reps, device)
        base_name = "fp16 cuBLAS" if cuda else "fp32 GEMM"
        rows.append({"kernel": base_name, "m": m, "k": k, "n": n, "ms": base_s * 1e3, "tops": flops / base_s / 1e12,
                     "speedup": 1.0})
        bits = pack_signs(w).to(device)
        for name, kern in kernels.BINARY_KERNELS.items():  # noqa: B007
            # the reference is for tests; fp8 on CPU is oneDNN emulation (seconds per call)
            if name == "reference" or kern.unavailable(dev) or (name == "fp8" and not cuda):
                continue
            wk = kern.prepare_weight(bits, k)
            xs = kern.binarize(x, k)
            gemm_s = time_call(lambda: kern.dot(xs, wk, k), reps, device)
            layer_s = time_call(lambda: kern.linear(x, wk, bias.float(), k, dtype), reps, device)
            rows.append({"kernel": f"1-bit {name}", "m": m, "k": k, "n": n, "ms": gemm_s * 1e3,
                         "tops": flops / gemm_s / 1e12, "speedup": base_s / gemm_s, "layer_ms": layer_s * 1e3})
        q, lo, hi = index8_quantize(w)
        weight_range = torch.stack([lo, hi]).to(torch.float16).to(device)
        for name, kern in kernels.INDEX8_KERNELS.items():
            if name == "reference" or kern.unavailable(dev):
                continue
            prepared = kern.prepare([(q.to(device), weight_range, bias)], dtype)
            s = time_call(lambda: kern.linear(x, prepared), reps, device)
            rows.append({"kernel": f"8-bit {name}" + ("" if kern.exact else " (approx.)"), "m": m, "k": k, "n": n,
                         "ms": s * 1e3, "tops": flops / s / 1e12, "speedup": base_s / s})
        for r in rows[first:]:
            log.info("GEMM %-28s M=%d K=%-4d N=%-4d %9.2f ms %8.2f TOPS %5.2fx", r["kernel"], m, k, n, r["ms"],
                     r["tops"], r["speedup"])
    return rows


# ---------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    from sensimix.devices import cpu_features

    env = {"device": device, "device_name": device_name(device), "cpu_flags": sorted(cpu_features()),
           "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
           "quantized_engine": str(kernels.quantized_engine())}
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = os.getloadavg()
    if device.startswith("cuda"):
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def print_table(rows: list[dict]) -> None:
    has_fp16 = any("ratio_vs_bert_fp16" in r for r in rows)
    has_skip = any("ratio_vs_bert_fp32_skip_padding" in r for r in rows)
    head = f"{'model':<48}{'ms/batch':>11}{'vs fp32 BERT':>14}" + (f"{'vs fp16 BERT':>14}" if has_fp16 else "")
    head += f"{'vs fp32 skip':>14}" if has_skip else ""
    print(head + f"{'per round':>22}{'weights':>10}{'logit gap':>11}")
    for r in rows:
        line = f"{r['name']:<48}{r['ms_per_batch']:>11.1f}{100 * r['ratio_vs_bert_fp32']:>13.1f}%"
        if has_fp16:
            line += f"{100 * r.get('ratio_vs_bert_fp16', float('nan')):>13.1f}%"
        if has_skip:
            line += f"{100 * r.get('ratio_vs_bert_fp32_skip_padding', float('nan')):>13.1f}%"
        line += f"{' / '.join(f'{100 * x:.1f}' for x in r['ratio_per_round']):>22}"
        gap = r.get("relative_gap")
        line += f"{100 * r['weight_ratio_vs_bert_fp32']:>9.1f}%" + (f"{gap:>11.1e}" if gap is not None else f"{'':>11}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results: dict = {"environment": environment(device), "batch_size": args.batch_size, "seq_len": args.seq_len}
    if not device.startswith("cuda"):
        results["caveat"] = ("CPU timings on a shared machine: other processes may compete for the cores "
                             "(see load_average_at_start); models are interleaved per round and ratios within "
                             "one run are the meaningful numbers")
    if not args.skip_models:
        results["models"] = run_models(args, device)
        print_table(results["models"])
    if not args.skip_gemm:
        results["gemm"] = run_gemms(args, device)
    results["environment"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        from sensimix.io import write_json

        write_json(args.json, results)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
