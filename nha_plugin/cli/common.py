"""What the ``nha`` sub-command modules share: the command table (names, modules, one-line help), the handling
of user mistakes (one line on stderr, exit status 2; ``NHA_DEBUG=1`` shows the traceback) and
:func:`standalone_main` to run one module on its own.

The table lives here, apart from the modules, so that ``nha --help`` lists every command without importing torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

__all__ = ["COMMANDS", "command_help", "positive_int", "user_errors", "report_user_error", "dispatch", "standalone_main"]

# command -> (module of nha_plugin.cli that adds it, one-line help)
COMMANDS = {
    "demo": ("demo", "decompose a few images with the bundled model; print and plot"),
    "describe": ("describe", "sparse text descriptions of pairs, heads and neurons"),
    "benchmark": ("benchmark", "score NAD against Captum, zennit and CLIP-specific baselines on the same images and "
                               "metrics"),
    "stats": ("stats", "streaming dataset statistics of the pair coefficients (torchrun-aware, resumable)"),
    "sparsity": ("stats", "mean-ablation sparsity curves and reconstructions from dataset statistics"),
    "segment": ("segment", "training-free segmentation with the NAD segmentor and its baselines"),
    "shift": ("shift", "distribution-shift monitor: concept scores and two-sample tests"),
    "textspan": ("vit", "TextSpan texts of CLIP-ViT heads and the reconstruction accuracy"),
    "spurious": ("vit", "worst-group accuracy before/after mean-ablating place heads"),
    "neurons": ("neurons", "second-order effects of CLIP-ViT neurons (stats, describe, ablate, segment, "
                           "adversarial)"),
}


def command_help(command: str) -> str:
    """The one-line help of ``command`` (shown by ``nha --help`` and by the command's own parser)."""
    return COMMANDS[command][1]


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 1 (argparse turns the error into one line and exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def user_errors() -> tuple:
    """Exception types that mean the user asked for something that cannot be done (a missing file, a model the
    package does not support, an output folder from another run, ...): reported in one line, not a traceback."""
    from ..files import CorruptFileError
    from ..models import PretrainedUnavailableError
    from ..runs import RunMismatchError
    from ..spec import UnsupportedModelError
    return (FileNotFoundError, NotADirectoryError, UnsupportedModelError, PretrainedUnavailableError,
            RunMismatchError, CorruptFileError)


def report_user_error(command: str, err: BaseException) -> int:
    """Print ``nha COMMAND: error: ...`` in one line on stderr; return exit status 2."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"nha {command}: error: {message} (set NHA_DEBUG=1 for the traceback)", file=sys.stderr)
    return 2


def dispatch(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a sub-command; user mistakes become one line and exit status 2 unless ``NHA_DEBUG`` is set."""
    try:
        return run(args)
    except user_errors() as err:
        if os.environ.get("NHA_DEBUG"):
            raise
        return report_user_error(command, err)


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
    return dispatch(args.command, run, args)
