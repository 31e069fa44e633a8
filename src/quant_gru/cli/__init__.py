"""The ``quant-gru`` command line (also ``python -m quant_gru``): thin subcommands over the
library. Each subcommand is a module with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args)``; ``run`` raises ``CLIError`` for a mistake of the user's (bad path, bad
argument), which ends the command with a one-line message and exit code 2.

Exit codes: 0 success, 1 the work failed (an unexpected error; its message is printed),
2 bad usage (arguments, paths, file contents).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from quant_gru.cli.errors import CLIError

SUBCOMMANDS = ("demo", "calibrate", "export", "compare", "bench")
DEFAULT = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quant-gru",
        description=(
            "Quantization-aware GRU: train, calibrate, quantize, export to ONNX and verify. "
            f"Without a subcommand, runs '{DEFAULT}'."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"quant_gru.cli.{name}")
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not arguments or arguments[0] not in (*SUBCOMMANDS, "-h", "--help"):
        arguments.insert(0, DEFAULT)
    args = parser.parse_args(arguments)  # exits with 2 on bad usage
    try:
        args.run(args)
    except CLIError as error:
        print(f"quant-gru {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quant-gru {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        print(f"quant-gru {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0
