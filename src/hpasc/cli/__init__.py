"""The ``hpasc`` command line: argument parsing only.

Each module listed in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its commands and
sets ``func`` to a small function that imports the library lazily and calls it. A command returns an exit
code (0 = success).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__

# cli module -> the commands it registers (kept here so `hpasc --help` needs no heavy imports)
COMMAND_MODULES = (
    "data",  # synth, realism, folds
    "external",  # external
    "fmt",  # score, validate
    "segment",  # segment
    "cells",  # cells
    "train",  # train
    "predict",  # predict, merge, plan
    "analysis",  # cv, blend, report, explain
    "demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpasc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpasc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # hpasc's own errors (bad config, unreadable image, malformed CSV...) already say which file and
        # what is wrong: show that, not a traceback. HPASC_DEBUG=1 shows the traceback too.
        if not is_user_error(exc) or os.environ.get("HPASC_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def is_user_error(exc: BaseException) -> bool:
    """An error raised on purpose by hpasc (its class lives in the package) or a missing file."""
    return type(exc).__module__.split(".")[0] == "hpasc" or isinstance(exc, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
