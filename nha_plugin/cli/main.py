"""The ``nha`` command: parses the command line and hands it to the sub-command's module.

    nha demo [--model scenes-rn] [--n 6] [--out demo_out]     decompose a few images, print and plot them
    nha describe --model scenes-rn --unit pair:H3N17 | head:3 | neuron:17 [--k 10] [--all --out FILE]
    nha benchmark [--model scenes-rn] [--dataset scenes] [--methods ...] [--metrics ...] [--quick] [--out DIR]
    nha --help                                                 every command (answers without importing torch)

Only the module of the command given is imported, so ``nha --help`` and ``nha --version`` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .common import COMMANDS, Parser, dispatch

__all__ = ["main", "build_parser"]

DESCRIPTION = ("Exact decompositions of CLIP image encoders: neuron x head (ResNet), layer x head x token and "
               "second-order neurons (ViT)")


def build_parser(command: Optional[str] = None) -> tuple[argparse.ArgumentParser, dict]:
    """The ``nha`` parser and ``{command: run}``.

    Args:
        command: the sub-command given, if known: its module adds its full options. Otherwise every command is
            listed with its one-line help only (no module imported).

    Returns:
        ``(parser, {command: run})``.
    """
    from ..version import __version__
    parser = Parser(prog="nha", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nha_plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {}
    if command in COMMANDS:
        module = importlib.import_module(f".{COMMANDS[command][0]}", __package__)
        before = set(sub.choices)
        module.add_parser(sub)
        runners.update({name: module.run for name in set(sub.choices) - before})
    else:
        for name, (_, text) in COMMANDS.items():
            sub.add_parser(name, help=text)
    return parser, runners


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``nha`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The command's exit status (2 after a one-line report of a refused file or run); mistakes in the command
        line raise ``SystemExit(2)`` after one line on stderr (:mod:`nha_plugin.cli.common`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    parser, runners = build_parser(command)
    args = parser.parse_args(argv)
    args.argv = argv[1:]                        # the arguments after the sub-command, quoted in the reports
    return dispatch(args.command, runners[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
