"""``sensimix compress``: BERT checkpoint -> trained SensiMix (a+b) -> compressed checkpoint folder."""

from __future__ import annotations

import argparse

from ..config import ACTIVATION_QUANT
from .common import add_data_arguments, add_training_arguments, finite_float, int_at_least, settings_from_args

ACTIVATIONS = ("fp32", ACTIVATION_QUANT)
HELP = "compress a BERT checkpoint into a SensiMix (a+b) model (train with ABWR/PT/ILF, then export)"
DESCRIPTION = """\
Compress a BERT into SensiMix (a+b): keep its first N = a+b encoder layers, quantize embeddings and the
first a layers to 8-bit indices, give the top b layers a 1-bit FFN, fine-tune on a GLUE task with ABWR,
Prioritized Training and Inverse Layer-wise Fine-tuning, and write the compressed folder (config.json,
pytorch_model.bin, model.safetensors, tokenizer files, training_metrics.json). With --activations a8 the 8-bit
linears read 8-bit integers, in training and at inference alike (integer kernels, exact). With fp32 activations it
measures, after training, the approximate int16 8-bit kernel against the exact path and records the result
(fast_calibration.json): on up
to 4,096 train examples it did not train on when --train-limit left at least 200 out, else on the dev split (which
then stays independent evidence for the acceptance suite's fast_agreement). Precision "fast" takes that kernel only
for models it kept.

Everything that can be checked is checked before training starts (the output folder, the BERT and teacher
folders, the data files, the sequence length); --out is locked for the run, written atomically, and never
replaced without --overwrite. A run whose weights diverge (NaN/inf) writes nothing and exits with status 2.

examples:
  sensimix compress --bert ./minilm-sst2 --task sst-2 --glue-dir glue_data --out out/sst2-3+3 --layers 6 --8bit-layers 3
  sensimix compress --bert ./minilm-sst2 --task sst-2 --out out/sst2-2+1-a8 --activations a8   # 8-bit activations
  sensimix compress --bert random:bert-base --max-steps 0 --out out/size-2+1      # size check, no data needed
  torchrun --nproc_per_node 4 -m sensimix compress ...                            # multi-GPU (DDP)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bert", required=True,
                   help="BERT to compress: a local folder (fp32 weights), a hub id (online), or random weights of a "
                        "geometry: random:bert-base | bert-large | bert-tiny | bert-tiny6 (sizes and speed only)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--layers", type=int_at_least(1), default=3,
                   help="N = a+b encoder layers to keep (default: %(default)s)")
    p.add_argument("--8bit-layers", dest="eightbit_layers", type=int_at_least(0), default=2,
                   help="a = leading layers fully 8-bit; the other N-a get a 1-bit FFN (default: %(default)s)")
    p.add_argument("--activations", choices=ACTIVATIONS, default="fp32",
                   help="what the 8-bit linears read: fp32 activations, or a8: each input row quantized to 8-bit "
                        "integers in training and at inference alike, so integer kernels compute the trained "
                        "model bit for bit (sensimix/a8.py; no fast calibration needed) (default: %(default)s)")
    add_data_arguments(p)
    add_training_arguments(p)
    g = p.add_argument_group("recipe")
    g.add_argument("--no-abwr", action="store_true", help="ablation: no Absolute Binary Weight Regularization")
    g.add_argument("--no-pt", action="store_true", help="ablation: no Prioritized Training epoch")
    g.add_argument("--no-ilf", action="store_true", help="ablation: binarize all 1-bit FFNs at once, not top-down")
    g.add_argument("--teacher", default=None, help="fine-tuned fp32 BERT folder to distill from (implies --distill)")
    g.add_argument("--distill", action="store_true", help="knowledge distillation from --teacher (logits)")
    g.add_argument("--distill-alpha", type=finite_float(0, high=1), default=0.5,
                   help="weight of the distillation loss (default: %(default)s)")
    g.add_argument("--distill-temperature", type=finite_float(0, open_low=True), default=1.0,
                   help="softmax temperature (default: %(default)s)")
    g.add_argument("--distill-hidden", type=finite_float(0), default=0.0,
                   help="weight of a hidden-state MSE term against the teacher (default: 0 = logits only)")
    p.add_argument("--no-fast-calibration", action="store_true",
                   help="skip measuring, after training, whether the approximate int16 8-bit kernel keeps this "
                        "model's predictions (>= 99.5%% equal, accuracy within 0.3 points): precision fast uses "
                        "it only where it did (fast_calibration.json); without the record fast runs the exact path")


def run(args: argparse.Namespace) -> int:
    from ..train import compress

    if args.eightbit_layers > args.layers:
        raise ValueError(f"--8bit-layers ({args.eightbit_layers}) must be at most --layers ({args.layers})")
    settings = settings_from_args(
        args, abwr=not args.no_abwr, pt=not args.no_pt, ilf=not args.no_ilf, distill=args.distill,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
        distill_hidden=args.distill_hidden, fast_calibration=not args.no_fast_calibration,
    )
    result = compress(args.bert, args.task, args.out, glue_dir=args.glue_dir, layers=args.layers,
                      eightbit_layers=args.eightbit_layers, settings=settings, teacher=args.teacher,
                      overwrite=args.overwrite, hub_data=args.hub_data, activations=args.activations)
    size = (result.path / "pytorch_model.bin").stat().st_size
    print(f"wrote {result.path}: pytorch_model.bin {size / 1e6:.1f} MB")
    if "eval_accuracy" in result.metrics:
        print(f"dev accuracy = {result.metrics['eval_accuracy']:.4f}")
    return 0
