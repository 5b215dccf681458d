"""``sensimix`` command line: compress | finetune | evaluate | verify.

Each sub-command lives in its own module exposing ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). Those modules keep heavy imports (torch, transformers, datasets,
matplotlib) inside ``run`` so that ``sensimix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "compress": "sensimix.compress",
    "finetune": "sensimix.finetune",
    "evaluate": "sensimix.evaluate",
    "verify": "sensimix.verify",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensimix",
        description="SensiMix: compress BERT with 8-bit index / 1-bit value mixed precision, evaluate it, "
                    "and verify the KOTCA criteria (size ratio <= 10%%, inference time ratio <= 20%%).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'sensimix <command> --help' for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, TypeError) as exc:
        logging.getLogger("sensimix").error("%s", exc)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: close the process group the Trainer opened
            from . import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
