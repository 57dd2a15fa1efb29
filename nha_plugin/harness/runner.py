"""Run every method on the same images and targets, score every map with every metric, resumably.

    from nha_plugin.harness.runner import BenchmarkConfig, run_benchmark
    results = run_benchmark(BenchmarkConfig(model="scenes-rn", dataset="scenes", n=16, out="bench_out"))
    contrastive = run_benchmark(BenchmarkConfig(..., target_mode="contrastive"))

Fairness: one forward wrapper (zero-shot classifier over the dataset's class names, template
"a photo of a {}."), one target per image (the class of the largest object), one post-processing of maps
(:func:`nha_plugin.harness.registry.to_pixel_map`), one normalisation per metric (:mod:`.metrics`), and every
metric on every image (``n_subset=None``, the default), so each score is a mean over the same images with a
95% bootstrap interval and a paired comparison with NAD spatial (:mod:`.confidence`, :mod:`.report`).

Target mode: ``"plain"`` explains the target's logit; ``"contrastive"`` explains ``logit_c - mean_k logit_k``
for every method, through one forward wrapper built by :func:`nha_plugin.readout.contrastive` (each read-out
column minus the mean column). The metrics then score that quantity too (deletion/insertion read the softmax,
which a shift common to all classes leaves unchanged).

Resuming: ``OUT`` is a :class:`nha_plugin.runs.RunDir` keyed by the configuration (all of it but ``out``,
``quiet`` and ``fresh``), the images, masks, labels and classes, and the model's and read-out's fingerprints.
Per-image records go to ``OUT/<method>.records.jsonl`` as each batch is scored; the maps of the first
``n_grid`` images to ``OUT/map-<method>-<i>.part.safetensors``. A rerun with the same key scores only the
batches with a missing record (a torn last line counts as missing), each batch whole, so every number is the
very computation of an uninterrupted run; random draws come from per-image seeds (:mod:`.seeds`). Another
key is refused (:class:`nha_plugin.runs.RunMismatchError` naming each difference) unless ``fresh=True``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..files import write_json, write_text
from ..runs import RunDir, append_records, barrier, dist_info, images_fingerprint, module_fingerprint, read_records, run_key, \
    tensor_fingerprint
from ..readout import contrastive
from . import metrics as M
from . import report
from .figures import heatmap_grid, metric_charts
from .captum_methods import CAPTUM_SETTINGS, CaptumSettings
from .data import BenchItem, items_to_tensor, load_benchmark_data
from .forward import is_vit, model_of
from .randomise import randomised_copies
from .registry import Method, MethodUnavailableError, explain, get_method
from .seeds import global_rngs_restored, image_seeds, seed_globals

__all__ = ["BenchmarkConfig", "run_benchmark", "build_forward", "benchmark_key", "methods_for", "DEFAULT_METHODS",
           "VIT_DEFAULT_METHODS", "DEFAULT_METRICS", "QUICK", "RECORDS_VERSION", "TARGET_MODES", "target_forward"]

DEFAULT_METHODS = ("nad_spatial", "nad_spatial_interp", "nad_heads", "nad_neurons", "maskclip", "self_self",
                   "class_attention", "integrated_gradients", "saliency", "input_x_gradient", "gradient_shap",
                   "occlusion", "gradcam", "layer_integrated_gradients", "lrp_zennit", "random", "centre")
VIT_DEFAULT_METHODS = ("vit_spatial", "textspan_vit", "vit_maskclip", "vit_class_attention", "integrated_gradients",
                       "saliency", "input_x_gradient", "gradient_shap", "occlusion", "random", "centre")
DEFAULT_METRICS = ("pointing_game", "mass_in_mask", "segmentation", "deletion_insertion", "infidelity",
                   "max_sensitivity", "randomisation", "completeness_error", "seconds_per_image")
TEMPLATES = ("a photo of a {}.",)
TARGET_MODES = ("plain", "contrastive")
# bump when what a record means changes (2: per-image seeds, records in a RunDir)
RECORDS_VERSION = 2


@dataclass
class BenchmarkConfig:
    """What to run.

    ``n_subset``: None (the default) scores every metric on every image; an int restricts the metrics that rerun
    the method (max-sensitivity: ``sensitivity_samples`` reruns; randomisation: one rerun per stage) to the
    first ``n_subset`` images, for quick looks (their intervals and comparisons then rest on fewer images; each
    entry's ``n`` says how many). ``target_mode``: ``"plain"`` (the target's logit) or ``"contrastive"``
    (``logit_c - mean_k logit_k``, :func:`nha_plugin.readout.contrastive`). ``captum`` holds the Captum
    methods' settings (handed to them, recorded in the protocol)."""

    model: str = "scenes-rn"
    dataset: str = "scenes"
    methods: Sequence[str] = DEFAULT_METHODS
    metrics: Sequence[str] = DEFAULT_METRICS
    n: int = 32
    n_subset: Optional[int] = None
    batch_size: int = 4
    seed: int = 10_000
    device: str = "cpu"
    out: str = "benchmark_out"
    path: Optional[str] = None            # ImageNet-S gtsegs_ijcv.mat
    del_ins_steps: int = 8
    infidelity_samples: int = 4
    sensitivity_samples: int = 2
    randomisation_stages: Sequence[str] = ("attnpool", "layer4", "layer3", "stem")
    captum: CaptumSettings = CAPTUM_SETTINGS
    n_grid: int = 6
    target_mode: str = "plain"
    quiet: bool = False
    fresh: bool = False

    def key(self) -> dict:
        """The settings that must match for records to be reused: all but ``out``, ``quiet`` and ``fresh``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "quiet", "fresh")}


QUICK = dict(n=3, del_ins_steps=5, infidelity_samples=2, sensitivity_samples=1,
             randomisation_stages=("attnpool", "stem"),
             captum=CaptumSettings(ig_steps=8, gradshap_samples=4, occlusion_window=56))


def methods_for(model: nn.Module, methods: Sequence[str]) -> List[str]:
    """``methods`` unchanged for a ResNet; for a ViT, the default ResNet list :data:`DEFAULT_METHODS` becomes
    :data:`VIT_DEFAULT_METHODS` (an explicit list is kept as given)."""
    if is_vit(model) and tuple(methods) == tuple(DEFAULT_METHODS):
        return list(VIT_DEFAULT_METHODS)
    return list(methods)


def build_forward(cfg: BenchmarkConfig, classes: List[str]) -> nn.Module:
    """The zero-shot classifier over ``classes`` on ``cfg.model`` (frozen, eval mode, on ``cfg.device``)."""
    from ..models import load_clip
    from ..readout import ZeroShotClassifier
    if classes == ["object"]:
        raise ValueError("ImageNet-S has no class names in gtsegs_ijcv.mat; run it with a model whose zero-shot "
                         "head you pass through the Python API (run_benchmark(..., forward=...))")
    model, _, tokenizer = load_clip(cfg.model)
    model = model.to(cfg.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ZeroShotClassifier(model, tokenizer, classes, templates=TEMPLATES)


def target_forward(forward: nn.Module, target_mode: str) -> nn.Module:
    """The forward wrapper every method and metric uses: ``forward`` itself for ``"plain"``, its contrastive
    read-out (:func:`nha_plugin.readout.contrastive`: each column minus the mean column, same model) for
    ``"contrastive"``.

    Raises:
        ValueError: another mode, or a contrastive read-out of fewer than 2 classes.
    """
    if target_mode not in TARGET_MODES:
        raise ValueError(f"unknown target_mode {target_mode!r}; expected one of {TARGET_MODES}")
    return contrastive(forward) if target_mode == "contrastive" else forward


def benchmark_key(cfg: BenchmarkConfig, forward: nn.Module, items: Sequence[BenchItem], classes: Sequence[str]) -> dict:
    """The run key of a benchmark (:func:`nha_plugin.runs.run_key`): configuration, data identity (images, masks,
    labels, classes), the model's weights and the read-out (exact fingerprints: another dtype is another run)."""
    data = {"n_items": len(items), "images": images_fingerprint([it.image for it in items]),
            "masks": images_fingerprint([np.asarray(it.mask, dtype=bool) for it in items]),
            "labels": [it.label for it in items], "classes": list(classes)}
    readout = {"matrix": tensor_fingerprint(forward.readout, exact=True),
               "logit_scale": float(getattr(forward, "logit_scale", 1.0)),
               "normalize": bool(getattr(forward, "normalize", False))}
    return run_key(cfg.key(), data=data, weights=module_fingerprint(model_of(forward), exact=True),
                   version=RECORDS_VERSION, readout=readout)


def _usable_methods(names: Sequence[str]) -> List[str]:
    """``names`` without the unavailable ones (warned about); ValueError for a name nobody registered."""
    usable = []
    for name in names:
        try:
            get_method(name)
        except MethodUnavailableError as err:
            warnings.warn(f"{err}; skipped", stacklevel=3)
            continue
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        usable.append(name)
    return usable


def run_benchmark(cfg: BenchmarkConfig, forward: Optional[nn.Module] = None, items: Optional[List[BenchItem]] = None,
                  classes: Optional[List[str]] = None) -> dict:
    """Run ``cfg`` (resuming what ``cfg.out`` holds of the same run).

    Args:
        cfg: the configuration.
        forward, items, classes: override the model's zero-shot classifier and the dataset.

    Returns:
        The results dict, also written to ``OUT/results.json`` (+ ``results.md``, ``heatmaps.png``,
        ``metric_<name>.png``). Under torchrun (an initialised ``torch.distributed`` group) the batches are dealt
        over the ranks and rank 0 merges every rank's records into the same results a single process writes; the
        other ranks return ``{}``.

    Raises:
        RunMismatchError: ``cfg.out`` holds another run (use ``fresh=True`` or another folder).
        CorruptFileError: a record or map file there is damaged (names the file).
    """
    if cfg.target_mode not in TARGET_MODES:             # before any loading: a typo fails at once
        raise ValueError(f"unknown target_mode {cfg.target_mode!r}; expected one of {TARGET_MODES}")
    if items is None:
        items, classes, data_desc = load_benchmark_data(cfg.dataset, cfg.n, cfg.seed, cfg.path)
    else:
        data_desc = f"{len(items)} user-supplied images"
    items = items[:cfg.n]
    forward = target_forward(forward if forward is not None else build_forward(cfg, classes), cfg.target_mode)
    methods = _usable_methods(methods_for(model_of(forward), cfg.methods))
    out = Path(cfg.out)
    rank, world = dist_info()
    # under torchrun rank 0 alone creates (or, with fresh, wipes) the run folder; the others open it once keyed
    run = RunDir(out, benchmark_key(cfg, forward, items, classes), fresh=cfg.fresh) if rank == 0 else None
    barrier()
    run = run or RunDir(out, benchmark_key(cfg, forward, items, classes))
    if rank == 0 and not run.resumed and (out / "records").is_dir():
        warnings.warn(f"{out}/records holds records of an older harness version; they are not reused (delete "
                      "the folder)", stacklevel=2)
    device = next(forward.parameters()).device
    x_all = items_to_tensor(items).to(device)
    target_all = torch.tensor([classes.index(it.label) for it in items], device=device)
    with torch.no_grad():
        logits = torch.cat([forward(x_all[i:i + 16]) for i in range(0, len(items), 16)])
    accuracy = float((logits.argmax(-1) == target_all).float().mean())
    randomised = []
    if "randomisation" in cfg.metrics:
        randomised = randomised_copies(forward, cfg.randomisation_stages, seed=cfg.seed)
    scorer = _Scorer(cfg, forward, x_all, target_all, items, randomised, run)
    scorer.run_all(methods, rank, world)
    barrier()
    if rank != 0:                       # rank 0 alone reads every rank's records and writes the results
        return {}

    # index order (and one record per image, should two runs have shared the folder): the means of a resumed
    # run add up in the same order as an uninterrupted run's
    records = {name: [r for _, r in sorted({r["index"]: r for r in read_records(run.records(name))}.items())]
               for name in methods}
    results = report.summarise(cfg, records, data_desc, accuracy, classes)
    results["protocol"]["weights_sha256"] = run.key["weights"]
    write_json(out / "results.json", results)
    write_text(out / "results.md", report.markdown(results))
    heatmap_grid(items[:cfg.n_grid], methods, scorer.load_map, out / "heatmaps.png")
    metric_charts(results, out)
    if not cfg.quiet:
        print(report.table(results))
    return results


@dataclass
class _Scorer:
    """The shared inputs of a run and the scoring of one method on one batch."""

    cfg: BenchmarkConfig
    forward: nn.Module
    x_all: torch.Tensor
    target_all: torch.Tensor
    items: List[BenchItem]
    randomised: List[nn.Module]
    run: RunDir

    def run_all(self, methods: Sequence[str], rank: int = 0, world: int = 1) -> None:
        """Score every method on every batch of this rank that lacks a record, appending the missing records.

        Batches are dealt round-robin over the ``world`` processes (rank r scores batches r, r + W, ...); all
        append to the same record files (one ``write`` per line with O_APPEND, so lines never interleave)."""
        from tqdm.auto import tqdm
        n, size = len(self.items), self.cfg.batch_size
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)][rank::world]
        with tqdm(total=len(methods) * len(batches), desc="benchmark", disable=self.cfg.quiet or rank != 0) as bar:
            for name in methods:
                bar.set_postfix_str(name)
                path = self.run.records(name)
                done = {r["index"] for r in read_records(path)}
                for idx in batches:
                    if any(i not in done for i in idx):
                        rows = self.score(get_method(name), idx)
                        append_records(path, [r for r in rows if r["index"] not in done])
                    bar.update(1)

    def load_map(self, method: str, index: int) -> Optional[np.ndarray]:
        """The saved (S, S) map of image ``index``, or None."""
        part = self.run.load_part(f"map-{method}-{index}")
        return None if part is None else part["map"].float().numpy()

    def _explain(self, method: Method, forward: nn.Module, x: torch.Tensor, t: torch.Tensor, seeds: List[int]):
        return explain(method, forward, x, t, captum=self.cfg.captum, seeds=seeds)

    def score(self, method: Method, idx: List[int]) -> List[Dict[str, object]]:
        """Explain images ``idx`` (one batch) with ``method`` and score every map; one record per image."""
        x, seeds = self.x_all[idx], image_seeds(self.cfg.seed, idx)
        with global_rngs_restored(x.device):
            seed_globals(seeds[0])          # methods that draw from the global generators repeat on a rerun
            return self._score(method, idx, seeds)

    def _score(self, method: Method, idx: List[int], seeds: List[int]) -> List[Dict[str, object]]:
        cfg, want = self.cfg, set(self.cfg.metrics)
        x, t = self.x_all[idx], self.target_all[idx]
        ex = self._explain(method, self.forward, x, t, seeds)
        infid = (M.infidelity(self.forward, x, t, ex.maps.to(x.dtype), n_perturb_samples=cfg.infidelity_samples,
                              seeds=seeds).tolist() if "infidelity" in want else None)
        rows = []
        for j, i in enumerate(idx):
            heat, mask = ex.maps[j].cpu().numpy(), self.items[i].mask
            r: Dict[str, object] = {"index": i, "seconds_per_image": ex.seconds_per_image}
            if "pointing_game" in want:
                r["pointing_game"] = M.pointing_game(heat, mask)
            if "mass_in_mask" in want:
                r["mass_in_mask"] = M.mass_in_mask(heat, mask)
            if "segmentation" in want:
                r["segmentation"] = M.segmentation_counts(heat, mask)
            if "deletion_insertion" in want:
                r.update(M.deletion_insertion(self.forward, x[j], int(t[j]), ex.maps[j], steps=cfg.del_ins_steps))
            if infid is not None:
                r["infidelity"] = float(infid[j])
            if "completeness_error" in want and ex.completeness_error is not None:
                r["completeness_error"] = float(ex.completeness_error[j])
            if i < cfg.n_grid:
                self.run.save_part(f"map-{method.name}-{i}", {"map": ex.maps[j].to(torch.float16)})
            rows.append(r)
        sub = [j for j, i in enumerate(idx) if cfg.n_subset is None or i < cfg.n_subset]
        if sub:
            self._score_subset(method, ex.maps[sub], x[sub], t[sub], [seeds[j] for j in sub], [rows[j] for j in sub])
        return rows

    def _score_subset(self, method: Method, maps: torch.Tensor, xs: torch.Tensor, ts: torch.Tensor,
                      seeds: List[int], rows: List[dict]) -> None:
        """Max-sensitivity and the randomisation check (each reruns the method) on the subset images."""
        if "max_sensitivity" in self.cfg.metrics:
            def expl(z, target):
                if z.shape == xs.shape and torch.equal(z, xs):   # Captum re-explains the unperturbed inputs
                    return maps
                copies = z.shape[0] // xs.shape[0]                # each image's perturbed copies are consecutive
                return self._explain(method, self.forward, z, target, [s for s in seeds for _ in range(copies)]).maps

            sens = M.max_sensitivity(expl, xs, target=ts, n_perturb_samples=self.cfg.sensitivity_samples, seeds=seeds)
            for k, r in enumerate(rows):
                r["max_sensitivity"] = float(sens[k])
        if self.randomised:
            stage_maps = [self._explain(method, fr, xs, ts, seeds).maps.cpu().numpy() for fr in self.randomised]
            for k, r in enumerate(rows):
                r.update(M.randomisation_similarity(maps[k].cpu().numpy(), [sm[k] for sm in stage_maps]))
