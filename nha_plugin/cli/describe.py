"""``nha describe``: sparse text descriptions of pairs, heads and neurons.

    nha describe --model scenes-rn --unit pair:H3N17 --unit head:3 --unit neuron:17 --k 10
    nha describe --model scenes-rn --unit neuron:17 --subconcepts --scenes 256     # heads/neurons from data
    nha describe --model RN50x16 --all --out pairs.parquet --out pairs.json --k 64 --device cuda

``--all`` keeps resumable parts in ``<first --out>.parts/``: a killed run resumes there; a run with other
settings, words or weights is refused (exit 2) unless ``--fresh`` discards it.

Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .common import standalone_main

__all__ = ["add_parser", "run", "main"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``describe`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("describe", help="sparse text descriptions of pairs, heads and neurons",
                              description=__doc__.split("\n\nWire")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled) or an open_clip name (RN50x16)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled/random)")
    p.add_argument("--unit", action="append", default=[], help="pair:H3N17 | head:3 | neuron:17 (repeatable)")
    p.add_argument("--all", action="store_true", help="describe every pair; needs --out")
    p.add_argument("--out", action="append", default=[], help="output file (.json or .parquet; repeatable)")
    p.add_argument("--k", type=int, default=None, help="words per unit (default 10; 64 with --all)")
    p.add_argument("--pool", default=None,
                   help="words | words:N | imagenet | scenes | FILE, joined with + (default: words, the 30k common "
                        "English words; scenes for scenes-rn, whose text tower knows only the scene vocabulary)")
    p.add_argument("--templates", default="photo",
                   help="photo ('a photo of a {}.') | imagenet (80 CLIP templates, the paper's) | none | FILE")
    p.add_argument("--normalization", default="text", choices=("text", "legacy_axis0"),
                   help="dictionary atoms: unit-norm texts (default) or the reference's per-dimension scaling")
    p.add_argument("--textspan", type=int, default=0, metavar="M",
                   help="heads with data (--scenes/--stats): M TextSpan texts instead of OMP words")
    p.add_argument("--subconcepts", action="store_true", help="for neurons: also describe each of their pairs")
    p.add_argument("--top-pairs", type=int, default=8, help="--subconcepts: the most important pairs shown (0: all)")
    p.add_argument("--scenes", type=int, default=0,
                   help="heads/neurons: PC0 over N generated scenes (otherwise from weights alone)")
    p.add_argument("--stats", default=None,
                   help="heads/neurons: a safetensors file holding pair coefficients (B, H, C), as its only tensor "
                        "or under 'pair_coefficients'")
    p.add_argument("--device", default="cpu", help="cpu | cuda (OMP and text embedding)")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed set before loading, so random-init models (no --pretrained) are the same "
                        "in every run and their text embeddings are cached")
    p.add_argument("--heads-per-chunk", type=int, default=1, help="--all: heads per resumable chunk")
    p.add_argument("--fresh", action="store_true", help="--all: discard the parts of an earlier run and start over")
    p.add_argument("--cache-dir", default=None, help="text-embedding cache (default ~/.cache/nha_plugin/text)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


_SAVE_HINT = "write it with safetensors.torch.save_file({'pair_coefficients': s}, path)"


def _read_coefficients(path: str):
    """Pair coefficients (B, H, C) from a safetensors file: its ``pair_coefficients`` tensor or its only one."""
    from ..files import CorruptFileError, load_tensors
    try:
        tensors, _ = load_tensors(path)
    except CorruptFileError as err:
        raise SystemExit(f"nha describe: --stats {path} is empty, truncated, corrupted or not safetensors (a "
                         f"torch/pickle file is never unpickled); expected pair coefficients (B, H, C): "
                         f"{_SAVE_HINT}") from err
    if "pair_coefficients" in tensors:
        return tensors["pair_coefficients"]
    if len(tensors) != 1:
        raise SystemExit(f"nha describe: --stats {path} holds tensors {sorted(tensors)}; expected one tensor, or "
                         f"one named 'pair_coefficients' (B, H, C): {_SAVE_HINT}")
    return next(iter(tensors.values()))


def _coefficients(args, model, preprocess):
    """Pair coefficients (B, H, C) for heads and neurons: from --stats, from --scenes N scenes, or None."""
    import torch
    if args.stats:
        return _read_coefficients(args.stats)
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
    """``--all``: every pair to the --out files; a refused or corrupt run folder is one error line, exit 2."""
    from ..files import CorruptFileError
    from ..runs import RunMismatchError
    from ..text.all_pairs import describe_all_pairs
    try:
        header = describe_all_pairs(spec, words, args.out, k=k, heads_per_chunk=args.heads_per_chunk,
                                    device=args.device, progress=not args.quiet, fresh=args.fresh,
                                    meta={"model": args.model, "pretrained": args.pretrained})
    except (RunMismatchError, CorruptFileError) as err:
        if os.environ.get("NHA_DEBUG"):
            raise
        print("nha describe: error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        return 2
    print(f"described {header['num_pairs']} pairs with {k} words from {header['num_texts']} texts: "
          + ", ".join(args.out))
    return 0


def run(args) -> int:
    """Execute a parsed ``describe`` command."""
    from ..models import load_clip
    from ..adapters import get_spec
    from ..text.describe import build_dictionary, describe_units, head_text_span, parse_unit, subconcepts

    if not args.all and not args.unit:
        raise SystemExit("nha describe: give --unit pair:H3N17|head:3|neuron:17 (repeatable) or --all --out FILE")
    if args.all and not args.out:
        raise SystemExit("nha describe --all needs --out FILE.parquet and/or --out FILE.json")
    k = args.k if args.k is not None else (64 if args.all else 10)
    if args.pool is None:
        args.pool = "scenes" if args.model == "scenes-rn" else "words"
    units = [parse_unit(u) for u in args.unit]                     # fail on a typo before loading anything
    import torch
    torch.manual_seed(args.seed)
    model, preprocess, tokenizer = load_clip(args.model, pretrained=args.pretrained, device=args.device)
    spec = get_spec(model)
    words = build_dictionary(model, tokenizer, args.pool, args.templates, args.normalization,
                             cache_dir=args.cache_dir, progress=not args.quiet)
    if args.k is None and k > len(words) - 1:
        k = max(1, min(k, len(words) - 1))                        # centring leaves N - 1 independent atoms
    if args.all:
        return _describe_all(args, spec, words, k)
    coeffs = _coefficients(args, model, preprocess) if any(kd != "pair" for kd, _ in units) else None
    results = []
    for (kind, index), name in zip(units, args.unit):
        if kind == "head" and args.textspan:
            if coeffs is None:
                raise SystemExit("--textspan needs dataset statistics: add --scenes N or --stats FILE")
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
