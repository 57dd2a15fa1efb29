"""``nha segment``: training-free semantic segmentation (NAD and its baselines), scored by mIoU / pixAcc.

    nha segment                                             # scenes-rn on 100 held-out generated scenes, all methods
    nha segment --method nad --k 417 --n 500 --out seg_out
    nha segment --model RN50x16 --pretrained openai --dataset pascal-context --root data/VOCdevkit \\
        --method all --stats stats.safetensors --device cuda         # the paper's protocol (Context-59, no background)
    nha segment --preset paper --stats stats.safetensors            # the paper's code: uniform bias share, sink
                                                                    # vectors interpolated, PC0 signs from data

Writes ``results.json``, ``results.md`` and ``predictions.png`` (image, ground truth, each method) to ``--out``. The
folder is a resumable run (:mod:`nha_plugin.applications.segmentation.evaluation`): ``run.json`` holds its key (the
settings, the segmentor, the data, the weights) and ``images_*.part.safetensors`` the work done, so a killed run
resumes where it stopped; another configuration in the same folder is refused, naming what differs (``--fresh``
discards the saved run). Nothing there is ever unpickled. Mistakes (a bad option, a missing file, a mismatching or
damaged run folder) print one line and exit with status 2 through :func:`nha_plugin.cli.common.dispatch`;
``NHA_DEBUG=1`` raises them with the traceback instead.
Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`; ``python -m
nha_plugin.cli.segment`` runs it alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .common import dispatch, report_user_error

__all__ = ["UsageError", "add_parser", "configure", "pair_signs", "segment", "run", "main"]

HELP = "training-free segmentation with NAD and its baselines (MaskCLIP, self-self, neurons-/heads-only)"
DATASETS = ("scenes", "pascal-context")
METHOD_CHOICES = ("nad", "maskclip", "self-self", "neurons", "heads", "global", "all")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``segment`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("segment", help=HELP, description=__doc__.split("\n\nWrites")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled) or an open_clip name, e.g. RN50x16")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled / random)")
    p.add_argument("--dataset", default="scenes", choices=DATASETS,
                   help="scenes: generated held-out scenes with exact masks; pascal-context: Context-59 (needs --root)")
    p.add_argument("--root", default=None, help="pascal-context: the folder holding VOCdevkit (or VOC2010 itself)")
    p.add_argument("--split", default="val", help="pascal-context: ImageSets/SegmentationContext/<split>.txt")
    p.add_argument("--n", type=int, default=None, help="images scored (default: 100 scenes; all of the split)")
    p.add_argument("--seed", type=int, default=20_000, help="scenes: dataset seed (scenes-rn trained on 0)")
    p.add_argument("--scene-background", default="classes", choices=("classes", "ignore"),
                   help="scenes: the 6 backgrounds are classes (every pixel scored, 16 classes) or ignored like "
                        "Context-59's background (10 object classes)")
    p.add_argument("--method", action="append", default=None, choices=METHOD_CHOICES,
                   help="method (repeatable; default all): " + ", ".join(METHOD_CHOICES))
    p.add_argument("--k", type=int, default=None, help="top pairs per class for nad / neurons (default: the paper's "
                   "share of H*C: 20000 of RN50x16's 147456, 417 for scenes-rn; clipped to H*C)")
    p.add_argument("--crop", type=int, default=None, help="window side (default: the model's input size)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: half the crop)")
    p.add_argument("--short-side", type=int, default=None, help="resize the short side to this first (default: crop)")
    p.add_argument("--templates", default=None,
                   help="imagenet (80 CLIP templates, the paper's; default for pascal-context) | photo | FILE | "
                        "scenes (the caption forms scenes-rn was trained on; default for scenes)")
    p.add_argument("--no-centre", action="store_true", help="skip text centring over the classes")
    p.add_argument("--stats", default=None,
                   help="dataset statistics file (nha_plugin.stats.DatasetStats) whose pc0_sign orients the pairs")
    p.add_argument("--preset", default="nha", choices=("nha", "paper"),
                   help="nha: bias shared by attention, the sink cell's cosines interpolated; paper: the NAD paper's "
                        "code (uniform bias share, the sink cell's contribution vectors interpolated; needs --stats "
                        "for the PC0 signs; window = the model's input size, stride half)")
    p.add_argument("--bias-share", default=None, choices=("attention", "uniform"),
                   help="head maps' share of the output bias: a[h,m] b_o / H (attention, the nha preset's) or "
                        "b_o / (H T) (uniform, the paper's); default: the preset's")
    p.add_argument("--sink", default=None, choices=("interpolate", "keep", "drop"),
                   help="attention-sink cell (the last one): interpolate (both presets), keep or drop (zero)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64"),
                   help="model precision (the head-map Gram products need at least fp32)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per forward pass")
    p.add_argument("--show", type=int, default=6, help="images in predictions.png")
    p.add_argument("--out", default="segment_out", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard the run saved in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class UsageError(ValueError):
    """A mistake in the command line of ``nha segment``: reported as one line, exit status 2."""


def pair_signs(path: str, model):
    """The PC0 sign of every pair from a statistics file, checked against ``model``.

    Args:
        path: a file of :meth:`nha_plugin.stats.DatasetStats.save`.
        model: the CLIP model the statistics must belong to.

    Returns:
        (H, C) tensor of +-1.
    """
    import torch
    from ..stats import DatasetStats
    return torch.as_tensor(DatasetStats.load(path, model).pc0_sign)


def _check_args(args) -> None:
    """Refuse impossible options before anything is loaded."""
    positive = {"--n": args.n, "--k": args.k, "--stride": args.stride, "--short-side": args.short_side,
                "--batch-size": args.batch_size}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1; got {value}")
    if args.crop is not None and (args.crop < 32 or args.crop % 32):
        raise UsageError(f"--crop must be a positive multiple of 32 (the ResNet's stride); got {args.crop}")
    if args.show < 0:
        raise UsageError(f"--show must be 0 or more images; got {args.show}")
    if args.preset == "paper" and not args.stats:
        raise UsageError("--preset paper ranks pairs with the PC0 signs from data (the paper's rule): give --stats "
                         "FILE (nha stats writes one)")
    if args.dataset == "pascal-context" and not args.root:
        raise UsageError("--dataset pascal-context needs --root (the folder holding VOCdevkit)")
    if args.templates == "scenes" and args.dataset != "scenes":
        raise UsageError("--templates scenes only applies to --dataset scenes; use imagenet, photo or a file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder (it holds the run and its results)")


def _dataset(args):
    if args.dataset == "scenes":
        from ..applications.segmentation import SceneSegmentation
        n = args.n if args.n is not None else 100
        ds = SceneSegmentation(n, seed=args.seed, background=args.scene_background)
        return ds, (f"generated scenes (nha_plugin.scenes), seed {args.seed} (held out), {n} images, "
                    f"background {args.scene_background}")
    from ..datasets.pascal_context import PascalContext59
    ds = PascalContext59(args.root, split=args.split)
    return ds, f"PASCAL Context-59 {args.split} ({len(ds)} images) at {ds.voc}, background ignored"


def _texts(args, model, tokenizer, ds):
    from ..text.pools import get_templates
    from ..applications.segmentation import class_embeddings
    name = args.templates or ("scenes" if args.dataset == "scenes" else "imagenet")
    if name == "scenes":
        return class_embeddings(model, tokenizer, ds.prompts(), centre=not args.no_centre), "scene caption forms"
    templates = get_templates(name)
    return (class_embeddings(model, tokenizer, list(ds.class_names), templates, centre=not args.no_centre),
            f"{name} ({len(templates)} templates)")


def segment(args: argparse.Namespace) -> int:
    """The work of ``nha segment``; errors propagate (:func:`run` reports the user's as one line)."""
    from ..models import load_clip
    from ..applications.segmentation import (METHODS, METHOD_DESCRIPTIONS, Segmentor, evaluate, plot_examples,
                                             results_markdown)
    from ..files import write_json, write_text
    _check_args(args)
    methods = list(METHODS) if not args.method or "all" in args.method else list(dict.fromkeys(args.method))
    out = Path(args.out)
    start = time.perf_counter()
    ds, data_desc = _dataset(args)
    model, preprocess, tokenizer = load_clip(args.model, args.pretrained, device=args.device,
                                                 precision=args.precision)
    text, text_desc = _texts(args, model, tokenizer, ds)
    signs = pair_signs(args.stats, model) if args.stats else None
    seg = Segmentor(model, text, methods, k=args.k, pair_signs=signs, crop_size=args.crop, stride=args.stride,
                    short_side=args.short_side, preprocess=preprocess, sink=args.sink, bias_share=args.bias_share,
                    batch_size=args.batch_size, preset=args.preset)
    config = {"model": args.model, "pretrained": args.pretrained, "data": data_desc, "templates": text_desc,
              "centre": not args.no_centre, "k": seg.k, "crop": seg.crop_size, "stride": seg.stride,
              "short_side": seg.short_side, "preset": seg.preset, "sink": seg.sink, "bias_share": seg.bias_share,
              "sink_space": seg.sink_space, "stats": args.stats, "precision": args.precision}
    result = evaluate(seg, ds, n=args.n, show=args.show, run_dir=out, fresh=args.fresh, config=config,
                      progress=not args.quiet)
    seconds = time.perf_counter() - start
    protocol = [f"model: {args.model} (pretrained={args.pretrained}); H={seg.spec.num_heads} heads x "
                f"C={seg.spec.num_neurons} neurons",
                f"data: {data_desc}; {result['n']} images scored",
                f"class texts: {len(ds.class_names)} classes, {text_desc}, "
                f"{'centred over the classes' if not args.no_centre else 'not centred'}",
                f"k = {seg.k} pairs per class; pair signs: {args.stats or '+1 (no statistics file)'}; "
                f"preset {seg.preset}: head-map bias share {seg.bias_share}; sink {seg.sink} (on the "
                f"{'contribution vectors' if seg.sink_space == 'contributions' else 'maps'})",
                f"sliding window: crop {seg.crop_size}, stride {seg.stride}, short side resized to {seg.short_side}; "
                "overlaps averaged; logits resized bilinearly to the label; argmax",
                "mIoU over classes with a non-empty union (dataset-level confusion matrix); pixAcc over labelled "
                f"pixels{'; background ignored' if result['no_background'] else ''}",
                f"wall time {seconds:.1f} s on {args.device}"]
    md = results_markdown(result, f"nha segment: {args.model} on {args.dataset}", protocol)
    scores = {m: s["miou"] for m, s in result["methods"].items()}
    png = None
    if result["examples"]:
        try:
            png = plot_examples(result["examples"], result["class_names"], out / "predictions.png",
                                result["ignore_index"], scores)
        except ImportError:
            print("predictions.png skipped: plotting needs matplotlib (pip install 'nha-plugin[demo]')")
    summary = {k: v for k, v in result.items() if k != "examples"}
    summary.update(config=config, protocol=protocol, seconds=seconds, descriptions=METHOD_DESCRIPTIONS)
    write_json(out / "results.json", summary)
    write_text(out / "results.md", md)
    print(md)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}" + (f"; figure: {png}" if png else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``nha segment`` from parsed ``args``: prints the table and writes the files.

    Returns:
        0, or 2 after printing a user error as one line to stderr (``NHA_DEBUG=1``: raised), through
        :func:`nha_plugin.cli.common.dispatch`.
    """
    try:
        return dispatch("segment", segment, args)
    except ValueError as err:
        # A refused setting (UsageError, the library's ValueError on an option, mismatching statistics) is a user
        # mistake too; printed by the dispatcher's own reporter until cli.common.user_errors lists ValueError.
        if os.environ.get("NHA_DEBUG"):
            raise
        return report_user_error("segment", err)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nha segment`` on its own: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run`."""
    parser = argparse.ArgumentParser(prog="nha segment", description=__doc__.split("\n\nWrites")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
