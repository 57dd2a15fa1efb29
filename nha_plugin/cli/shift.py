"""``nha shift``: monitor a concept's share across groups of images with the neuron x head decomposition.

    nha shift                                                    # scenes-rn, "yellow" and "cat", 4 "years"
    nha shift --concept yellow --concept star --n-per-group 200 --seed 0 --seed 1 --out shift_out
    nha shift --model RN50x16 --pretrained openai --dataset stanford-cars --root ~/data/stanford_cars \\
        --colours ~/data/cars_colours.csv --concept yellow --concept convertible \\
        --presence convertible=is_convertible --out cars_shift

Scenes: each concept is planted by ``nha_plugin.scenes.years`` (exact shares per year);
``--concept yellow`` finds the attribute (colour, shape, category, background) or give it: ``colour:yellow``.
Stanford Cars: groups are model years; presence is ``colour label == concept`` unless ``--presence
CONCEPT=COLUMN`` reads a 0/1 column of the colours CSV. Writes ``<name>.json``, ``.md`` and ``.png`` to --out.

Resuming: ``<name>.parts/`` is a run folder (:class:`nha_plugin.runs.RunDir`) keyed by every option that changes
results, the data's identity (a probe of the generated scenes; the Stanford Cars files, sizes and labels) and the
weights' fingerprint. Each (concept, seed) run saves its fit, each group's embeddings and scores, and its result
there as they finish, so a killed run resumes with the same numbers; a folder holding another run is refused
(one line naming each differing field, exit 2) unless ``--fresh`` starts over.

Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .common import (UsageError, check_file, check_folder, check_output_folder, check_templates, command_help,
                     did_you_mean, doc_body, load_model, non_negative_int, positive_int, recorded_command,
                     standalone_main)

__all__ = ["add_parser", "configure", "run", "main"]

DEFAULT_SCENE_CONCEPTS = ("yellow", "cat")


def _floats(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.05,0.15,0.3; got {text!r}") from e


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``shift`` options to a parser."""
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled) or an open_clip CLIP-ResNet (RN50x16)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file (default: bundled weights for "
                                                      "scenes-rn, random initialisation otherwise)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dataset", default="scenes", choices=("scenes", "stanford-cars"),
                   help="scenes: concepts planted in generated scenes; stanford-cars: car photos grouped by year")
    p.add_argument("--concept", action="append", default=[],
                   help="concept to monitor (repeatable); scenes: yellow | cat | colour:yellow ...; "
                        f"default {', '.join(DEFAULT_SCENE_CONCEPTS)} for scenes")
    p.add_argument("--text", action="append", default=[],
                   help="text for each --concept, in order (default: the concept's word)")
    p.add_argument("--shares", type=_floats, default=[0.05, 0.15, 0.3, 0.5],
                   help="scenes: planted share per year (default 0.05,0.15,0.3,0.5)")
    p.add_argument("--n-per-group", type=positive_int, default=200, help="scenes: images per year")
    p.add_argument("--start", type=int, default=2018, help="scenes: first year")
    p.add_argument("--seed", type=non_negative_int, action="append", default=[],
                   help="sampler/permutation/split seed (repeatable: one run per seed; default 0)")
    p.add_argument("--root", default=None,
                   help="stanford-cars: dataset folder, devkit or class-folder layout (default: none)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="stanford-cars split")
    p.add_argument("--colours", default=None,
                   help="stanford-cars: refined colour labels CSV, columns image,colour (default: none)")
    p.add_argument("--presence", action="append", default=[], metavar="CONCEPT=COLUMN",
                   help="stanford-cars: read the concept's presence from a 0/1 column of the colours CSV (repeatable; "
                        "default: the colour label equals the concept)")
    p.add_argument("--min-group-size", type=positive_int, default=20,
                   help="stanford-cars: drop years with fewer images (two-sample tests need a few)")
    p.add_argument("--reference", default=None, help="reference group (default: the first year)")
    p.add_argument("--k", type=positive_int, default=5, help="top pairs per concept")
    p.add_argument("--k-neurons", type=positive_int, default=5, help="top neurons for the neurons-only baseline")
    p.add_argument("--k-heads", type=positive_int, default=1, help="top heads for the heads-only baseline")
    p.add_argument("--templates", default="imagenet", help="imagenet (CLIP's 80) | photo | none | FILE")
    p.add_argument("--stats", default=None,
                   help="pair PC0 signs from a statistics file of this model, written by nha stats (default: none; "
                        "the signs are fitted, see --fit)")
    p.add_argument("--unsigned", action="store_true", help="all pair signs +1 (no data for the signs)")
    p.add_argument("--fit", default=None, choices=("scenes", "reference"),
                   help="images fitting the pair signs and neuron/head PC0s: generic generated scenes (default for "
                        "--dataset scenes) or the reference group (default for stanford-cars)")
    p.add_argument("--fit-images", type=positive_int, default=1000, help="images fitting signs and PC0s")
    p.add_argument("--permutations", type=positive_int, default=500, help="MMD permutations")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--out", default="shift_out", help="output folder")
    p.add_argument("--name", default="shift", help="file stem of the outputs")
    p.add_argument("--fresh", action="store_true",
                   help="discard the saved parts of an earlier run in --out/<name>.parts and start over")
    p.add_argument("--cache-dir", default=None, help="text-embedding cache (default ~/.cache/nha_plugin/text)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``shift`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("shift", help=command_help("shift"), description=doc_body(__doc__))
    configure(p)
    return p


def _scene_vocabulary() -> dict:
    from ..scenes import BACKGROUNDS, CATEGORIES, COLOURS, SHAPES
    return {"colour": COLOURS, "shape": SHAPES, "category": CATEGORIES, "background": BACKGROUNDS}


def scene_concept(concept: str) -> tuple:
    """``"yellow"`` -> ``("colour", "yellow")``; ``"shape:star"`` -> ``("shape", "star")``.

    Raises:
        UsageError: not planted in the scenes (naming the closest concept and every choice).
    """
    vocab = _scene_vocabulary()
    choices = "; ".join(f"{a}: {', '.join(v)}" for a, v in vocab.items())
    if ":" in concept:
        attr, value = concept.split(":", 1)
        if attr not in vocab:
            raise UsageError(f"--concept {concept!r}: unknown attribute {attr!r}{did_you_mean(attr, vocab)}; "
                             f"attributes and values: {choices}")
        if value not in vocab[attr]:
            raise UsageError(f"--concept {concept!r}: {attr} has no value {value!r}"
                             f"{did_you_mean(value, vocab[attr])}; attributes and values: {choices}")
        return attr, value
    hits = [a for a, values in vocab.items() if concept in values]
    if not hits:
        every = [v for values in vocab.values() for v in values]
        raise UsageError(f"--concept {concept!r} is not planted in the scenes{did_you_mean(concept, every)}; "
                         f"choose from {choices}")
    return hits[0], concept


def _concept_texts(args) -> dict:
    if args.text and len(args.text) != len(args.concept):
        raise UsageError(f"give one --text per --concept ({len(args.concept)} concepts, {len(args.text)} texts) "
                         "or none")
    texts = args.text or [c.split(":", 1)[-1] for c in args.concept]
    return dict(zip(args.concept, texts))


def _pair_signs(args, model):
    """The pair signs the monitor uses: None (--unsigned), those of a --stats file of this model, or "fit"."""
    if args.unsigned:
        return None
    if args.stats:
        from ..stats import DatasetStats
        return DatasetStats.load(args.stats, model=model).pc0_sign     # another model's file is refused
    return "fit"


def _presence_columns(args, concepts: dict) -> dict:
    """Check the stanford-cars options before anything loads; returns concept -> CSV column."""
    if not args.root:
        raise UsageError("--dataset stanford-cars needs --root PATH (the Stanford Cars folder)")
    if not args.colours:
        raise UsageError("--dataset stanford-cars needs --colours CSV (the refined colour labels) to read each "
                         "concept's presence")
    check_folder("--root", args.root, "the Stanford Cars folder (devkit or class-folder layout)")
    check_file("--colours", args.colours, "the refined colour labels CSV (columns image,colour)")
    columns = {}
    for item in args.presence:
        concept, sep, column = item.partition("=")
        if not sep or concept not in concepts:
            raise UsageError(f"--presence expects CONCEPT=COLUMN with CONCEPT one of {list(concepts)}; got {item!r}")
        columns[concept] = column
    return columns


def _check_args(args) -> dict:
    """Refuse impossible options before anything is loaded; returns {concept: text}."""
    if args.dataset == "scenes" and not args.concept:
        args.concept = list(DEFAULT_SCENE_CONCEPTS)
    if not args.concept:
        raise UsageError("give at least one --concept")
    concepts = _concept_texts(args)
    if args.stats and args.unsigned:
        raise UsageError("--stats and --unsigned contradict each other; give one")
    check_file("--stats", args.stats, "a statistics file of this model, written by nha stats --out FILE")
    check_templates("--templates", args.templates)
    check_output_folder("--out", args.out)
    if args.dataset == "scenes":
        for c in concepts:
            scene_concept(c)
        if len(args.shares) < 2 or not all(0.0 <= s <= 1.0 for s in args.shares):
            raise UsageError(f"--shares needs at least two values in [0, 1]; got {args.shares}")
    else:
        _presence_columns(args, concepts)
    return concepts


def _cars_data(args, concepts: dict) -> tuple:
    """(the Stanford Cars images to monitor as ShiftData, their identity for the run key)."""
    import numpy as np

    from ..applications.shift import ShiftData
    from ..datasets.stanford_cars import StanfordCars

    columns = _presence_columns(args, concepts)
    ds = StanfordCars(args.root, split=args.split, colours=args.colours)
    rules, presence, keep = {}, {}, np.ones(len(ds), dtype=bool)
    for concept in concepts:
        if concept in columns:
            values = [ds.column(i, columns[concept]) for i in range(len(ds))]
            rules[concept] = f"colours CSV column {columns[concept]!r} is 1/true/yes"
        else:
            values = [None if r.colour is None else r.colour.lower() == concept.lower() for r in ds.records]
            rules[concept] = f"colour label == {concept!r}"
        keep &= np.array([v is not None for v in values])
        presence[concept] = np.array([bool(v) for v in values])
    years = np.array([r.year for r in ds.records])
    counts = {y: int((years[keep] == y).sum()) for y in set(years[keep].tolist())}
    small = sorted(y for y, c in counts.items() if c < args.min_group_size)
    keep &= ~np.isin(years, small)
    idx = np.flatnonzero(keep)
    if not args.quiet:
        print(f"stanford-cars {args.split}: {len(ds)} images, {len(idx)} kept ({(~keep).sum()} without a label or "
              f"in years with < {args.min_group_size} images: {small})", file=sys.stderr)
    data = ShiftData(groups=years[idx], presence={c: p[idx] for c, p in presence.items()},
                     load=lambda k: ds.image(int(idx[k])),
                     name=f"Stanford Cars {args.split} ({args.root}), colours {args.colours}",
                     presence_rule=rules)
    return data, {"dataset": "stanford-cars", "images": ds.fingerprint(idx)}


RUN_VERSION = 1
# the options that change results; output paths, --device, --batch-size, --cache-dir and --quiet do not
# (float rounding aside), and the data files and a --stats file enter the key by content, not by path
CONFIG_KEYS = ("model", "pretrained", "dataset", "shares", "n_per_group", "start", "split", "presence",
               "min_group_size", "reference", "k", "k_neurons", "k_heads", "templates", "fit", "fit_images",
               "permutations")


def _sampler(args, planted: tuple, seed: int):
    """The scenes' "years" sampler of one planted (attribute, value) and seed."""
    from ..scenes import years
    return years(planted, shares=args.shares, start=args.start, n_per_group=args.n_per_group, seed=seed)


def _scene_probe(args, planted: dict, seeds: list, fit: str) -> str:
    """Fingerprint of the first scene of every sampler the run reads (and of the first fit scene), so a changed
    scene generator never resumes a run of the old scenes."""
    from ..applications.shift import ShiftData
    from ..runs import images_fingerprint

    images = [_sampler(args, planted[c], s).scene(args.start, 0).image for c in planted for s in seeds]
    if fit == "scenes":
        images.append(ShiftData.from_scenes(args.fit_images).load(0))
    return images_fingerprint(images)


def _run_key(args, model, concepts: dict, seeds: list, fit: str, signs, data_identity: dict) -> dict:
    """The run's key: every option that changes results, the data's identity and the weights' fingerprint."""
    from ..runs import module_fingerprint, run_key, tensor_fingerprint, texts_fingerprint
    from ..text import get_templates

    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    config.update(fit=fit, concepts=concepts, seeds=seeds,
                  template_texts=texts_fingerprint(get_templates(args.templates) or []),
                  pair_signs=signs if signs is None or isinstance(signs, str) else tensor_fingerprint(signs))
    return run_key(config, data=data_identity, weights=module_fingerprint(model), version=RUN_VERSION)


def _part_prefix(concept: str, seed: int) -> str:
    """``"shape:star", 0`` -> ``"shape-star-seed0-"``: a concept's run's part names in the run folder."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", concept) + f"-seed{seed}-"


def run(args) -> int:
    """Execute a parsed ``shift`` command; returns 0 (mistakes, another run in --out or a damaged file:
    :func:`nha_plugin.cli.common.dispatch`)."""
    import torch

    from ..adapters import get_spec
    from ..applications.shift import ShiftData, run_monitor, write_report
    from ..runs import RunDir

    concepts = _check_args(args)                                    # fail on a typo before loading anything
    seeds = args.seed or [0]
    fit = args.fit or ("scenes" if args.dataset == "scenes" else "reference")
    planted = {c: scene_concept(c) for c in concepts} if args.dataset == "scenes" else {}
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model(args.model, args.pretrained, family="resnet", device=args.device)
    get_spec(model)                     # a CLIP-ViT given as a file is refused here, with a pointer to nha_plugin.vit
    signs = _pair_signs(args, model)
    if args.dataset == "scenes":
        identity = {"dataset": "scenes", "scene_probe": _scene_probe(args, planted, seeds, fit)}
    else:
        cars, identity = _cars_data(args, concepts)
        if fit == "scenes":
            identity["scene_probe"] = _scene_probe(args, {}, [], fit)
    out = Path(args.out)
    run_dir = RunDir(out / f"{args.name}.parts", _run_key(args, model, concepts, seeds, fit, signs, identity),
                     fresh=args.fresh)
    fit_data = ShiftData.from_scenes(args.fit_images) if fit == "scenes" else None
    common = dict(fit_data=fit_data, k=args.k, k_neurons=args.k_neurons, k_heads=args.k_heads,
                  templates=None if args.templates == "none" else args.templates, n_permutations=args.permutations,
                  fit_images=args.fit_images, batch_size=args.batch_size, cache_dir=args.cache_dir,
                  progress=not args.quiet, pair_signs=signs, run=run_dir,
                  fit_part="scenes-fit" if fit == "scenes" else None)
    reference = None if args.reference is None else (int(args.reference) if args.reference.lstrip("-").isdigit()
                                                      else args.reference)
    results = []
    for seed in seeds:
        if args.dataset == "scenes":
            for concept, text in concepts.items():
                data = ShiftData.from_sampler(_sampler(args, planted[concept], seed), concept)
                results.append(run_monitor(model, preprocess, tokenizer, data,
                                           {concept: text}, reference=reference, seed=seed,
                                           part=_part_prefix(concept, seed), **common))
        else:
            results.append(run_monitor(model, preprocess, tokenizer, cars, concepts, reference=reference, seed=seed,
                                       part=f"cars-seed{seed}-", **common))
    report = {"protocol": {"command": recorded_command(args),
                           "model": args.model, "pretrained": args.pretrained, "dataset": args.dataset,
                           "seeds": seeds}, "runs": results}
    paths = write_report(report, out, args.name)
    if not args.quiet:
        _print_summary(results)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _print_summary(runs) -> None:
    from ..applications.shift import METHOD_LABELS, METHODS
    print(f"{'concept':>14} {'seed':>4}  " + "  ".join(f"{METHOD_LABELS[m]:>16}" for m in METHODS)
          + "   (per-image r / group-mean r)")
    for run in runs:
        for c, res in run["concepts"].items():
            cells = [f"{res['per_image_r'][m]:+.3f}/{res['group_mean_r'][m]:+.3f}" for m in METHODS]
            print(f"{c:>14} {run['protocol']['seed']:>4}  " + "  ".join(f"{x:>16}" for x in cells))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m nha_plugin.cli.shift shift ...``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
