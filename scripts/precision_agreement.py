"""How often each inference precision changes a trained SensiMix model's predictions, vs the exact fp32 path.

    python scripts/precision_agreement.py out/sst2-3+3 out/sst2-2+1 --glue-dir glue_data --json agreement.json

For each folder: SST-2 dev (or --task/--split), the exact path (precision fp32), then each --precisions entry
(default fp16 bf16 fast) on --device (default cpu: fp16/bf16 are then emulated by torch's CPU kernels, with fp32
accumulation like cuBLAS), then the exact path with each --index8-kernels entry in place of its 8-bit kernel
(e.g. `int16`: only the 8-bit linears' activations rounded). Prints and writes predictions equal / examples and
both accuracies. This is the measurement behind what `fast` runs for each model
(sensimix.inference.plan.fast_index8_kernel).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensimix import SensiMixForSequenceClassification  # noqa: E402
from sensimix.devices import resolve_device  # noqa: E402
from sensimix.io import write_json  # noqa: E402
from sensimix.sources import load_tokenizer  # noqa: E402
from sensimix.measure import make_batches, run_inference, task_inputs  # noqa: E402
from sensimix.vv.procedure import environment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="trained SensiMix folders (sensimix compress --out)")
    p.add_argument("--glue-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    p.add_argument("--task", default="sst-2")
    p.add_argument("--split", default="dev", choices=["dev", "train"])
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16", "fast"])
    p.add_argument("--index8-kernels", nargs="*", default=[], metavar="KERNEL",
                   help="also run precision fp32 with each of these 8-bit kernels (e.g. int16)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    rows = []
    for folder in args.folders:
        inputs = task_inputs(args.task, load_tokenizer(folder), glue_dir=args.glue_dir, split=args.split,
                             max_seq_length=args.max_seq_length)
        batches = make_batches(inputs, batch_size=128, device=device)
        exact_model = SensiMixForSequenceClassification.from_pretrained(folder, device=device, precision="fp32")
        exact = run_inference(exact_model, batches, warmup_batches=0, device=device)
        runs = [(name, None) for name in args.precisions] + [("fp32", k) for k in args.index8_kernels]
        for precision, kernel in runs:
            t0 = time.perf_counter()
            model = SensiMixForSequenceClassification.from_pretrained(folder, device=device, precision=precision,
                                                                      index8_kernel=kernel)
            got = run_inference(model, batches, warmup_batches=0, device=device)
            equal = int((got.predictions == exact.predictions).sum())
            row = {"folder": str(folder), "model": model.config.describe(), "precision": precision,
                   "index8_kernel": model.plan.index8_kernel, "plan": model.plan.describe(),
                   "examples": exact.num_examples, "predictions_equal": equal,
                   "exact_accuracy": float(exact.accuracy), "accuracy": float(got.accuracy),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            label = precision if kernel is None else f"{precision} + {kernel}"
            print(f"{row['model']} {label}: {equal}/{row['examples']} predictions equal to the exact path; "
                  f"accuracy {100 * row['exact_accuracy']:.2f}% -> {100 * row['accuracy']:.2f}% ({row['plan']})",
                  flush=True)
    if args.json:
        write_json(args.json, {"schema": "sensimix-precision-agreement/1", "task": args.task, "split": args.split,
                               "max_seq_length": args.max_seq_length, "environment": environment(device),
                               "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
