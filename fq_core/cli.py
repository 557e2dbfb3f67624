"""The `fq` command: argument parsing and error -> exit status; the logic lives in the library."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import FqError

# Each command is two short functions: _add_<name>(subparsers) and _run_<name>(args) -> int.
# Register new ones in COMMANDS at the bottom.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fq",
        description="Fake-quantize F32 tensors of GGUF models and measure the effect with llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"fq-suite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="fq: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args) or 0)
    except FqError as exc:
        print(f"fq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"fq {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


COMMANDS: list = []

if __name__ == "__main__":
    sys.exit(main())
