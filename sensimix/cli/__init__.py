"""``sensimix`` command line: compress | finetune | evaluate | calibrate | verify.

Each sub-command lives in its own module exposing ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status); commands only parse arguments and call library functions. Errors a
user can fix (bad option, missing or wrong folder, unreadable file, diverged training) print one line and exit
with status 2; nothing is written or deleted by a command that fails.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pickle
import signal
import sys
import threading

from ..version import __version__

COMMANDS = {
    "compress": "sensimix.cli.compress",
    "finetune": "sensimix.cli.finetune",
    "evaluate": "sensimix.cli.evaluate",
    "calibrate": "sensimix.cli.calibrate",
    "verify": "sensimix.cli.verify",
}
# errors with a message for the user (CheckpointError, SourceError, OutputError, NonFiniteLogits are ValueErrors)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError, TypeError, ImportError, pickle.UnpicklingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensimix",
        description="SensiMix: compress BERT with 8-bit index / 1-bit value mixed precision, evaluate it, "
                    "and verify the KOTCA criteria (size ratio <= 10%, inference time ratio <= 20%).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'sensimix <command> --help' for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sensimix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("sensimix")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like an exception, so temp folders are removed and locks released on the way out
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        log.error("%s", _one_line(exc))
        return 2
    except KeyboardInterrupt as exc:  # a job interrupted after its output was in place says what it left
        log.error("interrupted; %s", getattr(exc, "written", None) or "nothing was written")
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: close the process group the Trainer opened
            from ..train import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
