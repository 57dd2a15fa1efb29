"""``nha describe``: sparse text descriptions of pairs, heads and neurons.

    nha describe --model scenes-rn --unit pair:H3N17 --unit head:3 --unit neuron:17 --k 10
    nha describe --model scenes-rn --unit neuron:17 --subconcepts --scenes 256     # heads/neurons from data
    nha describe --model RN50x16 --all --out pairs.parquet --out pairs.json --k 64 --device cuda
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m nha_plugin.cli.describe describe --model RN50x16 --pretrained W.pt --all --out /shared/pairs.parquet --device cuda

``--all`` keeps resumable parts in ``<first --out>.parts/``: a killed run resumes there; a run with other
settings, words or weights is refused (exit 2) unless ``--fresh`` discards it.

Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .common import (UsageError, check_file, check_pool, check_templates, command_help, did_you_mean, doc_body,
                     load_model, non_negative_int, positive_int, standalone_main)

__all__ = ["add_parser", "run", "main", "parse_units"]

UNIT_KINDS = ("pair", "head", "neuron")
UNIT_FORMS = "pair:H3N17, head:3 or neuron:17"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``describe`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("describe", help=command_help("describe"), description=doc_body(__doc__))
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled) or an open_clip CLIP-ResNet (RN50x16)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled weights for "
                                                      "scenes-rn, random initialisation otherwise)")
    p.add_argument("--unit", action="append", default=[],
                   help="pair:H3N17 | head:3 | neuron:17 (repeatable; default: none, give --unit or --all)")
    p.add_argument("--all", action="store_true", help="describe every pair; needs --out")
    p.add_argument("--out", action="append", default=[],
                   help="output file, .json or .parquet (repeatable; default: none, print to the terminal)")
    p.add_argument("--k", type=positive_int, default=None, help="words per unit (default 10; 64 with --all)")
    p.add_argument("--pool", default=None,
                   help="words | words:N | imagenet | scenes | FILE, joined with + (default: words, the 30k common "
                        "English words; scenes for scenes-rn, whose text tower knows only the scene vocabulary)")
    p.add_argument("--templates", default="photo",
                   help="photo ('a photo of a {}.') | imagenet (80 CLIP templates, the paper's) | none | FILE")
    p.add_argument("--normalization", default="text", choices=("text", "legacy_axis0"),
                   help="dictionary atoms: unit-norm texts or the reference's per-dimension scaling")
    p.add_argument("--textspan", type=non_negative_int, default=0, metavar="M",
                   help="heads with data (--scenes/--stats): M TextSpan texts instead of OMP words (0: OMP)")
    p.add_argument("--subconcepts", action="store_true", help="for neurons: also describe each of their pairs")
    p.add_argument("--top-pairs", type=non_negative_int, default=8,
                   help="--subconcepts: the most important pairs shown (0: all)")
    p.add_argument("--scenes", type=non_negative_int, default=0,
                   help="heads/neurons: PC0 over N generated scenes (0: from the weights alone)")
    p.add_argument("--stats", default=None,
                   help="heads/neurons: a safetensors file holding pair coefficients (B, H, C), as its only tensor "
                        "or under 'pair_coefficients' (default: none)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (OMP and text embedding)")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed set before loading, so random-init models (no --pretrained) are the same "
                        "in every run and their text embeddings are cached")
    p.add_argument("--heads-per-chunk", type=positive_int, default=1, help="--all: heads per resumable chunk")
    p.add_argument("--fresh", action="store_true", help="--all: discard the parts of an earlier run and start over")
    p.add_argument("--cache-dir", default=None, help="text-embedding cache (default ~/.cache/nha_plugin/text)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _unit_hint(unit: str) -> str:
    """The form the user probably meant: ``heads:3`` -> ``head:3``, ``pair:3,17`` -> ``pair:H3N17``."""
    import re
    kind, _, rest = unit.strip().partition(":")
    numbers = re.findall(r"\d+", rest if rest else kind)
    close = _closest_kind(kind)
    if close == "pair" and len(numbers) == 2:
        return f" (did you mean 'pair:H{numbers[0]}N{numbers[1]}'?)"
    if close in ("head", "neuron") and len(numbers) == 1:
        return f" (did you mean '{close}:{numbers[0]}'?)"
    return did_you_mean(kind, UNIT_KINDS) if rest else ""


def _closest_kind(kind: str) -> Optional[str]:
    """The unit kind closest to ``kind`` (``heads`` -> ``head``), or None."""
    import difflib
    close = difflib.get_close_matches(kind.lower(), UNIT_KINDS, n=1, cutoff=0.5)
    return close[0] if close else None


def parse_units(units: Sequence[str]) -> list:
    """``--unit`` values as ``(kind, index)`` pairs (:func:`nha_plugin.text.describe.parse_unit`), a mistake as
    :class:`UsageError` with the form meant."""
    from ..text.describe import parse_unit
    parsed = []
    for unit in units:
        try:
            parsed.append(parse_unit(unit))
        except ValueError:
            raise UsageError(f"--unit {unit!r}: cannot read it{_unit_hint(unit)}; use {UNIT_FORMS}") from None
    return parsed


def _check_ranges(units: list, names: Sequence[str], spec) -> None:
    """Refuse a head or neuron index the model does not have (known once the model is read)."""
    from ..text.describe import check_index
    for (kind, index), name in zip(units, names):
        try:
            check_index(kind, index, spec)
        except ValueError as err:
            raise UsageError(f"--unit {name}: {err}") from None


_SAVE_HINT = "write it with safetensors.torch.save_file({'pair_coefficients': s}, path)"


def _read_coefficients(path: str):
    """Pair coefficients from a safetensors file: its ``pair_coefficients`` tensor or its only one."""
    from ..files import CorruptFileError, load_tensors
    try:
        tensors, _ = load_tensors(path)
    except CorruptFileError as err:
        raise UsageError(f"--stats {path} is empty, truncated, corrupted or not safetensors (a torch/pickle file is "
                         f"never unpickled); expected pair coefficients (B, H, C): {_SAVE_HINT}") from err
    if "pair_coefficients" in tensors:
        s = tensors["pair_coefficients"]
    elif len(tensors) == 1:
        s = next(iter(tensors.values()))
    else:
        raise UsageError(f"--stats {path} holds tensors {sorted(tensors)}; expected one tensor, or one named "
                         f"'pair_coefficients' (B, H, C): {_SAVE_HINT}")
    return s


def _check_coefficients(s, path: str, spec) -> None:
    """Refuse coefficients that are not (B >= 2, H, C) floats of ``spec``'s model."""
    shape = (spec.num_heads, spec.num_neurons)
    if s.dim() != 3 or tuple(s.shape[1:]) != shape or not s.is_floating_point() or s.shape[0] < 2:
        raise UsageError(f"--stats {path}: expected float pair coefficients (B >= 2, H, C) = (B, {shape[0]}, "
                         f"{shape[1]}) of this model; got {s.dtype} {tuple(s.shape)}")


def _coefficients(args, model, preprocess, from_file):
    """Pair coefficients (B, H, C) for heads and neurons: those read from --stats, from --scenes N scenes, or
    None."""
    import torch
    if from_file is not None:
        return from_file
    if args.scenes > 0:
        from PIL import Image
        from tqdm.auto import tqdm

        from ..scenes import SceneDataset
        from ..text.describe import collect_coefficients
        scenes = SceneDataset(args.scenes, seed=424242)
        dtype = next(model.parameters()).dtype

        def batches():
            for i in tqdm(range(0, len(scenes), 64), desc="scene statistics", disable=args.quiet):
                ims = [preprocess(Image.fromarray(scenes[j].image)) for j in range(i, min(len(scenes), i + 64))]
                yield torch.stack(ims).to(args.device, dtype)
        return collect_coefficients(model, batches())
    return None


def _print_table(desc: dict, indent: str = "") -> None:
    words = ", ".join(f"{w} ({c:+.2f})" for w, c in desc["words"])
    extra = f" importance {desc['importance']:.3g}" if "importance" in desc else ""
    print(f"{indent}{desc['unit']:>12} [{desc['source']}; residual {desc['relative_residual']:.2f}{extra}] {words}")


def _describe_all(args, spec, words, k: int) -> int:
    """``--all``: every pair to the --out files (a refused or damaged run folder is reported by the dispatcher)."""
    import torch.distributed as dist

    from ..runs import dist_info, init_distributed
    from ..text.all_pairs import describe_all_pairs
    created = init_distributed(args.device)           # under torchrun: the chunks are dealt over the ranks
    try:
        header = describe_all_pairs(spec, words, args.out, k=k, heads_per_chunk=args.heads_per_chunk,
                                    device=args.device, progress=not args.quiet, fresh=args.fresh,
                                    meta={"model": args.model, "pretrained": args.pretrained})
    finally:
        if created:
            dist.destroy_process_group()
    if dist_info()[0] != 0:
        return 0
    print(f"described {header['num_pairs']} pairs with {k} words from {header['num_texts']} texts: "
          + ", ".join(args.out))
    return 0


def _check_args(args) -> list:
    """Refuse impossible options before anything is loaded; returns the parsed units."""
    if not args.all and not args.unit:
        raise UsageError(f"give --unit ({UNIT_FORMS}; repeatable) or --all --out FILE")
    if args.all and not args.out:
        raise UsageError("--all needs --out FILE.parquet and/or --out FILE.json")
    bad = [o for o in args.out if not o.endswith((".json", ".parquet"))]
    if bad:
        raise UsageError(f"--out {bad[0]}: expected a file name ending in .json or .parquet")
    if args.out and not args.all:
        raise UsageError("--out writes the --all table; without --all the descriptions are printed (--json for JSON)")
    units = parse_units(args.unit)
    if args.textspan and not (args.scenes or args.stats) and any(kind == "head" for kind, _ in units):
        raise UsageError("--textspan needs dataset statistics: add --scenes N or --stats FILE")
    check_file("--stats", args.stats, "a safetensors file of pair coefficients (B, H, C)")
    check_pool("--pool", args.pool)
    check_templates("--templates", args.templates)
    return units


def run(args) -> int:
    """Execute a parsed ``describe`` command; returns 0 (mistakes: :mod:`nha_plugin.cli.common`)."""
    from ..adapters import get_spec
    from ..text.describe import build_dictionary, describe_units, head_text_span, subconcepts

    units = _check_args(args)                                   # fail on a typo before loading anything
    from_file = _read_coefficients(args.stats) if args.stats else None
    k = args.k if args.k is not None else (64 if args.all else 10)
    if args.pool is None:
        args.pool = "scenes" if args.model == "scenes-rn" else "words"
    import torch
    torch.manual_seed(args.seed)
    model, preprocess, tokenizer = load_model(args.model, args.pretrained, family="resnet", device=args.device)
    spec = get_spec(model)
    _check_ranges(units, args.unit, spec)
    if from_file is not None:
        _check_coefficients(from_file, args.stats, spec)
    words = build_dictionary(model, tokenizer, args.pool, args.templates, args.normalization,
                             cache_dir=args.cache_dir, progress=not args.quiet)
    if args.k is None and k > len(words) - 1:
        k = max(1, min(k, len(words) - 1))                        # centring leaves N - 1 independent atoms
    if args.all:
        return _describe_all(args, spec, words, k)
    coeffs = _coefficients(args, model, preprocess, from_file) if any(kd != "pair" for kd, _ in units) else None
    results = []
    for (kind, index), name in zip(units, args.unit):
        if kind == "head" and args.textspan:
            results.append(head_text_span(spec, index[0], coeffs, words, m=args.textspan))
        elif kind == "neuron" and args.subconcepts:
            results.append(subconcepts(spec, index[0], words, k, coefficients=coeffs, top=args.top_pairs or None))
        else:
            results.append(describe_units(spec, [name], words, k, coefficients=coeffs, device=args.device)[0])
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{args.model}: H={spec.num_heads} heads x C={spec.num_neurons} neurons, D={spec.output_dim}; "
          f"{len(words)} texts ({args.pool}, templates: {args.templates}); k={k}")
    for r in results:
        if "texts" in r:
            print(f"{r['unit']:>12} [data; TextSpan] " + ", ".join(r["texts"]))
        elif "pairs" in r:
            _print_table(r["neuron"])
            for pr in r["pairs"]:
                _print_table(pr, indent="    ")
        else:
            _print_table(r)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m nha_plugin.cli.describe describe ...``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
