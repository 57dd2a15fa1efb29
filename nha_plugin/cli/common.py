"""Helpers shared by the applications' sub-command modules (``shift_cli``, ``second_order_cli``, ``vit_cli``)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

__all__ = ["standalone_main"]


def standalone_main(add_parser: Callable, run: Callable[[argparse.Namespace], int],
                    argv: Optional[Sequence[str]] = None, record_as: Optional[str] = None) -> int:
    """Run a sub-command module on its own, as ``nha`` would with only that module wired in.

    Args:
        add_parser: the module's ``add_parser(subparsers)``.
        run: the module's ``run(args) -> int``.
        argv: the command line after the program name, sub-command first (default: ``sys.argv[1:]``).
        record_as: if given, the name of the attribute of ``args`` that receives the arguments after the
            sub-command, for the reports that quote the command they came from.

    Returns:
        ``run``'s exit status.
    """
    parser = argparse.ArgumentParser(prog="nha")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if record_as is not None:
        setattr(args, record_as, argv[1:])
    return run(args)
