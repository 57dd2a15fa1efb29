"""``nha stats`` and ``nha sparsity``: dataset statistics of a CLIP-ResNet, then mean-ablation sparsity curves.

    nha stats --out stats.safetensors --n 512 --batch-size 32                   # held-out scenes, scenes-rn
    nha stats --model RN50 --images DIR --out rn50_stats.safetensors            # a folder of images
    torchrun --nproc_per_node 2 -m nha_plugin.cli.stats stats --num-images 512 --out s.safetensors
                                                  # sharded, merged exactly (gloo; NCCL with --device cuda)
    nha sparsity --stats stats.safetensors --task colour,shape,background \\
        --fractions 0.01,0.05,0.1,0.2,0.5,1 --out sparsity_out                  # JSON + Markdown + PNG

``nha stats`` checkpoints into ``OUT.partial`` (one file per process under torchrun) and a killed run resumes
from it; a checkpoint of other settings, data or weights is refused, ``--fresh`` starts over. User mistakes
(bad arguments, a refused or corrupted checkpoint, a missing or corrupted statistics file, statistics of another
model) end with one ``nha COMMAND: error: ...`` message on stderr and exit status 2 (``NHA_DEBUG=1``: the
traceback instead).

Wire into ``nha`` with ``add_parser(subparsers)`` (adds both sub-commands) and dispatch ``run(args)``; also
runnable alone: ``python -m nha_plugin.cli.stats stats|sparsity ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..runs import dist_info, init_distributed, texts_fingerprint
from .common import (UsageError, check_choices, check_file, check_pool, check_templates, command_help, doc_body,
                     load_model, non_negative_int, positive_int, recorded_command, standalone_main)

__all__ = ["add_parser", "run", "main", "SceneImages", "FolderImages", "scene_tasks", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
STATS_SEED = 7000        # held out: scenes-rn trained on seed 0 and was evaluated on 1000-1002 and 2000-2002
SPARSITY_SEED = 7100
TASKS = ("colour", "shape", "background")


class SceneImages(torch.utils.data.Dataset):
    """Generated scenes (a ``SceneDataset``) through a model's preprocess: items (3, S, S)."""

    def __init__(self, scenes, preprocess):
        self.scenes = scenes
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        return self.preprocess(Image.fromarray(self.scenes[i].image))


class FolderImages(torch.utils.data.Dataset):
    """Every image file directly under a folder (sorted by name), read with PIL as RGB, preprocessed."""

    def __init__(self, folder, preprocess):
        self.files = self.image_files(folder)
        self.preprocess = preprocess

    @staticmethod
    def image_files(folder) -> list:
        """The image files directly under ``folder``, sorted by name.

        Raises:
            FileNotFoundError: ``folder`` is not a folder.
            ValueError: it holds no file with a suffix of :data:`IMAGE_SUFFIXES`.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder}: not a folder; give a directory of image files")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in that folder")
        return files

    def fingerprint(self) -> str:
        """sha256 of the files' names and sizes: tells a resumed run that the folder changed, without reading it."""
        return texts_fingerprint(f"{p.name}:{p.stat().st_size}" for p in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return self.preprocess(im.convert("RGB"))


def scene_tasks(n: int, seed: int, tasks: Sequence[str] = TASKS) -> dict:
    """The held-out zero-shot tasks of ``scenes-rn``: ``{task: (SceneDataset, labels (n,), class prompts)}``.

    colour: 1-shape scenes, 6 colours, "a photo of a {colour} object"; shape: 1-shape scenes, 5 shapes,
    "a photo of a {shape}"; background: 1-3 objects, 6 backgrounds, "a photo of something on {background}".
    Seeds: ``seed``, ``seed + 1``, ``seed + 2`` (the prompts are those the model was evaluated with)."""
    from .. import scenes as S
    from ..zoo.train_scenes_rn import prompt_sets
    prompts = prompt_sets()
    table = {
        "colour": (dict(n_objects=1, kinds=("shape",)), lambda sc: S.COLOURS.index(sc.objects[0].colour),
                   prompts["colour"]),
        "shape": (dict(n_objects=1, kinds=("shape",)), lambda sc: S.SHAPES.index(sc.objects[0].shape),
                  prompts["name"][:len(S.SHAPES)]),
        "background": ({}, lambda sc: S.BACKGROUNDS.index(sc.background), prompts["background"]),
    }
    out = {}
    for i, task in enumerate(TASKS):
        if task in tasks:
            kwargs, label_of, classes = table[task]
            ds = S.SceneDataset(n, seed=seed + i, **kwargs)
            out[task] = (ds, torch.tensor([label_of(sc) for sc in ds]), classes)
    return out


# ---- argument parsing --------------------------------------------------------------------------------------
def _csv(cast):
    def parse(text: str) -> list:
        try:
            return [cast(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {cast.__name__}; got {text!r}") from err
    return parse


def configure_stats(p: argparse.ArgumentParser) -> None:
    """Add the ``stats`` options to a parser."""
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled) or a CLIP-ResNet load_clip reads")
    p.add_argument("--images", default=None, help="folder of images (default: generated held-out scenes)")
    p.add_argument("--n", "--num-images", dest="n", type=positive_int, default=512,
                   help="number of generated scenes (ignored with --images); under torchrun write --num-images, "
                        "since torchrun reads --n as an abbreviation of its own options")
    p.add_argument("--seed", type=non_negative_int, default=STATS_SEED, help="scene seed, held out from training")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--k", type=positive_int, default=50, help="per-pair top-k length (the paper: 50)")
    p.add_argument("--head-covariance", choices=("auto", "on", "off"), default="auto",
                   help="keep the (H, D, D) head covariances (auto: when H*D*D <= 2**24)")
    p.add_argument("--out", default="stats.safetensors", help="output statistics file")
    p.add_argument("--fresh", action="store_true",
                   help="discard the checkpoint OUT.partial of an interrupted run and start over (by default a "
                        "killed run resumes from it; one of other settings, data or weights is refused)")
    p.add_argument("--resume", action="store_true", help="resuming is the default; accepted for older command lines")
    p.add_argument("--checkpoint-every", type=positive_int, default=4, help="batches between checkpoints")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: each process's LOCAL_RANK GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def configure_sparsity(p: argparse.ArgumentParser) -> None:
    """Add the ``sparsity`` options to a parser."""
    p.add_argument("--stats", required=True, help="statistics file from nha stats")
    p.add_argument("--model", default="scenes-rn", help="the model the statistics were collected on")
    p.add_argument("--task", type=_csv(str), default=list(TASKS),
                   help=f"comma-separated tasks (default: {','.join(TASKS)})")
    p.add_argument("--fractions", type=_csv(float), default=[0.01, 0.05, 0.1, 0.2, 0.5, 1.0],
                   help="kept fractions of units to sweep, in [0, 1] (default: 0.01,0.05,0.1,0.2,0.5,1)")
    p.add_argument("--levels", type=_csv(str), default=["pair", "pair-rms", "neuron", "head"],
                   help="unit levels to sweep (pair: the paper's top-k importance; pair-rms: std(s) x ||u||; "
                        "default: pair,pair-rms,neuron,head)")
    p.add_argument("--n", type=positive_int, default=300, help="held-out scenes per task")
    p.add_argument("--seed", type=non_negative_int, default=SPARSITY_SEED,
                   help="task scene seed (task i uses seed + i)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per forward pass")
    p.add_argument("--pcs", type=_csv(int), default=[1, 2, 4],
                   help="neuron PCs per neuron for reconstructions (default: 1,2,4)")
    p.add_argument("--text-k", type=_csv(int), default=[4, 16, 64],
                   help="words per pair direction for sparse-text reconstructions (default: 4,16,64; empty: none)")
    p.add_argument("--pool", default="words:5000+scenes", help="word pool for the sparse-text dictionary")
    p.add_argument("--templates", default="photo", help="templates for the word embeddings (none|photo|imagenet)")
    p.add_argument("--rescale", action="store_true", help="scale each OMP approximation back to ||u||")
    p.add_argument("--no-text-control", dest="text_control", action="store_false",
                   help="skip the control reconstruction from as many random atoms as words")
    p.add_argument("--out", default="sparsity_out", help="output folder")
    p.add_argument("--name", default="sparsity", help="file stem of NAME.json / NAME.md / NAME.png")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add the ``stats`` and ``sparsity`` sub-commands to an ``argparse`` sub-parser collection."""
    body = doc_body(__doc__)
    ps = subparsers.add_parser("stats", help=command_help("stats"), description=body)
    configure_stats(ps)
    pp = subparsers.add_parser("sparsity", help=command_help("sparsity"), description=body)
    configure_sparsity(pp)
    return ps, pp


# ---- commands ----------------------------------------------------------------------------------------------
def _load(name: str, device: str):
    model, preprocess, tokenizer = load_model(name, family="resnet")
    return model.to(device).eval(), preprocess, tokenizer


def run_stats(args: argparse.Namespace) -> int:
    """``nha stats``: collect, resuming ``OUT.partial`` unless ``--fresh``, and write ``OUT`` (rank 0).

    Args:
        args: the parsed ``stats`` arguments.

    Returns:
        0 (user mistakes exit 2 through :func:`run`).
    """
    import torch.distributed as dist
    if args.fresh and args.resume:
        raise UsageError("--fresh and --resume contradict each other; give one")
    if args.images:
        try:
            FolderImages.image_files(args.images)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
    elif args.model != "scenes-rn":
        raise UsageError(f"{args.model} was not trained on the generated scenes; pass --images DIR")
    created = init_distributed(args.device)
    try:
        return _run_stats(args)
    finally:
        if created:
            dist.destroy_process_group()


def _run_stats(args: argparse.Namespace) -> int:
    from ..adapters import get_spec
    from ..stats.collector import checkpoint_path, collect
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device
    model, preprocess, _ = _load(args.model, device)
    get_spec(model)      # pair statistics are for CLIP-ResNets: a ViT is refused with a pointer to nha_plugin.vit
    if args.images:
        data = FolderImages(args.images, preprocess)
        source = f"folder {args.images} ({len(data)} images, names and sizes sha256 {data.fingerprint()[:16]})"
    else:
        from ..scenes import SceneDataset
        data = SceneImages(SceneDataset(args.n, seed=args.seed), preprocess)
        source = f"generated scenes SceneDataset({args.n}, seed={args.seed})"
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    head_cov = {"auto": None, "on": True, "off": False}[args.head_covariance]
    start = time.perf_counter()
    stats = collect(model, data, batch_size=args.batch_size, k=args.k, head_covariance=head_cov, checkpoint=partial,
                    checkpoint_every=args.checkpoint_every, resume=not args.fresh, progress=not args.quiet,
                    num_workers=args.workers, meta={"data": source, "model_name": args.model,
                                                    "command": recorded_command(args)})
    rank, world = dist_info()
    if rank == 0:
        stats.save(out)
        H, C = stats.shape
        print(f"nha stats: {stats.count} images ({source}), H={H} x C={C} pairs, k={stats.k}, "
              f"{world} process(es), {time.perf_counter() - start:.1f} s -> {out}")
    checkpoint_path(partial).unlink(missing_ok=True)
    return 0


@torch.no_grad()
def _coefficients(model, dataset, batch_size: int, device: str, progress: bool, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    from ..models import decompose
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out = [decompose(model, x.to(device)).pair_coefficients.double().cpu()
           for x in tqdm(loader, desc=desc, disable=not progress)]
    return torch.cat(out)


def run_sparsity(args: argparse.Namespace) -> int:
    """``nha sparsity``: sweeps and reconstructions on the held-out scene tasks; JSON, Markdown and PNG in ``--out``.

    Args:
        args: the parsed ``sparsity`` arguments.

    Returns:
        0 (user mistakes exit 2 through :func:`run`).
    """
    from ..adapters import get_spec
    from ..readout import ZeroShotClassifier
    from ..stats import DatasetStats
    from ..applications import ablation as A
    if args.model != "scenes-rn":
        raise UsageError("the tasks are the planted scene concepts, which only scenes-rn knows; use "
                         "nha_plugin.applications.ablation.sparsity_curves with your own labels")
    check_choices("--task", args.task, TASKS, "task")
    check_choices("--levels", args.levels, A.LEVELS, "level")
    if not args.task or not args.levels or not args.fractions:
        raise UsageError("--task, --levels and --fractions each need at least one value")
    if any(not 0 <= f <= 1 for f in args.fractions):
        raise UsageError(f"--fractions must lie in [0, 1]; got {args.fractions}")
    if any(v < 1 for v in [*args.pcs, *args.text_k]):
        raise UsageError(f"--pcs and --text-k take whole numbers >= 1; got {args.pcs} and {args.text_k}")
    check_file("--stats", args.stats, "a statistics file written by nha stats --out FILE")
    if args.text_k:
        check_pool("--pool", args.pool)
        check_templates("--templates", args.templates)
    start = time.perf_counter()
    model, preprocess, tokenizer = _load(args.model, args.device)
    spec = get_spec(model)
    stats = DatasetStats.load(args.stats, model=model)
    text = {}
    dictionary_note = None
    if args.text_k:
        from ..text import build_dictionary, prepare_dictionary
        words = build_dictionary(model, tokenizer, pool=args.pool, templates=args.templates, progress=not args.quiet)
        dictionary_note = (f"pool {args.pool!r} ({len(words)} texts), templates {args.templates!r}, centred and "
                           "unit-normalised per text; OMP coefficients")
        if args.rescale:
            dictionary_note += ", rescaled to ||u||"
        dictionaries = {"": words.atoms}
        if args.text_control:
            # same number of random unit atoms: what the reconstruction keeps without any text
            g = torch.Generator().manual_seed(0)
            dictionaries["random atoms, "] = prepare_dictionary(torch.randn(words.atoms.shape, generator=g))
            dictionary_note += "; control: as many random Gaussian atoms (seed 0), prepared the same way"
        for label, atoms in dictionaries.items():
            for k in args.text_k:
                directions, rel = A.text_directions(spec, atoms, k, rescale=args.rescale, progress=not args.quiet)
                text[f"{label}k={k} (mean residual {float(rel.mean()):.2f})"] = directions
    tasks = {}
    for task, (scenes, labels, classes) in scene_tasks(args.n, args.seed, args.task).items():
        s = _coefficients(model, SceneImages(scenes, preprocess), args.batch_size, args.device, not args.quiet,
                          f"decomposing {task}")
        head = ZeroShotClassifier(model, tokenizer, classes, templates=("{}",))
        tasks[task] = A.sparsity_curves(spec, s, labels, head.readout.T.double().cpu(), stats, args.fractions,
                                        args.levels, args.pcs, text)
        tasks[task]["classes"] = classes
        tasks[task]["n"] = len(labels)
    result = {"tasks": tasks, "meta": {
        "model": args.model, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "stats": f"{args.stats}: {stats.count} images ({stats.meta.get('data', 'unknown data')}), k={stats.k}",
        "commands": [c for c in (stats.meta.get("command"), recorded_command(args)) if c],
        "data": f"{args.n} held-out scenes per task, seeds {args.seed}+i (colour, shape, background)",
        "dictionary": dictionary_note, "importance": "pair: mean top-k |s - mean| x ||u|| (the paper); pair-rms, "
        "neuron, head: RMS norm of the centred contribution", "seconds": round(time.perf_counter() - start, 1),
        "arguments": {k: v for k, v in vars(args).items() if k != "argv"}}}
    paths = A.write_report(result, args.out, args.name)
    print(A.sparsity_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``nha stats`` / ``nha sparsity``; mistakes are reported by :func:`nha_plugin.cli.common.dispatch`."""
    return run_stats(args) if args.command == "stats" else run_sparsity(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nha_plugin.cli.stats stats|sparsity ...``: the two sub-commands without the rest of ``nha``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
