#!/usr/bin/env python
"""What each fused piece of the A8 CPU path buys: SensiMix (2+1) A8 (bert-base geometry, random weights) on the first
64 QNLI dev pairs (or synthetic pairs), timed with each piece undone in turn, interleaved in one process (ratios
within one run are the meaningful numbers on a shared machine). The logits stay the same bits in every variant.

Variants: the default plan; the FFN's GELU and its rounding run apart (the fp32 intermediate written, the GELU in C,
then rounded by the next linear); the residual add and LayerNorm after a GEMM run apart (C LayerNorm); attention in torch
(fp64 ops) instead of C; LayerNorms in torch (fp64 moments) instead of C.

Usage: python scripts/a8_fusion.py [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import BertConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--glue-dir", default=None, help="glue_data with QNLI/dev.tsv (default: $GLUE_DIR)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from sensimix import a8
    from sensimix.data import resolve_glue_dir
    from sensimix.export import convert
    from sensimix.inference.encoder import Attention
    from sensimix.inference.layers import LayerNorm
    from sensimix.kernels import a8native
    from sensimix.measure import synthetic_inputs, task_inputs
    from sensimix.qat import from_bert
    from sensimix.sources import load_tokenizer, offline_bert

    glue = resolve_glue_dir(args.glue_dir)
    if glue is not None and (glue / "QNLI" / "dev.tsv").is_file() and offline_bert():
        inputs, data = task_inputs("qnli", load_tokenizer(offline_bert()), glue, "dev", 128), "QNLI dev, first 64"
    else:
        inputs, data = synthetic_inputs(64, 128), "synthetic QNLI-shaped pairs"
    batch = {k: inputs[k][:64] for k in ("input_ids", "attention_mask", "token_type_ids")}
    qat = from_bert(BertConfig(), num_hidden_layers=3, num_8bit_layers=2, activation_quant="a8", seed=0)
    qat.set_binarized_layers([2])
    model = convert(qat, device="cpu")
    kernel = type(a8native.A8NativeKernel("a8-vnni"))

    def unfused_add_norm(self, x, p, residual, weight, bias, eps):
        return a8native.layer_norm(self.linear(x, p).add_(residual), weight, bias, eps)

    def unfused_gelu(self, x, p, act):  # the fp32 intermediate written, the GELU in C, rounded by the next linear
        return a8native.gelu(self.linear(x, p))

    patches = {
        "default (every piece fused / in C)": [],
        "GELU + rounding apart from the FFN-up GEMM (C)": [(kernel, "linear_act_operand", unfused_gelu)],
        "residual + LayerNorm apart from the GEMM": [(kernel, "linear_add_norm", unfused_add_norm)],
        "attention in torch (fp64 ops)": "attention",
        "LayerNorms in torch (fp64 moments)": "norms",
    }

    def run(name):
        spec = patches[name]
        saved = []
        if spec == "attention":
            for m in model.modules():
                if isinstance(m, Attention):
                    saved.append((m, "native", m.native))
                    m.native = False
        elif spec == "norms":
            for m in model.modules():
                if isinstance(m, LayerNorm):
                    saved.append((m, "norm", m.norm))
                    m.norm = a8.layer_norm
        else:
            for owner, attr, fn in spec:
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, fn)
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                logits = model(**batch).logits
                return time.perf_counter() - start, logits
        finally:
            for owner, attr, value in saved:
                setattr(owner, attr, value)

    times = {name: [] for name in patches}
    reference = None
    for name in patches:  # warm-up, and every variant computes the same bits
        _, logits = run(name)
        reference = logits if reference is None else reference
        assert torch.equal(logits, reference), name
    for _ in range(args.rounds):
        for name in patches:
            times[name].append(run(name)[0])
    base = statistics.median(times[next(iter(patches))])
    rows = [{"variant": n, "median_ms": 1e3 * statistics.median(t), "vs_default": statistics.median(t) / base}
            for n, t in times.items()]
    print(f"{data}; {args.rounds} interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in rows:
        print(f"{r['variant']:<45} {r['median_ms']:8.1f} ms  {r['vs_default']:.2f}x")
    if args.json:
        from sensimix.io import write_json
        from sensimix.vv.procedure import environment

        write_json(args.json, {"data": data, "rounds": args.rounds, "rows": rows, "environment": environment("cpu")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
