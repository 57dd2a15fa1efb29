"""Run every method on the same images and targets, score every map with every metric, resumably.

    from nha_plugin.harness.runner import BenchmarkConfig, run_benchmark
    results = run_benchmark(BenchmarkConfig(model="scenes-rn", dataset="scenes", n=16, out="bench_out"))

Fairness: one forward wrapper (zero-shot classifier over the dataset's class names, template
"a photo of a {}."), one target per image (the class of the largest object), one post-processing of maps
(:func:`nha_plugin.harness.methods.to_pixel_map`), one normalisation per metric (:mod:`.metrics`).

Resuming: per-image records are appended to ``OUT/records/<method>.jsonl`` as they are computed; a rerun
with the same configuration skips what is there (a torn last line is ignored). A changed configuration
refuses to mix with old records unless ``fresh=True`` (which deletes them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics as M
from .methods import CAPTUM_SETTINGS, DEFAULT_METHODS, available_methods, explain, get_method

__all__ = ["BenchmarkConfig", "BenchItem", "run_benchmark", "load_benchmark_data", "DEFAULT_METRICS", "QUICK"]

DEFAULT_METRICS = ("pointing_game", "mass_in_mask", "segmentation", "deletion_insertion", "infidelity",
                   "max_sensitivity", "randomisation", "completeness_error", "seconds_per_image")
TEMPLATES = ("a photo of a {}.",)


@dataclass
class BenchmarkConfig:
    """What to run. ``n_subset`` images (the first ones) get the expensive metrics that rerun a method
    (max-sensitivity: ``n_perturb_samples`` reruns; randomisation: one rerun per stage)."""

    model: str = "scenes-rn"
    dataset: str = "scenes"
    methods: Sequence[str] = DEFAULT_METHODS
    metrics: Sequence[str] = DEFAULT_METRICS
    n: int = 32
    n_subset: int = 2
    batch_size: int = 4
    seed: int = 10_000
    device: str = "cpu"
    out: str = "benchmark_out"
    path: Optional[str] = None            # ImageNet-S gtsegs_ijcv.mat
    del_ins_steps: int = 8
    infidelity_samples: int = 4
    sensitivity_samples: int = 2
    randomisation_stages: Sequence[str] = ("attnpool", "layer4", "layer3", "stem")
    ig_steps: int = 16
    gradshap_samples: int = 8
    occlusion_window: int = 32
    n_grid: int = 6
    quiet: bool = False
    fresh: bool = False

    def key(self) -> dict:
        """The settings that must match for records to be reused."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k in ("model", "dataset", "seed", "n_subset", "del_ins_steps", "randomisation_stages", "path",
                         "infidelity_samples", "sensitivity_samples", "ig_steps", "gradshap_samples",
                         "occlusion_window")}


QUICK = dict(n=3, n_subset=1, del_ins_steps=5, infidelity_samples=2, sensitivity_samples=1,
             randomisation_stages=("attnpool", "stem"), ig_steps=8, gradshap_samples=4, occlusion_window=56)


@dataclass
class BenchItem:
    """One evaluation image: ``image`` (S, S, 3) uint8, ``mask`` bool (S, S) of the explained object,
    ``label`` its class name."""

    index: int
    image: np.ndarray
    mask: np.ndarray
    label: str


def load_benchmark_data(dataset: str, n: int, seed: int, path: Optional[str] = None
                        ) -> Tuple[List[BenchItem], List[str], str]:
    """Items, class names and a one-line description for ``scenes`` | ``photos`` | ``imagenet-s``."""
    if dataset in ("scenes", "photos"):
        from .datasets.scenes import CATEGORIES, SHAPES, SceneDataset
        if dataset == "scenes":
            ds, classes = SceneDataset(n, seed=seed), list(SHAPES) + list(CATEGORIES)
            desc = f"generated scenes (nha_plugin.scenes), seed {seed} (held out), {n} images"
        else:
            from .datasets.photos import CLASS_NAMES, PhotoCompositeDataset
            ds, classes = PhotoCompositeDataset(n, seed=seed), list(CLASS_NAMES)
            desc = f"scikit-image photo composites (datasets.photos), seed {seed}, {n} images"
        items = []
        for i, scene in enumerate(ds):
            obj = max(scene.objects, key=lambda o: int(o.mask.sum()))
            items.append(BenchItem(i, scene.image, obj.mask, obj.name))
        return items, classes, desc + "; target = class of the largest object"
    if dataset in ("imagenet-s", "imagenet_s", "imagenet-seg"):
        from .datasets.imagenet_s import load_imagenet_segmentation
        if not path:
            raise ValueError("dataset imagenet-s needs --path to gtsegs_ijcv.mat (the ImageNet-Segmentation file)")
        images, masks = load_imagenet_segmentation(path, n=n, size=224)
        items = [BenchItem(i, im, mk, "object") for i, (im, mk) in enumerate(zip(images, masks))]
        return items, ["object"], f"ImageNet-Segmentation {path}, first {len(items)} images, 224 px"
    raise ValueError(f"unknown dataset {dataset!r}; expected scenes, photos or imagenet-s")


def _to_tensor(images: np.ndarray, model_name: str) -> torch.Tensor:
    from ..zoo._scenes_rn import images_to_tensor
    return images_to_tensor(images)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_records(path: Path) -> List[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break                                  # torn last line of a killed run
    return rows


def _append(path: Path, rows: List[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _build_forward(cfg: BenchmarkConfig, classes: List[str]):
    import nha_plugin as nha
    from ..readout import ZeroShotClassifier
    model, _, tokenizer = nha.load_clip(cfg.model)
    model = model.to(cfg.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if classes == ["object"]:
        raise ValueError("ImageNet-S has no class names in gtsegs_ijcv.mat; run it with a model whose zero-shot "
                         "head you pass through the Python API (run_benchmark(..., forward=...))")
    return ZeroShotClassifier(model, tokenizer, classes, templates=TEMPLATES)


def run_benchmark(cfg: BenchmarkConfig, forward=None, items: Optional[List[BenchItem]] = None,
                  classes: Optional[List[str]] = None) -> dict:
    """Run ``cfg``; returns the results dict that is also written to ``OUT/results.json`` (+ ``results.md``,
    ``heatmaps.png``, ``metric_<name>.png``). ``forward``/``items``/``classes`` override the model and data."""
    from . import report

    out = Path(cfg.out)
    rec_dir = out / "records"
    if cfg.fresh and rec_dir.exists():
        shutil.rmtree(rec_dir)
    rec_dir.mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(exist_ok=True)
    if items is None:
        items, classes, data_desc = load_benchmark_data(cfg.dataset, cfg.n, cfg.seed, cfg.path)
    else:
        data_desc = f"{len(items)} user-supplied images"
    items = items[:cfg.n]
    forward = forward if forward is not None else _build_forward(cfg, classes)
    key = dict(cfg.key(), weights=_fingerprint(forward), n_classes=len(classes))
    cfg_path = out / "config.json"
    if cfg_path.exists() and any(rec_dir.iterdir()):
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(key)):
            raise ValueError(f"{out} holds records of another configuration or model ({old}); use another --out "
                             "or --fresh")
    _atomic_write(cfg_path, json.dumps(key))
    device = next(forward.parameters()).device
    x_all = _to_tensor(np.stack([it.image for it in items]), cfg.model).to(device)
    target_all = torch.tensor([classes.index(it.label) for it in items], device=device)
    with torch.no_grad():
        logits = torch.cat([forward(x_all[i:i + 16]) for i in range(0, len(items), 16)])
    accuracy = float((logits.argmax(-1) == target_all).float().mean())

    from .vit_methods import methods_for, randomised_copies
    methods = [m for m in methods_for(forward.model, cfg.methods) if m in available_methods() or _warn_missing(m)]
    want = set(cfg.metrics)
    randomised = []
    if "randomisation" in want:
        randomised = randomised_copies(forward, cfg.randomisation_stages, seed=cfg.seed)
    batches = [list(range(i, min(i + cfg.batch_size, len(items)))) for i in range(0, len(items), cfg.batch_size)]
    saved_settings = dict(CAPTUM_SETTINGS)
    CAPTUM_SETTINGS.update(ig_steps=cfg.ig_steps, gradshap_samples=cfg.gradshap_samples,
                           occlusion_window=cfg.occlusion_window)
    try:
        _run_methods(cfg, methods, batches, forward, x_all, target_all, items, randomised, want, out, rec_dir)
    finally:
        CAPTUM_SETTINGS.clear()
        CAPTUM_SETTINGS.update(saved_settings)
    records = {name: _read_records(rec_dir / f"{name}.jsonl") for name in methods}
    results = report.summarise(cfg, records, data_desc, accuracy, classes)
    results["protocol"]["weights_sha1"] = key["weights"]
    _atomic_write(out / "results.json", json.dumps(results, indent=2))
    _atomic_write(out / "results.md", report.markdown(results))
    report.heatmap_grid(items[:cfg.n_grid], methods, out / "maps", out / "heatmaps.png")
    report.metric_charts(results, out)
    if not cfg.quiet:
        print(report.table(results))
    return results


def _run_methods(cfg, methods, batches, forward, x_all, target_all, items, randomised, want, out, rec_dir):
    from tqdm.auto import tqdm
    bar = tqdm(total=len(methods) * len(batches), desc="benchmark", disable=cfg.quiet)
    for name in methods:
        method = get_method(name)
        path = rec_dir / f"{name}.jsonl"
        kept = _read_records(path)
        if path.exists():                                  # drop a torn last line before appending
            _atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        done = {r["index"] for r in kept}
        for idx in batches:
            bar.set_postfix_str(name)
            todo = [i for i in idx if i not in done]
            if todo:
                _append(path, _score_batch(cfg, method, forward, x_all, target_all, items, todo, randomised, want, out))
            bar.update(1)
    bar.close()


def _fingerprint(forward) -> str:
    """SHA-1 of the read-out and the model's weights: records of other weights are never mixed in."""
    import hashlib
    h = hashlib.sha1()
    tensors = [forward.readout] + [p for p in forward.model.state_dict().values() if torch.is_tensor(p)]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _warn_missing(name: str) -> bool:
    import warnings
    warnings.warn(f"method {name!r} is not available (for lrp_zennit: pip install 'nha-plugin[zennit]'); skipped")
    return False


def _score_batch(cfg: BenchmarkConfig, method, forward, x_all, target_all, items, idx, randomised, want, out):
    torch.manual_seed(cfg.seed)
    x, t = x_all[idx], target_all[idx]
    ex = explain(method, forward, x, t)
    rows = []
    infid = (M.infidelity(forward, x, t, ex.maps.to(x.dtype), n_perturb_samples=cfg.infidelity_samples).tolist()
             if "infidelity" in want else None)
    for j, i in enumerate(idx):
        heat, mask = ex.maps[j].cpu().numpy(), items[i].mask
        r: Dict[str, object] = {"index": i, "seconds_per_image": ex.seconds_per_image}
        if "pointing_game" in want:
            r["pointing_game"] = M.pointing_game(heat, mask)
        if "mass_in_mask" in want:
            r["mass_in_mask"] = M.mass_in_mask(heat, mask)
        if "segmentation" in want:
            r["segmentation"] = M.segmentation_counts(heat, mask)
        if "deletion_insertion" in want:
            r.update(M.deletion_insertion(forward, x[j], int(t[j]), ex.maps[j], steps=cfg.del_ins_steps))
        if infid is not None:
            r["infidelity"] = float(infid[j])
        if "completeness_error" in want and ex.completeness_error is not None:
            r["completeness_error"] = float(ex.completeness_error[j])
        if i < cfg.n_grid:
            np.save(out / "maps" / f"{method.name}_{i}.npy", ex.maps[j].cpu().numpy().astype(np.float16))
        rows.append(r)
    sub = [j for j, i in enumerate(idx) if i < cfg.n_subset]
    if sub:
        xs, ts = x[sub], t[sub]
        if "max_sensitivity" in want:
            def expl(z, target):                      # Captum re-explains the unperturbed inputs: reuse them
                if z.shape == xs.shape and torch.equal(z, xs):
                    return ex.maps[sub]
                return explain(method, forward, z, target).maps

            sens = M.max_sensitivity(expl, xs, target=ts, n_perturb_samples=cfg.sensitivity_samples)
            for k, j in enumerate(sub):
                rows[j]["max_sensitivity"] = float(sens[k])
        if randomised:
            stage_maps = [explain(method, fr, xs, ts).maps.cpu().numpy() for fr in randomised]
            for k, j in enumerate(sub):
                sim = M.randomisation_similarity(ex.maps[j].cpu().numpy(), [sm[k] for sm in stage_maps])
                rows[j].update(sim)
    return rows
