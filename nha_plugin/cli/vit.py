"""``nha textspan`` and ``nha spurious``: TextSpan on CLIP-ViT heads and spurious-feature removal.

    nha textspan --model scenes-vit --n 400 --m 20 --out textspan_vit.json
    nha textspan --model ViT-B-16 --pretrained openai --dataset waterbirds --path WB --pool words:10000 --out ts.json
    nha spurious --model scenes-vit --out spurious_scenes.json             # planted label<->background scenes
    nha spurious --model ViT-L-14 --pretrained openai --dataset waterbirds --path WB --pool FILE --out wb.json

Each writes a JSON file, a Markdown summary and a PNG next to it (atomically). ``--parts DIR`` keeps each
batch's head contributions in run folders keyed on the settings, the images and the weights, so a killed run
resumes; parts of another run are refused (one line, exit 2) and ``--fresh`` discards them.

Wire into ``nha`` with :func:`add_parser` (adds both sub-commands) and dispatch with :func:`run`; :func:`main`
runs them stand-alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .. import files, runs
from ..markup import md_cell, md_row
from .common import (UsageError, check_choices, check_folder, check_output_file, check_pool, command_help, doc_body,
                     load_model, non_negative_int, positive_int, recorded_command, standalone_main)

__all__ = ["add_parser", "run", "main", "textspan_report", "default_pool"]

DEFAULT_MODEL = "scenes-vit"


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 1,2,4; got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1; got {text!r}")
    return values


def _fractions(text: str) -> List[float]:
    try:
        values = [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.95,1; got {text!r}") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected shares in [0, 1]; got {text!r}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a load_clip name: scenes-vit (bundled planted-concept "
                                                          "ViT), an open_clip ViT (ViT-B-16), hf-hub:..., a file")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled weights for "
                                                      "scenes-vit, random initialisation otherwise)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64"), help="model dtype (fp64 for exactness)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dataset", default="scenes", choices=("scenes", "waterbirds"),
                   help="scenes: generated scenes; waterbirds: the Waterbirds folder given by --path")
    p.add_argument("--path", default=None,
                   help="Waterbirds folder (holding metadata.csv) for --dataset waterbirds (default: none)")
    p.add_argument("--layers", type=positive_int, default=4, help="analyse the heads of the last N layers")
    p.add_argument("--m", type=positive_int, default=20, help="TextSpan texts per head")
    p.add_argument("--rank", type=positive_int, default=80, help="r, singular directions the texts are projected on")
    p.add_argument("--pool", default=None,
                   help="text pool: words | words:N | imagenet | scenes | FILE (one text per line), joined with +; "
                        "default: single-concept scene descriptions for scenes-* models, else words (30k words)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--seed", type=non_negative_int, default=0, help="data seed (and the random-head baseline's)")
    p.add_argument("--parts", default=None,
                   help="folder for per-batch results, so a killed run resumes (default: none, nothing kept)")
    p.add_argument("--fresh", action="store_true", help="discard the per-batch results of an earlier run in --parts")
    p.add_argument("--cache-dir", default=None, help="text-embedding cache (default $NHA_CACHE_DIR)")
    p.add_argument("--out", required=True, help="output JSON; a .md summary and a .png go next to it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers):
    """Add ``textspan`` and ``spurious`` to an argparse subparsers object; returns the two parsers."""
    body = doc_body(__doc__)
    t = subparsers.add_parser("textspan", help=command_help("textspan"), description=body)
    _common(t)
    t.add_argument("--n", type=positive_int, default=400,
                   help="images (scenes: generated; waterbirds: seeded subset)")
    t.add_argument("--split", default="val", choices=("train", "val", "test"),
                   help="Waterbirds split for --dataset waterbirds")
    t.add_argument("--ms", type=_ints, default=[1, 2, 4, 8, 16, 20],
                   help="comma-separated m values for the reconstruction accuracy (default: 1,2,4,8,16,20)")
    s = subparsers.add_parser("spurious", help=command_help("spurious"), description=body)
    _common(s)
    s.add_argument("--labels", type=_csv, default=["cat", "rocket"],
                   help="scenes: label values, comma-separated (default: cat,rocket)")
    s.add_argument("--backgrounds", type=_csv, default=["grass", "brick"],
                   help="scenes: the background tied to each label (default: grass,brick)")
    s.add_argument("--attribute", default="category", choices=("category", "shape", "colour"),
                   help="scenes: the attribute the labels are values of")
    s.add_argument("--train-strengths", type=_fractions, default=[0.95, 1.0],
                   help="scenes: shares of training images showing a label on its own background, one biased "
                        "training set and probe each (default 0.95,1.0)")
    s.add_argument("--n-train", type=positive_int, default=400, help="scenes: biased training images")
    s.add_argument("--n-test", type=positive_int, default=None,
                   help="test images (scenes default 400; waterbirds: all)")
    s.add_argument("--n-textspan", type=positive_int, default=None,
                   help="images for TextSpan (scenes: generic scenes, default 400; waterbirds: training images, "
                        "default 1000, also the ablation means)")
    s.add_argument("--keywords", type=_csv, default=None,
                   help="place words (default: the scene backgrounds + 'background'; Waterbirds: a place list)")
    s.add_argument("--threshold", type=float, default=0.5, help="min share of a head's explained variance from "
                                                                "place texts")
    s.add_argument("--min-relative-variance", type=float, default=0.1,
                   help="min place variance relative to the strongest place head")
    s.add_argument("--max-heads", type=positive_int, default=None,
                   help="ablate at most this many place heads (default: no limit)")
    s.add_argument("--n-random", type=positive_int, default=10, help="heads per random draw (paper: 10)")
    s.add_argument("--n-sets", type=positive_int, default=5, help="random draws; the best is reported (paper: 5)")
    s.add_argument("--ablate-early", action="store_true",
                   help="also mean-ablate every head before the analysed layers, in every arm")
    return t, s


def default_pool(model_name: str, pool: Optional[str]):
    """(texts, description): the scene descriptions for ``scenes-*`` models, else :func:`text.get_pool`."""
    from ..text.pools import get_pool
    if pool is None and model_name.startswith("scenes-"):
        from ..applications.spurious import scene_description_pool
        texts = scene_description_pool()
        return texts, f"{len(texts)} single-concept scene descriptions (no templates)"
    spec = pool or "words"
    texts = get_pool(spec)
    return texts, f"{spec}: {len(texts)} texts (no templates)"


def _stamp_protocol(res: dict, args: argparse.Namespace, model) -> None:
    """Record in ``res["protocol"]`` the model, the parsed arguments and the image tower's weights fingerprint
    (:func:`nha_plugin.runs.module_fingerprint`)."""
    res["protocol"].update(model=args.model, pretrained=args.pretrained, precision=args.precision,
                           command=recorded_command(args),
                           arguments={k: v for k, v in vars(args).items() if k not in ("func", "argv")},
                           image_tower_sha256=runs.module_fingerprint(getattr(model, "visual", model)))


def _finish_plot(fig, ax, title: str, path: Path) -> None:
    """Title and legend, then write the PNG atomically (:func:`nha_plugin.files.save_figure`) and close it."""
    import matplotlib.pyplot as plt
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(path, fig, dpi=120)
    plt.close(fig)


def _check_args(args) -> None:
    """Refuse impossible options before anything is loaded."""
    if args.dataset == "waterbirds":
        if not args.path:
            raise UsageError(f"nha {args.command} --dataset waterbirds needs --path to the Waterbirds folder "
                             "(holding metadata.csv)")
        check_folder("--path", args.path, "the Waterbirds folder (holding metadata.csv)")
    elif args.path:
        raise UsageError("--path is read by --dataset waterbirds only; --dataset scenes generates its images")
    elif args.command == "spurious":
        from .. import scenes
        values = {"category": scenes.CATEGORIES, "shape": scenes.SHAPES, "colour": scenes.COLOURS}[args.attribute]
        check_choices("--labels", args.labels, values, args.attribute)
        check_choices("--backgrounds", args.backgrounds, scenes.BACKGROUNDS, "background")
        if len(args.labels) != len(args.backgrounds) or len(args.labels) < 2:
            raise UsageError(f"give as many --backgrounds as --labels, at least two ({len(args.labels)} labels, "
                             f"{len(args.backgrounds)} backgrounds)")
    check_pool("--pool", args.pool)
    check_output_file("--out", args.out)
    if args.parts is not None and Path(args.parts).exists() and not Path(args.parts).is_dir():
        raise UsageError(f"--parts {args.parts} is a file; give a folder (created if missing)")


def _load(args):
    import torch

    from .. import vit
    _check_args(args)
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, args.pretrained, family="vit", device=args.device, precision=args.precision)
    vit.vit_spec(loaded[0])          # a CLIP-ResNet given as a file is refused here, pointing to the ResNet commands
    return loaded


# ---- textspan ---------------------------------------------------------------------------------------------
def textspan_report(model, tokenizer, *, preprocess=None, dataset: str = "scenes", path: Optional[str] = None,
                    split: str = "val", n: int = 400, layers=4, m: int = 20, rank: int = 80,
                    ms: Sequence[int] = (1, 2, 4, 8, 16, 20), pool: Sequence[str] = (), pool_desc: str = "",
                    seed: int = 0, batch_size: int = 32, parts_dir: Optional[str] = None, fresh: bool = False,
                    cache_dir=None, progress: bool = True) -> dict:
    """TextSpan of the last ``layers`` layers' heads over ``n`` images and the reconstruction accuracies.

    Scenes: generated scenes (seed ``seed + 8_000_001``), label = class of the largest object, zero-shot read-out
    over the 10 shape/category names ("a photo of a {}."). Waterbirds: a seeded subset of ``split``, label =
    bird type, read-out "a photo of a landbird." / "a photo of a waterbird.". ``parts_dir``: a run folder
    for the head contributions (see :func:`~nha_plugin.vit.textspan_heads.collect_head_statistics`), ``fresh``
    discards the one there.
    """
    import numpy as np

    from ..applications.spurious import class_directions
    from ..text.cache import embed_texts
    from ..vit.inputs import images_to_input, input_size
    from ..vit.textspan_heads import collect_head_statistics, head_text_spans, reconstruction_report

    param = next(model.parameters())
    size = input_size(model)
    if dataset == "scenes":
        from ..scenes import CATEGORIES, SHAPES, SceneDataset
        classes = list(SHAPES) + list(CATEGORIES)
        scenes = SceneDataset(n, seed=seed + 8_000_001)
        labels = [classes.index(max(scenes[i].objects, key=lambda o: int(o.mask.sum())).name) for i in range(n)]

        def source(a, b):
            return images_to_input(np.stack([scenes[i].image for i in range(a, b)]), size, param.dtype,
                                   param.device, preprocess)
        data_desc = f"{n} generated scenes (seed {seed + 8_000_001}); label = class of the largest object"
    elif dataset == "waterbirds":
        from ..datasets.waterbirds import CLASS_NAMES, WaterbirdsDataset
        if not path:
            raise ValueError("--dataset waterbirds needs --path to the Waterbirds folder (holding metadata.csv)")
        ds = WaterbirdsDataset(path, split, size=size[0])
        idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
        classes, labels, n = list(CLASS_NAMES), ds.labels[idx].tolist(), len(idx)

        def source(a, b):
            return images_to_input(ds.images(idx[a:b]), size, param.dtype, param.device, preprocess)
        data_desc = f"Waterbirds {path} split {split}: {n} images (seeded subset, seed {seed}); label = bird type"
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected scenes or waterbirds")
    stats = collect_head_statistics(model, source, n, layers=layers, batch_size=batch_size, labels=labels,
                                    parts_dir=parts_dir, fresh=fresh, progress=progress,
                                    meta={"data": data_desc, "path": str(path), "split": split})
    emb = embed_texts(model, tokenizer, list(pool), None, cache_dir=cache_dir, progress=progress)
    spans = head_text_spans(stats, emb, list(pool), m=m, rank=rank, progress=progress)
    w = class_directions(model, tokenizer, [f"a photo of a {c}." for c in classes])
    acc = reconstruction_report(stats, spans, w, stats.labels, ms=ms)
    heads = [s.to_json() for s in spans]
    for h in heads:
        h["variance_explained"] = h["explained"][-1] if h["explained"] else 0.0
    return {"protocol": {"data": data_desc, "classes": classes, "readout": "zero-shot, 'a photo of a {}.', argmax "
                                                                           "cos", "layers": stats.layers,
                         "num_layers": stats.num_layers, "heads_per_layer": stats.num_heads, "m": m,
                         "rank": spans[0].rank if spans else None, "pool": pool_desc or f"{len(pool)} texts",
                         "reconstruction": "analysed heads -> mean + projection of their centred contribution on the "
                                           "span of their first m texts; heads of other layers mean-ablated; MLPs "
                                           "and the input embedding intact; direct effects (LN_post frozen)"},
            "accuracy": acc, "heads": heads}


def _bullets(items) -> List[str]:
    """Markdown bullets ``- key: value`` with every value escaped (:func:`nha_plugin.markup.md_cell`)."""
    return [f"- {key}: {md_cell(value)}" for key, value in items]


def _textspan_markdown(res: dict, title: str) -> str:
    p, a = res["protocol"], res["accuracy"]
    lines = [f"# {md_cell(title)}", ""]
    lines += _bullets([("command", p.get("command", "")), ("data", p["data"]),
                       ("read-out", f"{p['readout']} over {len(p['classes'])} classes"),
                       ("heads", f"layers {p['layers']} of {p['num_layers']} x {p['heads_per_layer']} heads; "
                                 f"m = {p['m']}, r = {p['rank']}; pool: {p['pool']}"),
                       ("reconstruction", p["reconstruction"])])
    rows = [("original", a["original"]), ("analysed heads only (others mean-ablated)", a["analysed_heads_only"])]
    rows += [(f"TextSpan m = {m}", v) for m, v in a["textspan"].items()]
    rows += [("all heads mean-ablated", a["all_heads_mean_ablated"]),
             ("earlier layers' heads mean-ablated", a["early_layers_mean_ablated"])]
    rows += [(f"layer {layer} heads mean-ablated", v) for layer, v in a["layer_mean_ablated"].items()]
    lines += ["", "| setting | accuracy |", "|---|---|"] + [md_row([name, f"{v:.3f}"]) for name, v in rows]
    lines += ["", "| head | variance explained | first texts |", "|---|---|---|"]
    for h in res["heads"]:
        lines.append(md_row([h["unit"], f"{h['variance_explained']:.3f}", "; ".join((h["texts"] or [])[:5])]))
    return "\n".join(lines) + "\n"


def _textspan_plot(res: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = res["accuracy"]
    ms = [int(m) for m in a["textspan"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ms, list(a["textspan"].values()), "o-", label="TextSpan reconstruction")
    for key, style, name in (("original", "k--", "original"), ("analysed_heads_only", "g:", "analysed heads only"),
                             ("all_heads_mean_ablated", "r:", "all heads mean-ablated")):
        ax.axhline(a[key], color=style[0], linestyle=style[1:], label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("texts per head (m)")
    ax.set_ylabel("accuracy")
    _finish_plot(fig, ax, title, path)


def _run_textspan(args) -> int:
    model, preprocess, tokenizer = _load(args)
    pool, desc = default_pool(args.model, args.pool)
    res = textspan_report(model, tokenizer, preprocess=preprocess, dataset=args.dataset, path=args.path,
                          split=args.split, n=args.n, layers=args.layers, m=args.m, rank=args.rank, ms=args.ms,
                          pool=pool, pool_desc=desc, seed=args.seed, batch_size=args.batch_size, parts_dir=args.parts,
                          fresh=args.fresh, cache_dir=args.cache_dir, progress=not args.quiet)
    _stamp_protocol(res, args, model)
    title = f"TextSpan on {args.model} heads"
    _write(args.out, res, _textspan_markdown(res, title), lambda p: _textspan_plot(res, p, title))
    a = res["accuracy"]
    print(f"{title}: original {a['original']:.3f}; analysed heads only {a['analysed_heads_only']:.3f}; "
          + ", ".join(f"m={m}: {v:.3f}" for m, v in a["textspan"].items())
          + f"; all heads mean-ablated {a['all_heads_mean_ablated']:.3f}")
    return 0


# ---- spurious ---------------------------------------------------------------------------------------------
def _spurious_markdown(res: dict, title: str) -> str:
    p = res["protocol"]
    lines = [f"# {md_cell(title)}", ""]
    lines += _bullets([("command", p.get("command", "")), ("data", p["dataset"])])
    lines += _bullets([(key, p[key] if isinstance(p[key], str) else json.dumps(p[key]))
                       for key in ("labels", "backgrounds", "train", "test", "textspan_and_means", "textspan",
                                   "selection", "ablation", "random_baseline") if key in p])
    heads = ", ".join(f"L{layer}H{h}" for layer, h in res["selected_heads"]) or "none"
    lines += ["", f"Selected place heads: {heads}", "",
              "| read-out | worst before | worst after | random 10: best worst | random matched: best worst | "
              "avg before | avg after | overall before | overall after |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["readouts"].items():
        before, after = r["before"], r["after"]
        lines.append(md_row([name, f"{before['worst']:.3f} ({before['worst_group']})",
                             f"{after['worst']:.3f} ({after['worst_group']})", f"{r['random']['best']['worst']:.3f}",
                             f"{r['random_matched']['best']['worst']:.3f}", f"{before['average']:.3f}",
                             f"{after['average']:.3f}", f"{before['overall']:.3f}", f"{after['overall']:.3f}"]))
    lines += ["", "| head | place score | place variance | first texts |", "|---|---|---|---|"]
    for d in res["head_scores"][:12]:
        lines.append(md_row([f"L{d['layer']}H{d['head']}", f"{d['score']:.2f}", f"{d['place_variance']:.3g}",
                             "; ".join(d["texts"][:5])]))
    return "\n".join(lines) + "\n"


def _spurious_plot(res: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(res["readouts"])
    arms = [("before", lambda r: r["before"]["worst"]), ("place heads ablated", lambda r: r["after"]["worst"]),
            ("random 10 (best of draws)", lambda r: r["random"]["best"]["worst"]),
            ("random, matched size (best)", lambda r: r["random_matched"]["best"]["worst"])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    for i, (label, get) in enumerate(arms):
        ax.bar(x + (i - 1.5) * 0.2, [get(res["readouts"][n]) for n in names], 0.2, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("worst-group accuracy")
    ax.set_ylim(0, 1)
    _finish_plot(fig, ax, title, path)


def _run_spurious(args) -> int:
    from ..applications import spurious
    model, preprocess, tokenizer = _load(args)
    common = dict(preprocess=preprocess, layers=args.layers, m=args.m, rank=args.rank, threshold=args.threshold,
                  min_relative_variance=args.min_relative_variance, max_heads=args.max_heads, keywords=args.keywords,
                  n_random=args.n_random, n_sets=args.n_sets, seed=args.seed, ablate_early=args.ablate_early,
                  batch_size=args.batch_size, progress=not args.quiet, parts_dir=args.parts, fresh=args.fresh,
                  cache_dir=args.cache_dir)
    if args.dataset == "scenes":
        pool = None
        if args.pool is not None or not args.model.startswith("scenes-"):
            pool = default_pool(args.model, args.pool)[0]
        res = spurious.scenes_experiment(model, tokenizer, labels=args.labels, backgrounds=args.backgrounds,
                                         attribute=args.attribute, train_strengths=args.train_strengths,
                                         n_train=args.n_train, n_test=args.n_test or 400,
                                         n_textspan=args.n_textspan or 400, pool=pool, **common)
    else:
        pool, desc = default_pool(args.model, args.pool)
        res = spurious.waterbirds_experiment(model, tokenizer, args.path, n_textspan=args.n_textspan or 1000,
                                             n_test=args.n_test, pool=pool, pool_desc=desc, **common)
    _stamp_protocol(res, args, model)
    title = f"Spurious-feature removal on {args.model} ({args.dataset})"
    _write(args.out, res, _spurious_markdown(res, title), lambda p: _spurious_plot(res, p, title))
    for name, r in res["readouts"].items():
        print(f"{name}: worst-group {r['before']['worst']:.3f} -> {r['after']['worst']:.3f} after ablating "
              f"{len(res['selected_heads'])} place heads; random {r['random']['k']} heads best "
              f"{r['random']['best']['worst']:.3f}; size-matched random best "
              f"{r['random_matched']['best']['worst']:.3f}")
    return 0


def _write(out: str, res: dict, md: str, plot) -> None:
    """The result as JSON at ``out``, ``md`` next to it (``.md``) and ``plot(path)``'s PNG (``.png``)."""
    path = Path(out)
    files.write_json(path, res, indent=1)
    files.write_text(path.with_suffix(".md"), md)
    plot(path.with_suffix(".png"))


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``textspan`` or ``spurious`` command; returns 0 (parts in ``--parts`` of another run, or
    damaged ones: one line and 2, by :func:`nha_plugin.cli.common.dispatch`)."""
    return _run_textspan(args) if args.command == "textspan" else _run_spurious(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m nha_plugin.cli.vit textspan|spurious ...``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
