"""``nha neurons``: second-order effects of CLIP-ViT MLP neurons (docs/methods.md §3) on a model and a dataset.

    nha neurons stats       --model scenes-vit --layer 1 --n-images 2000         # streamed, resumable
    nha neurons describe    --model scenes-vit --layer 1 --top 10 --omp-k 128    # OMP words of each PC1
    nha neurons ablate      --model scenes-vit --layer 1 --eval-images 500       # zero-shot accuracy
    nha neurons segment     --model scenes-vit --seg-layers 0 1 2 --top-neurons 200 [--imagenet-seg FILE]
    nha neurons adversarial --model scenes-vit --eval-images 500                 # word selection + compositing
    nha neurons all         --model scenes-vit --out benchmarks/results/second_order_vit   # everything, JSON+MD

Statistics (mean, top-k centred norms, PC1, significance threshold) are computed on held-out generated scenes
(seed 424242, the training distribution) and cached per layer under ``--stats-dir`` in checkpoints keyed on the
settings and the weights: an interrupted run resumes, a checkpoint of other settings is refused (exit 2) and
``--fresh`` recomputes it. Evaluation uses single-object scenes (seed 12345) with exact object masks; the
zero-shot classes are the 5 shapes and 5 photo categories of the scenes (``"a photo of a {}."``).
``--imagenet-seg gtsegs_ijcv.mat`` runs the segmentation on ImageNet-Segmentation instead (docs/methods.md §2
protocol; needs h5py and a model whose classes are ImageNet's: pass ``--classes imagenet``).

The experiments live in :mod:`nha_plugin.applications.second_order`; this module parses and orchestrates.
Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .. import files
from ..applications import second_order as so
from .common import (UsageError, check_file, check_output_file, check_pool, check_templates, command_help,
                     doc_body, load_model, non_negative_int, positive_int, recorded_command, standalone_main)

__all__ = ["add_parser", "run", "main", "ACTIONS"]

ACTIONS = ("stats", "describe", "ablate", "segment", "adversarial", "all")
DEFAULT_MODEL = "scenes-vit"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``neurons`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("neurons", help=command_help("neurons"), description=doc_body(__doc__))
    p.add_argument("action", choices=ACTIONS, help="what to run ('all': everything, written to --out)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="scenes-vit (bundled) or an open_clip ViT name")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled weights for "
                                                      "scenes-vit, random initialisation otherwise)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64"), help="model dtype")
    p.add_argument("--layer", type=non_negative_int, default=None,
                   help="layer whose neurons are studied (default L-3, the paper's layer 9 of 12 analogue)")
    p.add_argument("--seg-layers", type=non_negative_int, nargs="+", default=None,
                   help="layers for segmentation and adversarial words (default L-4..L-2, the paper's 8-10)")
    p.add_argument("--n-images", type=positive_int, default=2000, help="scenes for the statistics")
    p.add_argument("--k", type=positive_int, default=100,
                   help="top images per neuron (PC1 fit, significance threshold)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--eval-images", type=positive_int, default=500, help="held-out single-object scenes for evaluation")
    p.add_argument("--stats-dir", default=None, help="statistics cache (default ./nha_neurons/<model>)")
    p.add_argument("--fresh", action="store_true", help="recompute the statistics even if --stats-dir holds them "
                                                        "(also those of other settings or weights)")
    p.add_argument("--pool", default=None, help="word pool for OMP (default: scenes for scenes-vit, else words)")
    p.add_argument("--templates", default="photo", help="templates for the word pool (photo | imagenet | none)")
    p.add_argument("--omp-k", type=positive_int, default=128, help="OMP atoms per neuron (capped at D and the pool)")
    p.add_argument("--top", type=positive_int, default=10, help="describe: neurons shown (by importance)")
    p.add_argument("--neuron", type=non_negative_int, action="append", default=[],
                   help="describe: these neurons (repeatable; default: the --top most important)")
    p.add_argument("--top-neurons", type=positive_int, default=200, help="segment: neurons per class")
    p.add_argument("--imagenet-seg", default=None,
                   help="segment: gtsegs_ijcv.mat instead of scenes (default: none, scenes)")
    p.add_argument("--classes", default="scenes", choices=("scenes", "imagenet"),
                   help="scenes (shapes + photo categories) | imagenet")
    p.add_argument("--adv-neurons", type=positive_int, default=20, help="adversarial: aligned neurons kept")
    p.add_argument("--adv-words", type=positive_int, default=2, help="adversarial: words pasted per image")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md (default: none, print)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before loading (random-init models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---- loading ----------------------------------------------------------------------------------------------
def _load_model(name: str, pretrained: Optional[str], device: str, precision: str):
    """(model, tokenizer); a seam tests replace with a tiny model. For a bundled model (``scenes-vit``),
    ``pretrained`` may name another weights file of the same architecture (e.g. a training run's export)."""
    from ..models import PRECISIONS
    from ..zoo import MODELS, load_zoo_model
    if name in MODELS and pretrained is not None:
        check_file("--pretrained", pretrained, f"a weights file of the {name} architecture")
        model, _, tokenizer = load_zoo_model(name, weights=pretrained)
        return model.to(device=device, dtype=PRECISIONS[precision]).eval(), tokenizer
    model, _, tokenizer = load_model(name, pretrained, family="vit", device=device, precision=precision)
    return model, tokenizer


def _classes(which: str) -> List[str]:
    if which == "imagenet":
        from ..text.pools import imagenet_classes
        return imagenet_classes()
    from ..scenes import CATEGORIES, SHAPES
    return [*SHAPES, *CATEGORIES]


def _weights_hash(name: str, pretrained: Optional[str]) -> Optional[str]:
    """sha256 (first 16 hex digits) of the weights file a result came from, when there is one."""
    import hashlib

    from ..zoo import MODELS, weights_path, zoo_config
    path = Path(pretrained) if pretrained and Path(pretrained).is_file() else (
        weights_path(zoo_config(name)) if name in MODELS else None)
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _layers(args, L: int) -> tuple:
    """(the studied layer, the segmentation/adversarial layers) from the arguments and the model's L layers."""
    if L < 2:
        raise UsageError(f"the model has {L} layer; second-order effects need at least 2")
    layer = args.layer if args.layer is not None else max(0, L - 3)
    seg_layers = args.seg_layers if args.seg_layers is not None else list(range(max(0, L - 4), L - 1))
    for lay in [layer, *seg_layers]:
        if not 0 <= lay < L - 1:
            raise UsageError(f"layer {lay} has no later attention layer; use --layer / --seg-layers 0..{L - 2}")
    return layer, seg_layers


def _check_args(args) -> None:
    """Refuse impossible options before anything is loaded."""
    if args.k > args.n_images:
        raise UsageError(f"--k {args.k} exceeds --n-images {args.n_images}")
    needs_scenes = args.action in ("ablate", "adversarial", "all") or (args.action == "segment"
                                                                       and not args.imagenet_seg)
    if needs_scenes and args.classes != "scenes":
        raise UsageError("ablation, adversarial images and scene segmentation are evaluated on generated scenes, "
                         "labelled with the scenes classes: use --classes scenes (or segment --imagenet-seg FILE "
                         "--classes imagenet)")
    if args.imagenet_seg:
        if args.action not in ("segment", "all"):
            raise UsageError(f"--imagenet-seg is read by the segment and all actions, not {args.action}")
        check_file("--imagenet-seg", args.imagenet_seg, "gtsegs_ijcv.mat, the ImageNet-Segmentation file")
    check_pool("--pool", args.pool)
    check_templates("--templates", args.templates)
    if args.out is not None:
        check_output_file("--out", str(Path(args.out).with_suffix(".json")))


# ---- the command ------------------------------------------------------------------------------------------
def _segment(args, spec, pcs: dict, scenes: tuple, rows: torch.Tensor) -> dict:
    """The ``segment`` step: neurons selected by PC1 alignment against random neurons, on scenes or ImageNet-S."""
    if args.imagenet_seg:
        from ..datasets.imagenet_s import load_imagenet_segmentation
        seg_images, seg_masks = load_imagenet_segmentation(args.imagenet_seg, n=args.eval_images,
                                                           size=int(spec.image_size[0]), progress=not args.quiet)
        dataset = f"ImageNet-Segmentation ({len(seg_images)} images)"
    else:
        seg_images, seg_masks, dataset = scenes[0], scenes[2], f"scenes, object masks ({len(scenes[0])} images)"
    selected = so.select_segmentation_neurons(pcs, rows, args.top_neurons)
    control = so.random_neurons(pcs, selected, seed=args.seed)
    plot = Path(args.out).with_name(Path(args.out).name + "_segmentation.png") if args.out else None
    seg = so.evaluate_segmentation(spec, selected, seg_images, seg_masks, rows, args.batch_size, control,
                                   plot_path=plot, progress=not args.quiet)
    return {"dataset": dataset, "layers": list(pcs), "top_neurons": len(selected[0]), **seg}


def _run(args) -> int:
    from ..readout import ZeroShotClassifier
    from ..text.describe import build_dictionary
    from ..vit import vit_spec
    from ..vit.second_order import second_order_directions
    from ..applications.adversarial import describe_neurons
    t0 = time.time()
    _check_args(args)
    torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args.model, args.pretrained, args.device, args.precision)
    spec = vit_spec(model)
    layer, seg_layers = _layers(args, spec.layers)
    act = args.action
    needs_scenes = act in ("ablate", "adversarial", "all") or (act == "segment" and not args.imagenet_seg)
    args.stats_dir = args.stats_dir or str(Path("nha_neurons") / args.model.replace("/", "_"))
    args.pool = args.pool or ("scenes" if args.model == "scenes-vit" else "words")
    classes = _classes(args.classes)
    rows = ZeroShotClassifier(model, tokenizer, classes, templates=("a photo of a {}.",)).readout.detach().cpu()
    result = {"model": args.model, "command": recorded_command(args),
              "layers": spec.layers, "layer": layer, "neurons": spec.mlp_width,
              "K": (spec.layers - layer - 1) * spec.heads, "n_images": args.n_images, "k": args.k,
              "classes": classes, "weights_sha256": _weights_hash(args.model, args.pretrained)}
    needed = [layer] + (seg_layers if act in ("segment", "adversarial", "all") else [])
    all_stats = so.scene_statistics(spec, needed, args.n_images, k=args.k, batch_size=args.batch_size,
                                    path=so.stats_path(args.stats_dir, needed, args.n_images, args.k),
                                    fresh=args.fresh, progress=not args.quiet)
    stats = all_stats[layer]
    result["pc1"] = so.pc_summary(stats.pc1(second_order_directions(spec, layer).double()))
    if act == "stats":
        print(f"layer {layer}: {stats.count} images, k={stats.k}; PC1 explains (mean over neurons) "
              f"{result['pc1']['explained_topk']['mean']:.3f} of the top-k centred effects, "
              f"{result['pc1']['explained_all']['mean']:.3f} of all images' variance; stats in {args.stats_dir}")
    words = None
    if act in ("describe", "adversarial", "all"):
        words = build_dictionary(model, tokenizer, args.pool, args.templates, cache_dir=None, progress=not args.quiet)
    if act in ("describe", "all"):
        result["describe"] = {"pool": args.pool, **so.describe_layer(spec, stats, layer, words, k=args.omp_k,
                                                                     neurons=args.neuron, top=args.top)}
        if act == "describe":
            for d in result["describe"]["neurons"]:
                print(f"{d['neuron']:>10} [PC1 {d['explained_topk']:.2f}; residual {d['relative_residual']:.2f}] "
                      + ", ".join(f"{w} ({c:+.2f})" for w, c in d["words"]))
    scenes = None
    if needs_scenes:
        scenes = so.eval_scenes(args.eval_images, classes)                 # images, labels, masks
        result["eval_images"] = len(scenes[0])
    if act in ("ablate", "all"):
        result["ablation"] = so.evaluate_ablation(spec, layer, stats, scenes[0], scenes[1], rows, args.batch_size,
                                                  progress=not args.quiet)
        if act == "ablate":
            print(json.dumps(result["ablation"], indent=1))
    pcs = {}
    if act in ("segment", "adversarial", "all"):
        pcs = {lay: all_stats[lay].pc1(second_order_directions(spec, lay).double())["pc1"] for lay in seg_layers}
    if act in ("segment", "all"):
        result["segmentation"] = _segment(args, spec, pcs, scenes, rows)
        if act == "segment":
            print(json.dumps(result["segmentation"], indent=1))
    if act in ("adversarial", "all"):
        codes = {lay: describe_neurons(pc, words, k=args.omp_k)[0] for lay, pc in pcs.items()}
        result["adversarial"] = {"layers": seg_layers, **so.run_adversarial(
            spec, pcs, codes, words.texts, *scenes, rows, classes, top_neurons=args.adv_neurons,
            n_words=args.adv_words, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)}
        if act == "adversarial":
            print(json.dumps(result["adversarial"], indent=1))
    result["seconds"] = time.time() - t0
    if args.out:
        base = Path(args.out)
        files.write_json(base.with_suffix(".json"), result, indent=1)
        files.write_text(base.with_suffix(".md"), so.markdown_report(result))
        print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}")
    elif act == "all":
        print(so.markdown_report(result))
    return 0


def run(args) -> int:
    """Execute a parsed ``neurons`` command; returns 0 (a checkpoint in ``--stats-dir`` of other settings or
    weights, or a damaged one: one line and 2, by :func:`nha_plugin.cli.common.dispatch`)."""
    return _run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m nha_plugin.cli.neurons neurons ...``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
