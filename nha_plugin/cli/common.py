"""What the ``nha`` sub-command modules share: the command table (names, modules, one-line help), the parser
every command is built with (one-line errors, plain help with defaults), the checks argparse cannot do (device,
model names, files, close matches for typos) and the handling of user mistakes (:func:`dispatch`).

The contract of every command:

- a mistake in the command line (argparse's own, or a :class:`UsageError` raised by a check) prints one line
  ``nha COMMAND: error: ...`` on stderr and exits like argparse: ``SystemExit`` with status 2;
- a refused file or run met while working (:func:`user_errors`: a missing file, an output folder of another run,
  a damaged file, a model the package does not support) prints one line and the command returns 2;
- ``NHA_DEBUG=1`` shows the traceback of either.

The table lives here, apart from the modules, so that ``nha --help`` lists every command without importing torch.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

__all__ = ["COMMANDS", "command_help", "positive_int", "non_negative_int", "UsageError", "Parser", "HelpFormatter",
           "plain_text", "doc_body", "did_you_mean", "check_choices", "check_device", "model_name_problem",
           "model_family", "load_model", "check_pool", "check_templates", "check_file", "check_folder",
           "check_output_folder", "check_output_file", "one_line", "user_errors", "report_user_error", "dispatch",
           "recorded_command", "standalone_main"]

# command -> (module of nha_plugin.cli that adds it, one-line help)
COMMANDS = {
    "demo": ("demo", "decompose a few images with the bundled model; print and plot"),
    "describe": ("describe", "sparse text descriptions of pairs, heads and neurons"),
    "benchmark": ("benchmark", "score NAD against Captum, zennit and CLIP-specific baselines on the same images and "
                               "metrics"),
    "stats": ("stats", "streaming dataset statistics of the pair coefficients (torchrun-aware, resumable)"),
    "sparsity": ("stats", "mean-ablation sparsity curves and reconstructions from dataset statistics"),
    "segment": ("segment", "training-free segmentation with NAD and its baselines (MaskCLIP, self-self, "
                           "neurons-/heads-only)"),
    "shift": ("shift", "distribution-shift monitor: concept scores and two-sample tests"),
    "textspan": ("vit", "TextSpan texts of CLIP-ViT heads and the reconstruction accuracy"),
    "spurious": ("vit", "worst-group accuracy before/after mean-ablating place heads"),
    "neurons": ("neurons", "second-order effects of CLIP-ViT neurons (stats, describe, ablate, segment, "
                           "adversarial)"),
    "report": ("report", "a static browsable report: leaderboard with intervals, per-image maps, atlas of heads, "
                         "neurons and pairs"),
}


def command_help(command: str) -> str:
    """The one-line help of ``command`` (shown by ``nha --help`` and by the command's own ``--help``)."""
    return COMMANDS[command][1]


# ---- argument types ----------------------------------------------------------------------------------------
def _whole_number(text: str, minimum: int, too_small: str) -> int:
    """``text`` as an int >= ``minimum``, else argparse.ArgumentTypeError (one line and exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}; got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{too_small}; got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 1 (argparse turns the error into one line and exit status 2)."""
    return _whole_number(text, 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    """argparse ``type=``: a whole number >= 0."""
    return _whole_number(text, 0, "must be 0 or more")


# ---- mistakes ----------------------------------------------------------------------------------------------
class UsageError(SystemExit):
    """A mistake in the command line that argparse cannot see (a typo in a name, a device this machine lacks, a
    missing input file, options that contradict each other).

    It behaves like argparse's own errors: a ``SystemExit`` with status 2, so a script calling a command's
    ``main`` sees the same exception for both; ``str(err)`` is the message, which :func:`dispatch` prints as one
    line.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2                       # SystemExit(message) would exit 1 and print the message itself


def one_line(err: BaseException) -> str:
    """An error's message on one line: a run-key mismatch lists each differing field on its own line, joined
    here with ``; `` (or a space after a line that ends a sentence or opens a list)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    out = lines[0]
    for ln in lines[1:]:
        out += (" " if out.endswith((":", ".", ";")) else "; ") + ln
    return out


def _print_error(command: str, message: str, hint: str) -> None:
    print(f"nha {command}: error: {message} ({hint})", file=sys.stderr)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (difflib), or ``""`` if none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choices(flag: str, values: Iterable[str], choices: Sequence[str], what: str = "name") -> None:
    """Raise :class:`UsageError` for the first of ``values`` not in ``choices``, naming the closest choice.

    Args:
        flag: the option, e.g. ``"--methods"``.
        values: what the user gave.
        choices: the valid names.
        what: what a value is, for the message (``"method"``).
    """
    for value in values:
        if value not in choices:
            raise UsageError(f"{flag}: unknown {what} {value!r}{did_you_mean(value, choices)}; choose from "
                             f"{', '.join(map(str, choices))}")


# ---- help --------------------------------------------------------------------------------------------------
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)


def plain_text(text: str) -> str:
    """reST markup of the docstrings that double as help made plain for a terminal: ````x```` -> ``x``,
    ``:func:`a.b``` -> ``a.b``, ``:func:`~a.b``` -> ``b`` (as Sphinx shows them)."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2).lstrip("."), text)
    return _LITERAL.sub(r"\1", text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (their examples are laid out by hand) and every option that takes a value
    showing its default: ``(default: X)`` is added unless the help already speaks of the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # argparse's documented extension point (ArgumentDefaultsHelpFormatter overrides the same method)
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of ``nha`` and of each sub-command (sub-parsers are built with the parent's class): a mistake
    is one line on stderr and ``SystemExit(2)``, ``choices`` typos get the closest valid value, help is plain
    text with defaults shown, and a sub-command's help and description come from :data:`COMMANDS`."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter          # one help style for every command and module
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _TableSubParsers)

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def error(self, message: str):
        """Print ``PROG: error: MESSAGE`` as one line and raise :class:`UsageError` (status 2)."""
        match = re.search(r"invalid choice: '?([^'(]*?)'? \(choose from (.*)\)$", message)
        if match:
            choices = [c.strip().strip("'\"") for c in match.group(2).split(",")]
            message += did_you_mean(match.group(1), choices)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise UsageError(message)


class _TableSubParsers(argparse._SubParsersAction):
    """Sub-commands whose help is the table's line: ``nha --help`` and ``nha X --help`` say the same."""

    def add_parser(self, name: str, **kwargs):
        if name in COMMANDS:
            kwargs["help"] = command_help(name)
            rest = kwargs.get("description")
            kwargs["description"] = command_help(name) + (f"\n\n{rest}" if rest else "")
        return super().add_parser(name, **kwargs)


# ---- checks before anything is loaded ----------------------------------------------------------------------
def check_device(device: Optional[str], flag: str = "--device") -> None:
    """Raise :class:`UsageError` unless ``device`` names a device this machine has (None: nothing to check)."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UsageError(f"{flag} {device!r} is not a device torch knows ({one_line(err)}); use cpu or "
                         "cuda") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {device}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                             f"use {flag} cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{flag} {device}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return
    if dev.type == "meta":
        raise UsageError(f"{flag} meta holds no data and cannot compute; use cpu or cuda")
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageError(f"{flag} {device}: no {dev.type} device is available here; use {flag} cpu")


def model_name_problem(name: str) -> Optional[str]:
    """What is wrong with a ``--model`` name, or None if :func:`nha_plugin.models.load_clip` can read it: a
    bundled model, an open_clip architecture, ``hf-hub:ORG/REPO``, ``local-dir:FOLDER`` or a weights file."""
    from ..zoo import MODELS
    if name in MODELS or name.startswith("hf-hub:"):
        return None
    if name.startswith("local-dir:"):
        folder = name[len("local-dir:"):]
        return None if Path(folder).is_dir() else f"--model {name}: no folder {folder}"
    if Path(name).is_file():
        return None
    import open_clip
    known = open_clip.list_models()
    if name in known:
        return None
    if os.sep in name or Path(name).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        return f"--model {name}: no such weights file; give an existing file, a bundled model or an open_clip name"
    return (f"--model: unknown model {name!r}{did_you_mean(name, [*MODELS, *known])}; use a bundled model "
            f"({', '.join(MODELS)}), an open_clip name (open_clip.list_models()), hf-hub:ORG/REPO, "
            "local-dir:FOLDER or a weights file")


def _pretrained_problem(name: str, pretrained: Optional[str]) -> Optional[str]:
    """What is wrong with ``--pretrained`` for an open_clip architecture, or None (files are read later)."""
    from ..zoo import MODELS
    if pretrained is None or name in MODELS or Path(pretrained).is_file() or os.sep in pretrained:
        return None
    import open_clip
    if name not in open_clip.list_models():
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return None
    return (f"--pretrained: {name} has no weights tagged {pretrained!r}{did_you_mean(pretrained, tags)} and no "
            f"such file exists; tags: {', '.join(tags) or 'none'}")


FAMILIES = {"resnet": ("CLIP-ResNet", "demo, describe, benchmark, stats, sparsity, segment, shift"),
            "vit": ("CLIP-ViT", "textspan, spurious, neurons, benchmark")}


def model_family(name: str) -> Optional[str]:
    """``"resnet"`` or ``"vit"`` for a bundled model or an open_clip architecture (read from its config, nothing
    loaded); None when the name alone does not tell (a file, a hub repository, an unknown name)."""
    from ..zoo import MODELS, zoo_config
    if name in MODELS:
        config = zoo_config(name)
    else:
        import open_clip
        config = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    layers = (config or {}).get("vision_cfg", {}).get("layers")
    return None if layers is None else ("vit" if isinstance(layers, int) else "resnet")


def load_model(name: str, pretrained: Optional[str] = None, family: Optional[str] = None, **kwargs):
    """:func:`nha_plugin.models.load_clip` for a command: mistakes in ``--model`` / ``--pretrained`` (an unknown
    name or tag, a model of the other family, weights that do not fit) become :class:`UsageError` with the
    closest valid name, before anything is loaded where the names tell.

    Args:
        name, pretrained: the options as given.
        family: ``"resnet"`` or ``"vit"`` if the command explains only that family.
        kwargs: ``device``, ``precision``, ... for ``load_clip``.

    Returns:
        ``(model, preprocess, tokenizer)``.
    """
    from .. import models
    from ..files import CorruptFileError
    problem = _pretrained_problem(name, pretrained)
    if problem:
        raise UsageError(problem)
    found = model_family(name) if family else None
    if found is not None and found != family:
        (want, _), (got, commands) = FAMILIES[family], FAMILIES[found]
        raise UsageError(f"expected a {want}; --model {name} is a {got} (the {got} commands: {commands})")
    try:
        return models.load_clip(name, pretrained=pretrained, **kwargs)     # looked up now: tests may replace it
    except CorruptFileError:
        raise
    except ValueError as err:
        problem = model_name_problem(name)
        raise UsageError(problem or f"--model {name} --pretrained {pretrained}: {one_line(err)}") from err


def check_pool(flag: str, spec: Optional[str]) -> None:
    """Raise :class:`UsageError` unless the word pool ``spec`` (``words``, ``words:N``, ``imagenet``, ``scenes``,
    ``file:PATH`` or a path, joined with ``+``; None: the command's default) can be read."""
    if spec is None:
        return
    from ..text.pools import POOLS, get_pool
    for part in spec.split("+"):
        name = part.partition(":")[0]
        if name not in (*POOLS, "file") and not Path(part).is_file():
            raise UsageError(f"{flag}: unknown word pool {part!r}{did_you_mean(name, POOLS)}; use "
                             f"{', '.join(POOLS)}, words:N, file:PATH or the path of a text file (one text per line), "
                             "joined with +")
    try:
        get_pool(spec)
    except (ValueError, OSError) as err:
        raise UsageError(f"{flag} {spec}: {one_line(err)}") from None


def check_templates(flag: str, spec: Optional[str]) -> None:
    """Raise :class:`UsageError` unless ``spec`` names templates: none, photo, imagenet or an existing file."""
    if spec is None or spec in ("none", "photo", "imagenet") or Path(spec).is_file():
        return
    raise UsageError(f"{flag}: unknown templates {spec!r}{did_you_mean(spec, ('none', 'photo', 'imagenet'))}; use "
                     "none, photo ('a photo of a {}.'), imagenet (CLIP's 80) or a file with one template per line")


def doc_body(doc: str, stop: str = "Wire") -> str:
    """A module docstring as the body of its command's ``--help``: without its first paragraph (the title, which
    the command table already says) and from the paragraph that starts with ``stop`` on (notes for programmers)."""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
    return body.split(f"\n\n{stop}")[0].strip("\n")


def check_file(flag: str, path: Optional[str], what: str) -> None:
    """Raise :class:`UsageError` unless ``path`` (if given) is an existing file; ``what`` says what it should be
    and where it comes from."""
    if path is not None and not Path(path).is_file():
        problem = "is a folder" if Path(path).is_dir() else "not found"
        raise UsageError(f"{flag} {path}: {problem}; expected {what}")


def check_folder(flag: str, path: Optional[str], what: str) -> None:
    """Raise :class:`UsageError` unless ``path`` (if given) is an existing folder."""
    if path is not None and not Path(path).is_dir():
        problem = "is a file" if Path(path).exists() else "not found"
        raise UsageError(f"{flag} {path}: {problem}; expected {what}")


def check_output_folder(flag: str, path: Optional[str]) -> None:
    """Raise :class:`UsageError` when an output folder ``path`` exists as a file (it would fail after the work)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder (created if missing)")


def check_output_file(flag: str, path: Optional[str]) -> None:
    """Raise :class:`UsageError` when an output file ``path`` is a folder or lies under a file."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{flag} {path}: {blocking} is a file, so nothing can be written below it")


# ---- running a command -------------------------------------------------------------------------------------
def user_errors() -> tuple:
    """Exception types that mean the user asked for something that cannot be done (a mistake in the command line,
    a missing file, a model the package does not support, an output folder from another run, a damaged file):
    reported in one line, not a traceback."""
    from ..files import CorruptFileError
    from ..models import PretrainedUnavailableError
    from ..runs import RunMismatchError
    from ..spec import UnsupportedModelError
    return (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            UnsupportedModelError, PretrainedUnavailableError, RunMismatchError, CorruptFileError)


def report_user_error(command: str, err: BaseException) -> int:
    """Print ``nha COMMAND: error: ...`` in one line on stderr; return exit status 2."""
    _print_error(command, one_line(err), "set NHA_DEBUG=1 for the traceback")
    return 2


def dispatch(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a sub-command after the checks every command shares (``--device``); user mistakes become one line.

    Args:
        command: the sub-command's name (for the messages).
        run: its ``run(args) -> int``.
        args: the parsed arguments.

    Returns:
        ``run``'s status, or 2 after a one-line report on stderr of a refused file or run (:func:`user_errors`;
        with ``NHA_DEBUG`` set it propagates with its traceback).

    Raises:
        UsageError: a mistake in the command line, printed first as one line (``SystemExit``, status 2; with
            ``NHA_DEBUG`` set its traceback is printed too).
    """
    debug = bool(os.environ.get("NHA_DEBUG"))
    try:
        check_device(getattr(args, "device", None))        # before any command loads a model onto it
        return run(args)
    except UsageError as err:
        if debug:                   # a UsageError is a SystemExit: re-raised, Python would print no traceback
            traceback.print_exc()
        _print_error(command, one_line(err), f"see nha {command} --help")
        raise
    except user_errors() as err:
        if debug:
            raise
        return report_user_error(command, err)


def recorded_command(args: argparse.Namespace) -> str:
    """The command that ran, shell-quoted (:func:`nha_plugin.markup.command_line`), for the reports: from the
    arguments the entry point recorded in ``args.argv``, else from ``sys.argv``."""
    from ..markup import command_line
    argv = getattr(args, "argv", None)
    return command_line([args.command, *argv] if argv is not None else sys.argv[1:])


def standalone_main(add_parser: Callable, run: Callable[[argparse.Namespace], int],
                    argv: Optional[Sequence[str]] = None, record_as: str = "argv") -> int:
    """Run a sub-command module on its own, as ``nha`` would with only that module wired in.

    Args:
        add_parser: the module's ``add_parser(subparsers)``.
        run: the module's ``run(args) -> int``.
        argv: the command line after the program name, sub-command first (default: ``sys.argv[1:]``).
        record_as: the attribute of ``args`` that receives the arguments after the sub-command, for the reports
            that quote the command they came from (:func:`recorded_command`).

    Returns:
        ``run``'s exit status.
    """
    parser = Parser(prog="nha")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    setattr(args, record_as, argv[1:])
    return dispatch(args.command, run, args)
