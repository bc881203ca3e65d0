"""The ``qmoe`` command line. Each subcommand lives in its own module under ``qmoe.cli`` and only translates
arguments into a config and a call of the library; no logic here.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `qmoe --help` lists them.
SUBCOMMANDS = ("compress", "decompress", "eval", "generate", "inspect", "verify", "families")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from qmoe import __version__

    parser = argparse.ArgumentParser(
        prog="qmoe",
        description="Compress Mixture-of-Experts language models below one bit per parameter, and run them.",
    )
    parser.add_argument("--version", action="version", version=f"qmoe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"qmoe.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"qmoe.cli.{name}_cmd":
                continue  # subcommand not part of this build
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        mod.add_arguments(p)
        modules[mod.NAME] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from qmoe.errors import QMoEError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except QMoEError as exc:
        if args.debug:
            raise
        print(f"qmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
