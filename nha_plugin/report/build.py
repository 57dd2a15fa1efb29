"""Build the whole report: a small benchmark run (or a given run folder), its drill-down and the atlas.

    from nha_plugin.report import ReportConfig, build_report
    index = build_report(ReportConfig(out="report", model="scenes-rn"))     # open index.html in a browser

Everything computed is kept where a rerun finds it: the benchmark in ``OUT/run`` (a resumable harness run
folder) and the atlas in ``OUT/atlas-run/atlas.json`` under a :class:`nha_plugin.runs.RunDir` keyed by the
settings, the images and the weights, so a second build with the same settings only rewrites the pages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..files import read_json, write_json
from ..runs import RunDir, images_fingerprint, module_fingerprint, run_key
from .pictures import write_png

__all__ = ["ReportConfig", "build_report", "REPORT_METHODS", "REPORT_VIT_METHODS", "REPORT_METRICS",
           "load_image_folder", "scene_images", "ATLAS_VERSION"]

REPORT_METHODS = ("nad_spatial", "nad_heads", "maskclip", "class_attention", "saliency", "integrated_gradients",
                  "random", "centre")
REPORT_VIT_METHODS = ("vit_spatial", "vit_maskclip", "vit_class_attention", "saliency", "integrated_gradients",
                      "random", "centre")
# the cheap metrics (no reruns of a method): the default report takes a minute or two on a CPU
REPORT_METRICS = ("pointing_game", "mass_in_mask", "segmentation", "deletion_insertion", "completeness_error",
                  "seconds_per_image")
ATLAS_VERSION = 1
_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ReportConfig:
    """What the report shows.

    Attributes:
        out: the site folder.
        model, pretrained: the model (:func:`nha_plugin.models.load_clip` names; default the bundled scenes-rn).
        run: an existing benchmark run folder for the leaderboard; None runs a small one into ``OUT/run`` (on
            generated scenes, ``n_bench`` images) unless ``benchmark`` is False.
        atlas: build the atlas of units (CLIP-ResNet only: a CLIP-ViT report has none).
        images: a folder of images for the atlas; None: ``n_atlas`` generated scenes.
        pool: word pool of the descriptions (``nha_plugin.text.get_pool``); None: "scenes" for the bundled
            models, "imagenet" otherwise.
        k, top: words and top images per unit.
        seed: seed of the generated scenes (held out from training).
    """

    out: str = "nha_report"
    model: str = "scenes-rn"
    pretrained: Optional[str] = None
    run: Optional[str] = None
    benchmark: bool = True
    atlas: bool = True
    images: Optional[str] = None
    n_bench: int = 4
    n_atlas: int = 48
    pool: Optional[str] = None
    k: int = 5
    top: int = 4
    seed: int = 20_000
    progress: bool = True
    fresh: bool = False


def load_image_folder(folder, preprocess, limit: Optional[int] = None) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """The images of a folder (sorted by name), preprocessed and as 112 px thumbnails.

    Returns:
        ``(x, thumbs)``: (N, 3, S, S) float and N (112, 112, 3) uint8 arrays.

    Raises:
        NotADirectoryError / FileNotFoundError: no folder, or no image in it (names the suffixes looked for).
    """
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"expected a folder of images for --images; {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"expected images ({', '.join(_SUFFIXES)}) in {folder}; found none")
    xs, thumbs = [], []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            xs.append(preprocess(rgb))
            thumbs.append(np.asarray(rgb.resize((112, 112), Image.BILINEAR)))
    return torch.stack(xs), thumbs


def scene_images(n: int, seed: int) -> Tuple[torch.Tensor, List[np.ndarray]]:
    """``n`` generated scenes of ``seed``: (n, 3, 224, 224) preprocessed and n (112, 112, 3) uint8 thumbnails."""
    from PIL import Image

    from ..scenes import SceneDataset
    from ..zoo import images_to_tensor
    raw = np.stack([s.image for s in SceneDataset(n, seed=seed)])
    return images_to_tensor(raw), [np.asarray(Image.fromarray(r).resize((112, 112), Image.BILINEAR)) for r in raw]


def _benchmark(cfg: ReportConfig, model, tokenizer, vit: bool) -> Tuple[Optional[dict], Optional[torch.nn.Module]]:
    """The leaderboard run's folder as :func:`nha_plugin.report.leaderboard.read_run` reads it (running it if
    needed) and its zero-shot classifier (None: rebuilt from the run's model name), or (None, None)."""
    from .leaderboard import read_run
    if cfg.run is not None:
        return read_run(cfg.run), None
    if not cfg.benchmark:
        return None, None
    from ..harness import BenchmarkConfig, run_benchmark
    from ..harness.captum_methods import CaptumSettings
    from ..harness.data import load_benchmark_data
    from ..readout import ZeroShotClassifier
    from ..harness.runner import TEMPLATES
    bench = BenchmarkConfig(model=cfg.model, dataset="scenes", n=cfg.n_bench, n_subset=0, n_grid=cfg.n_bench,
                            methods=REPORT_VIT_METHODS if vit else REPORT_METHODS, metrics=REPORT_METRICS,
                            del_ins_steps=5, captum=CaptumSettings(ig_steps=8, gradshap_samples=4,
                                                                   occlusion_window=56),
                            out=str(Path(cfg.out) / "run"), quiet=not cfg.progress, fresh=cfg.fresh)
    items, classes, _ = load_benchmark_data("scenes", cfg.n_bench, bench.seed)
    forward = ZeroShotClassifier(model, tokenizer, classes, templates=TEMPLATES)
    run_benchmark(bench, forward=forward, items=items, classes=classes)
    return read_run(bench.out), forward


def _atlas(cfg: ReportConfig, model, tokenizer, site: Path) -> Tuple[Optional[dict], List[str]]:
    """The atlas (recomputed only when its key changed) and its thumbnails' paths."""
    from .atlas import resnet_atlas
    if cfg.images is not None:
        from ..models import load_clip
        _, preprocess, _ = load_clip(cfg.model, cfg.pretrained)
        x, thumbs = load_image_folder(cfg.images, preprocess, limit=cfg.n_atlas)
    else:
        x, thumbs = scene_images(cfg.n_atlas, cfg.seed)
    paths = [f"atlas-img/{i}.png" for i in range(len(thumbs))]
    for p, t in zip(paths, thumbs):
        write_png(site / p, t)
    pool = cfg.pool or ("scenes" if cfg.model in ("scenes-rn", "scenes-vit") else "imagenet")
    key = run_key({"model": cfg.model, "pretrained": cfg.pretrained, "pool": pool, "k": cfg.k, "top": cfg.top},
                  data=images_fingerprint([x.numpy()]), weights=module_fingerprint(model), version=ATLAS_VERSION)
    run = RunDir(site / "atlas-run", key, fresh=cfg.fresh)
    cached = run.path / "atlas.json"
    if run.resumed and cached.is_file():
        return read_json(cached), paths
    atlas = resnet_atlas(model, tokenizer, x, pool=pool, k=cfg.k, top=cfg.top, progress=cfg.progress)
    write_json(cached, atlas, indent=None)
    return atlas, paths


def build_report(cfg: ReportConfig) -> Path:
    """Build the site described by ``cfg``.

    Returns:
        The path of ``index.html`` (open it from the file system; no server needed).

    Raises:
        FileNotFoundError: ``cfg.run`` is not a run folder, or ``cfg.images`` holds no image.
        RunMismatchError: ``OUT/run`` or ``OUT/atlas-run`` holds another run (``fresh=True`` starts over).
    """
    from ..harness.forward import is_vit
    from ..models import load_clip
    from .leaderboard import drilldown, leaderboard
    from .site import write_site
    site = Path(cfg.out)
    model, _, tokenizer = load_clip(cfg.model, cfg.pretrained)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    vit = is_vit(model)
    run, forward = _benchmark(cfg, model, tokenizer, vit)
    board = leaderboard(run) if run is not None else None
    images = drilldown(run, site, forward=forward, progress=cfg.progress) if run is not None else []
    atlas, paths = (None, []) if vit or not cfg.atlas else _atlas(cfg, model, tokenizer, site)
    title = f"nha report: {cfg.model}" + (f" ({cfg.pretrained})" if cfg.pretrained else "")
    index = write_site(site, board, images, atlas, title=title, atlas_images=paths)
    write_json(site / "report.json", {"config": dataclasses.asdict(cfg), "index": str(index)})
    return index
