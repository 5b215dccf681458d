#!/usr/bin/env python
"""Why A8's row rule is asymmetric: symmetric vs asymmetric 8-bit rows measured on trained SensiMix models.

For each packed folder given (fp32-activation checkpoints, trained), the input of every 8-bit linear is rounded
to 8-bit integers row by row -- symmetric (``scale = max|x| / 127``, integers in [-127, 127]) or asymmetric (the A8
rule, :func:`sensimix.a8.quantize_rows`: ``[min(0, min x), max(0, max x)]`` over 255 steps with a zero point) --
without retraining, and the script reports, per rule, the dev accuracy, the predictions that changed against the
exact path, and the relative RMS rounding error at each kind of input (the LayerNorm outputs that feed Q/K/V and
the FFN, the attention context, the GELU output that feeds the FFN's down-projection).

Usage::

    python scripts/a8_rule.py out/sst2-2+1 out/sst2-3+3 --task sst-2 --glue-dir glue_data --json a8-rule.json
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from sensimix import a8, kernels
from sensimix.inference import SensiMixForSequenceClassification
from sensimix.io import check_json_target, write_json
from sensimix.measure import task_inputs
from sensimix.sources import load_tokenizer


def symmetric(x: torch.Tensor) -> torch.Tensor:
    top = x.abs().amax(-1, keepdim=True)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    return torch.round(x / scale).clamp(-127, 127) * scale


def asymmetric(x: torch.Tensor) -> torch.Tensor:
    return a8.quantize_rows(x).dequantized().view(x.shape)


RULES = {"exact": None, "symmetric": symmetric, "asymmetric": asymmetric}


def site(k: int, n: int) -> str:
    """Which input a linear of these sizes reads (bert geometry: intermediate = 4 x hidden)."""
    if k > n:
        return "ffn-down (GELU output)"
    return {4: "ffn-up (LayerNorm output)", 3: "qkv (LayerNorm output)", 2: "kv (LayerNorm output)"}.get(
        n // k, "attention output or query (context / LayerNorm output)")


def measure(folder: str, task: str, glue_dir: str | None, batch: int = 64) -> dict:
    kernel = kernels.INDEX8_KERNELS["dequant"]
    plain = type(kernel).linear
    state: dict = {"rule": None, "errors": defaultdict(list)}

    def rounded(self, x, p):  # the exact kernel, on rounded rows
        rule = state["rule"]
        if rule is not None and x.dtype == torch.float32:
            xq = rule(x.reshape(-1, x.shape[-1])).view(x.shape)
            state["errors"][site(p.in_features, p.out_features)].append(
                float(((xq - x).pow(2).mean() / x.pow(2).mean().clamp_min(1e-30)).sqrt()))
            x = xq
        return plain(self, x, p)

    model = SensiMixForSequenceClassification.from_pretrained(folder, index8_kernel="dequant")
    inputs = task_inputs(task, load_tokenizer(folder), glue_dir, "dev", 128 if task != "sst-2" else 64)
    out, exact = {}, None
    type(kernel).linear = rounded
    try:
        for name, rule in RULES.items():
            state["rule"], state["errors"] = rule, defaultdict(list)
            with torch.inference_mode():
                preds = torch.cat([model(**{k: inputs[k][i:i + batch] for k in
                                            ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax(-1)
                                   for i in range(0, len(inputs["labels"]), batch)])
            exact = preds if exact is None else exact
            out[name] = {"accuracy": float((preds == inputs["labels"]).double().mean()),
                         "changed_vs_exact": int((preds != exact).sum()), "examples": len(preds),
                         "relative_rms_error": {k: sum(v) / len(v) for k, v in sorted(state["errors"].items())}}
    finally:
        type(kernel).linear = plain
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="trained packed SensiMix folders with fp32 activations")
    p.add_argument("--task", default="sst-2")
    p.add_argument("--glue-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.json:
        try:
            check_json_target(args.json, reads={f"folder {i}": f for i, f in enumerate(args.folders)})
        except ValueError as exc:
            p.error(str(exc))
    results = {}
    for folder in args.folders:
        results[folder] = measure(folder, args.task, args.glue_dir)
        for rule, r in results[folder].items():
            errors = ", ".join(f"{k} {v:.4f}" for k, v in r["relative_rms_error"].items())
            print(f"{folder} {rule:>10}: accuracy {100 * r['accuracy']:.2f}%, {r['changed_vs_exact']} of "
                  f"{r['examples']} predictions changed" + (f"; relative RMS error: {errors}" if errors else ""))
    if args.json:
        from sensimix.vv.procedure import environment

        write_json(args.json, {"task": args.task, "results": results, "environment": environment("cpu")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
