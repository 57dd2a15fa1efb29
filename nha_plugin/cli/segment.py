"""``nha segment``: training-free semantic segmentation (NAD and its baselines), scored by mIoU / pixAcc.

    nha segment                                             # scenes-rn on 100 held-out generated scenes, all methods
    nha segment --method nad --k 417 --n 500 --out seg_out
    nha segment --model RN50x16 --pretrained openai --dataset pascal-context --root data/VOCdevkit \\
        --method all --stats stats.pt --device cuda         # the paper's protocol (Context-59, no background)

Writes ``results.json``, ``results.md`` and ``predictions.png`` (image, ground truth, each method) to ``--out``; a
killed run resumes from ``segment_state.pt`` there (``--fresh`` discards it). Wire into the ``nha`` parser with
:func:`add_parser` and dispatch with :func:`run`; ``python -m nha_plugin.cli.segment`` runs it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_parser", "configure", "run", "main"]

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
    p.add_argument("--bias-share", default="attention", choices=("attention", "uniform"),
                   help="head maps' share of the output bias: a[h,m] b_o / H (attention) or b_o / (H T) (uniform)")
    p.add_argument("--sink", default="interpolate", choices=("interpolate", "keep"), help="attention-sink cell")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64"),
                   help="model precision (the head-map Gram products need at least fp32)")
    p.add_argument("--batch-size", type=int, default=8, help="crops per forward pass")
    p.add_argument("--show", type=int, default=6, help="images in predictions.png")
    p.add_argument("--out", default="segment_out", help="output folder")
    p.add_argument("--fresh", action="store_true", help="discard a saved partial run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _pair_signs(path: str, model):
    """The PC0 sign of every pair (H, C) from a statistics file, checked against ``model``."""
    import torch
    try:
        from ..stats import DatasetStats
    except ImportError as err:
        raise SystemExit(f"nha segment: --stats needs nha_plugin.stats.DatasetStats, which this install lacks ({err})")
    return torch.as_tensor(DatasetStats.load(path, model).pc0_sign)


def _dataset(args):
    if args.dataset == "scenes":
        from ..applications.segmentation import SceneSegmentation
        n = args.n if args.n is not None else 100
        ds = SceneSegmentation(n, seed=args.seed, background=args.scene_background)
        return ds, (f"generated scenes (nha_plugin.scenes), seed {args.seed} (held out), {n} images, "
                    f"background {args.scene_background}")
    if not args.root:
        raise SystemExit("nha segment: --dataset pascal-context needs --root (the folder holding VOCdevkit)")
    from ..datasets.pascal_context import PascalContext59
    ds = PascalContext59(args.root, split=args.split)
    return ds, f"PASCAL Context-59 {args.split} ({len(ds)} images) at {ds.voc}, background ignored"


def _texts(args, model, tokenizer, ds):
    from ..text.pools import get_templates
    from ..applications.segmentation import class_embeddings
    name = args.templates or ("scenes" if args.dataset == "scenes" else "imagenet")
    if name == "scenes":
        if args.dataset != "scenes":
            raise SystemExit("nha segment: --templates scenes only applies to --dataset scenes")
        return class_embeddings(model, tokenizer, ds.prompts(), centre=not args.no_centre), "scene caption forms"
    templates = get_templates(name)
    return (class_embeddings(model, tokenizer, list(ds.class_names), templates, centre=not args.no_centre),
            f"{name} ({len(templates)} templates)")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Run ``nha segment`` from parsed ``args``; prints the table and writes the files. Returns 0."""
    import nha_plugin as nha
    from ..applications.segmentation import (METHODS, METHOD_DESCRIPTIONS, Segmentor, evaluate, plot_examples,
                               results_markdown)
    methods = list(METHODS) if not args.method or "all" in args.method else list(dict.fromkeys(args.method))
    if args.n is not None and args.n < 1:
        raise SystemExit("nha segment: --n must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "segment_state.pt"
    if args.fresh and state.exists():
        state.unlink()
    start = time.perf_counter()
    ds, data_desc = _dataset(args)
    model, preprocess, tokenizer = nha.load_clip(args.model, args.pretrained, device=args.device,
                                                 precision=args.precision)
    text, text_desc = _texts(args, model, tokenizer, ds)
    signs = _pair_signs(args.stats, model) if args.stats else None
    seg = Segmentor(model, text, methods, k=args.k, pair_signs=signs, crop_size=args.crop, stride=args.stride,
                    short_side=args.short_side, preprocess=preprocess, sink=args.sink, bias_share=args.bias_share,
                    batch_size=args.batch_size)
    config = {"model": args.model, "pretrained": args.pretrained, "data": data_desc, "templates": text_desc,
              "centre": not args.no_centre, "k": seg.k, "crop": seg.crop_size, "stride": seg.stride,
              "short_side": seg.short_side, "sink": args.sink, "bias_share": args.bias_share, "stats": args.stats,
              "precision": args.precision}
    result = evaluate(seg, ds, n=args.n, show=args.show, state_path=state, config=config, progress=not args.quiet)
    seconds = time.perf_counter() - start
    protocol = [f"model: {args.model} (pretrained={args.pretrained}); H={seg.spec.num_heads} heads x "
                f"C={seg.spec.num_neurons} neurons",
                f"data: {data_desc}; {result['n']} images scored",
                f"class texts: {len(ds.class_names)} classes, {text_desc}, "
                f"{'centred over the classes' if not args.no_centre else 'not centred'}",
                f"k = {seg.k} pairs per class; pair signs: {args.stats or '+1 (no statistics file)'}; "
                f"head-map bias share: {args.bias_share}; sink: {args.sink}",
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
    _atomic_text(out / "results.json", json.dumps(summary, indent=2))
    _atomic_text(out / "results.md", md)
    print(md)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}" + (f"; figure: {png}" if png else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nha segment", description=__doc__.split("\n\nWrites")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
