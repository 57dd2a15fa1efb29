"""Metrics that score attribution maps, each with a name, ``higher_is_better`` and a known-answer test.

Maps are (S, S) (or (B, S, S)) pixel maps after :func:`nha_plugin.harness.registry.to_pixel_map`; masks are
bool (S, S). Every metric applies its own normalisation, identically to every method:

- localisation (pointing game, mass in mask, segmentation) read the map as given; mass and segmentation
  clip negatives first (positive evidence for the target), segmentation then min-max normalises.
- deletion / insertion rank pixels by the map (descending; ties in index order).
- infidelity / max-sensitivity go through ``captum.metrics`` with the map spread evenly over the 3 channels.

Per-image metrics return floats; segmentation returns counts that :func:`segmentation_summary` accumulates over
the dataset (the ImageNet-Segmentation protocol: pixAcc and mIoU from dataset totals, mAP = mean per-image AP).
The random metrics (infidelity, max-sensitivity) take per-image ``seeds``: each image's perturbations then
depend only on its seed, so any subset of a batch scores as it does inside the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MetricInfo", "METRICS", "pointing_game", "mass_in_mask", "segmentation_counts", "segmentation_summary",
           "average_precision", "perturbation_curve", "deletion_insertion", "auc", "infidelity", "max_sensitivity",
           "map_similarity", "randomisation_similarity", "DEL_INS_SETTINGS", "INFIDELITY_SETTINGS",
           "SENSITIVITY_SETTINGS"]


@dataclass(frozen=True)
class MetricInfo:
    """Name, direction and a one-line definition for the protocol and the report."""

    name: str
    higher_is_better: bool
    description: str
    # per_image | dataset (accumulated over images) | reruns (per image, reruns the method: the metrics a
    # BenchmarkConfig.n_subset restricts to the first images)
    kind: str = "per_image"


METRICS: Dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("pointing_game", True, "1 if the map's maximum falls inside the object's mask (no tolerance)"),
    MetricInfo("mass_in_mask", True, "share of the positive map mass inside the mask (Arras et al. relevance mass)"),
    MetricInfo("pixacc", True, "ImageNet-Seg protocol: clip<0, min-max, threshold at the map mean; correct pixels "
                               "/ all pixels over the dataset", "dataset"),
    MetricInfo("miou", True, "ImageNet-Seg protocol: mean over {background, object} of dataset-total IoU", "dataset"),
    MetricInfo("map", True, "mean per-image average precision of the soft (clipped, min-max) map", "dataset"),
    MetricInfo("deletion_auc", False, "area under p(target) as the top-ranked pixels are set to the mean colour "
                                      "(0 after normalisation)"),
    MetricInfo("insertion_auc", True, "area under p(target) as the top-ranked pixels are copied onto a blurred "
                                      "image (Gaussian, sigma 8 px)"),
    MetricInfo("infidelity", False, "captum.metrics.infidelity, Gaussian perturbations, normalize=True"),
    MetricInfo("max_sensitivity", False, "captum.metrics.sensitivity_max, uniform L-inf perturbations", "reruns"),
    MetricInfo("randomisation_spearman", False, "mean Spearman rank correlation with the original map as the image "
                                                "tower is randomised top-down (cascading)", "reruns"),
    MetricInfo("randomisation_spearman_abs", False, "same on |map|", "reruns"),
    MetricInfo("randomisation_ssim", False, "same with SSIM of the min-max normalised maps", "reruns"),
    MetricInfo("completeness_error", False, "|sum of attributions + reported constants - claimed total| / |logit|; "
                                            "only for methods that claim completeness"),
    MetricInfo("seconds_per_image", False, "wall time of the method per image, batch as run"),
]}


# ---- localisation ------------------------------------------------------------------------------------------
def pointing_game(heat: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> float:
    """1.0 if the arg-max of ``heat`` (first in row-major order on ties) lies within ``tolerance`` pixels of
    the mask, else 0.0."""
    heat, mask = np.asarray(heat), np.asarray(mask, dtype=bool)
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if tolerance <= 0:
        return float(mask[r, c])
    rr, cc = np.nonzero(mask)
    return float(((rr - r) ** 2 + (cc - c) ** 2).min() <= tolerance ** 2) if rr.size else 0.0


def mass_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """sum(max(heat, 0) inside mask) / sum(max(heat, 0)); 0 for an all-non-positive map."""
    pos = np.clip(np.asarray(heat, dtype=np.float64), 0, None)
    total = pos.sum()
    return float(pos[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else 0.0


def _soft_map(heat: np.ndarray) -> np.ndarray:
    """ImageNet-Seg post-processing: clip negatives, min-max normalise (a constant map becomes 0)."""
    h = np.clip(np.asarray(heat, dtype=np.float64), 0, None)
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the positive ``labels`` (step-wise, as scikit-learn's
    ``average_precision_score``; tied scores form one threshold). NaN when there is no positive."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]       # last index of each distinct threshold
    tp, n = tp[last], last + 1
    precision, recall = tp / n, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def segmentation_counts(heat: np.ndarray, mask: np.ndarray, threshold: Optional[float] = None) -> Dict[str, float]:
    """Per-image counts of the ImageNet-Segmentation protocol (docs/methods.md §2): clip negatives, min-max normalise,
    threshold at the soft map's mean (or at a fixed ``threshold`` on the normalised map: the second-order paper's
    0.5). Returns correct/labelled pixels, intersection and union for background (0) and object (1), and the
    image's average precision of the soft map."""
    soft = _soft_map(heat)
    gt = np.asarray(mask, dtype=bool)
    pred = soft > (soft.mean() if threshold is None else threshold)
    out = {"correct": float((pred == gt).sum()), "labelled": float(gt.size), "ap": average_precision(soft, gt)}
    for cls, (p, g) in enumerate([(~pred, ~gt), (pred, gt)]):
        out[f"inter{cls}"] = float((p & g).sum())
        out[f"union{cls}"] = float((p | g).sum())
    return out


def segmentation_summary(counts: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """pixAcc, mIoU (dataset totals) and mAP (mean of per-image APs) from :func:`segmentation_counts` rows."""
    tot = {k: sum(c[k] for c in counts) for k in ("correct", "labelled", "inter0", "union0", "inter1", "union1")}
    ious = [tot[f"inter{c}"] / tot[f"union{c}"] for c in (0, 1) if tot[f"union{c}"] > 0]
    aps = [c["ap"] for c in counts if not np.isnan(c["ap"])]
    return {"pixacc": tot["correct"] / max(tot["labelled"], 1), "miou": float(np.mean(ious)) if ious else float("nan"),
            "map": float(np.mean(aps)) if aps else float("nan")}


# ---- faithfulness: deletion / insertion -----------------------------------------------------------------
DEL_INS_SETTINGS = dict(steps=8, blur_sigma=8.0, batch=9)


def auc(values: Sequence[float]) -> float:
    """Trapezoidal area under a curve sampled at evenly spaced fractions 0..1."""
    v = np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2).mean()) if v.size > 1 else float(v[0])


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


@torch.no_grad()
def perturbation_curve(score_fn: Callable[[Tensor], Tensor], image: Tensor, heat: Tensor, start: Tensor,
                       end: Tensor, steps: int, batch: int = 11) -> np.ndarray:
    """Scores of images that move from ``start`` to ``end`` pixel by pixel in the order of ``heat`` (descending).

    At step k (0..steps) the top ``round(k/steps * S*S)`` pixels (all channels) take their value from ``end``
    and the rest from ``start``. ``score_fn`` maps (N, 3, S, S) to (N,) scores. Returns (steps + 1,)."""
    S2 = heat.numel()
    order = torch.argsort(-heat.flatten().float(), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(S2, device=order.device)
    rank = rank.view(1, 1, *heat.shape)
    counts = [round(k / steps * S2) for k in range(steps + 1)]
    out = []
    for i in range(0, len(counts), batch):
        cs = torch.tensor(counts[i:i + batch], device=image.device).view(-1, 1, 1, 1)
        sel = rank < cs                                                      # (n, 1, S, S)
        imgs = torch.where(sel, end.expand(len(cs), -1, -1, -1), start.expand(len(cs), -1, -1, -1))
        out.append(score_fn(imgs).float().cpu())
    return torch.cat(out).numpy()


def deletion_insertion(forward: nn.Module, image: Tensor, target: int, heat: Tensor,
                       steps: Optional[int] = None) -> Dict[str, float]:
    """Deletion and insertion AUC of p(target) = softmax(forward(x))[target] for one image (3, S, S).

    Deletion: top-ranked pixels are set to 0 (the dataset mean colour after CLIP normalisation).
    Insertion: top-ranked pixels are copied onto a Gaussian-blurred copy (sigma ``DEL_INS_SETTINGS['blur_sigma']``)."""
    steps = steps or DEL_INS_SETTINGS["steps"]
    x = image[None]

    def prob(imgs):
        return forward(imgs).softmax(dim=-1)[:, target]

    dele = perturbation_curve(prob, x, heat, x, torch.zeros_like(x), steps, DEL_INS_SETTINGS["batch"])
    ins = perturbation_curve(prob, x, heat, _blur(x, DEL_INS_SETTINGS["blur_sigma"]), x, steps, DEL_INS_SETTINGS["batch"])
    return {"deletion_auc": auc(dele), "insertion_auc": auc(ins)}


# ---- captum.metrics ---------------------------------------------------------------------------------------
INFIDELITY_SETTINGS = dict(noise_std=0.1, n_perturb_samples=4, seed=0)
SENSITIVITY_SETTINGS = dict(perturb_radius=0.02, n_perturb_samples=2, seed=0)


def _spread(heat: Tensor, channels: int) -> Tensor:
    """(B, S, S) map -> (B, C, S, S) input-shaped attribution with the same per-pixel sum."""
    return heat[:, None].expand(-1, channels, -1, -1) / channels


def _perturbation_draws(draw: Callable[[tuple, torch.Generator], Tensor], images: Tensor, default_seed: int,
                        seeds: Optional[Sequence[int]]) -> Callable[[Tensor], Tensor]:
    """A function giving random draws shaped like Captum's expanded batch x (n * B, ...), in which each image's n
    perturbed copies are consecutive rows. Without ``seeds`` one generator (seeded ``default_seed``) serves
    every call in turn; with them, image b's rows come from a generator seeded ``seeds[b]`` (one call only)."""
    device = images.device
    if seeds is None:
        g = torch.Generator(device=device).manual_seed(default_seed)
        return lambda x: draw(x.shape, g)
    if len(seeds) != images.shape[0]:
        raise ValueError(f"seeds must hold one seed per image ({images.shape[0]}); got {len(seeds)}")

    def per_image(x: Tensor) -> Tensor:
        n, rest = divmod(x.shape[0], len(seeds))
        if rest:
            raise ValueError(f"expected {len(seeds)} images' perturbations in one batch; got {x.shape[0]} rows")
        return torch.cat([draw((n, *x.shape[1:]), torch.Generator(device=device).manual_seed(int(s)))
                          for s in seeds])
    return per_image


def infidelity(forward: Callable, images: Tensor, target: Tensor, heat: Tensor, normalize: bool = True,
               noise_std: Optional[float] = None, n_perturb_samples: Optional[int] = None,
               seeds: Optional[Sequence[int]] = None) -> Tensor:
    """``captum.metrics.infidelity`` with Gaussian perturbations I ~ N(0, noise_std^2) per pixel and channel:
    E[(I . attribution - (f(x) - f(x - I)))^2] (after Captum's optimal rescaling when ``normalize``).

    Args:
        forward: images (B, 3, S, S) -> logits (B, K).
        images: (B, 3, S, S).
        target: (B,) read-out columns.
        heat: (B, S, S) maps (spread evenly over the channels) or (B, 3, S, S) attributions.
        normalize, noise_std, n_perturb_samples: as in Captum (defaults :data:`INFIDELITY_SETTINGS`).
        seeds: one seed per image for its noise (default: one generator seeded ``INFIDELITY_SETTINGS['seed']``
            for the whole batch).

    Returns:
        (B,) infidelity.
    """
    from captum.metrics import infidelity as captum_infidelity
    std = INFIDELITY_SETTINGS["noise_std"] if noise_std is None else noise_std
    n = n_perturb_samples or INFIDELITY_SETTINGS["n_perturb_samples"]
    noise_like = _perturbation_draws(
        lambda shape, g: torch.randn(shape, generator=g, device=images.device, dtype=images.dtype) * std,
        images, INFIDELITY_SETTINGS["seed"], seeds)

    def perturb(x):
        noise = noise_like(x)
        return noise, x - noise

    attr = heat if heat.shape == images.shape else _spread(heat.to(images.dtype), images.shape[1])
    with torch.no_grad():
        return captum_infidelity(forward, perturb, images, attr, target=target, n_perturb_samples=n,
                                 max_examples_per_batch=n * images.shape[0], normalize=normalize)


def max_sensitivity(explanation_fn: Callable[..., Tensor], images: Tensor, target: Optional[Tensor] = None,
                    perturb_radius: Optional[float] = None, n_perturb_samples: Optional[int] = None,
                    seeds: Optional[Sequence[int]] = None) -> Tensor:
    """``captum.metrics.sensitivity_max``: max over uniform L-inf perturbations of radius r of
    ||expl(x + d) - expl(x)|| / ||expl(x)|| (Frobenius norms).

    Args:
        explanation_fn: ``explanation_fn(images, target=...)`` maps (N, 3, S, S) to maps of any shape; Captum
            calls it on the batch and on the perturbed batch, where image b's copies are consecutive rows.
        images: (B, 3, S, S).
        target: (B,) or None; Captum repeats it with the perturbed batch.
        perturb_radius, n_perturb_samples: defaults :data:`SENSITIVITY_SETTINGS`.
        seeds: one seed per image for its perturbations (default: one generator seeded
            ``SENSITIVITY_SETTINGS['seed']`` for the whole batch).

    Returns:
        (B,) max-sensitivity.
    """
    from captum.metrics import sensitivity_max
    r = SENSITIVITY_SETTINGS["perturb_radius"] if perturb_radius is None else perturb_radius
    n = n_perturb_samples or SENSITIVITY_SETTINGS["n_perturb_samples"]
    uniform_like = _perturbation_draws(
        lambda shape, g: torch.rand(shape, generator=g, device=images.device, dtype=images.dtype),
        images, SENSITIVITY_SETTINGS["seed"], seeds)

    def perturb(x):
        x = x[0] if isinstance(x, tuple) else x
        return x + (uniform_like(x) * 2 - 1) * r

    def fn(x, **kwargs):
        return (explanation_fn(x[0] if isinstance(x, tuple) else x, **kwargs),)

    kwargs = {} if target is None else {"target": target}
    return sensitivity_max(fn, images, perturb_func=perturb, n_perturb_samples=n,
                           max_examples_per_batch=n * images.shape[0], **kwargs)


# ---- model-parameter randomisation ------------------------------------------------------------------------
def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(x.ravel())


def map_similarity(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Spearman rank correlation (raw and of |map|) and SSIM of the min-max normalised maps.
    A constant map has Spearman 0 against anything (no ranking information)."""
    from skimage.metrics import structural_similarity

    def spearman(x, y):
        rx, ry = _rank(x), _rank(y)
        if rx.std() == 0 or ry.std() == 0:
            return 0.0
        return float(np.corrcoef(rx, ry)[0, 1])

    def mm(x):
        x = np.asarray(x, dtype=np.float64)
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)

    return {"spearman": spearman(a, b), "spearman_abs": spearman(np.abs(a), np.abs(b)),
            "ssim": float(structural_similarity(mm(a), mm(b), data_range=1.0))}


def randomisation_similarity(original: np.ndarray, randomised: Sequence[np.ndarray]) -> Dict[str, object]:
    """Similarity of a map with its versions under cascading randomisation. Returns the per-stage curves and
    their means (``randomisation_spearman``, ``..._abs``, ``..._ssim``): lower = more sensitive to parameters."""
    curves: Dict[str, List[float]] = {"spearman": [], "spearman_abs": [], "ssim": []}
    for r in randomised:
        for k, v in map_similarity(original, r).items():
            curves[k].append(v)
    out: Dict[str, object] = {f"randomisation_{k}": float(np.mean(v)) for k, v in curves.items()}
    out["curves"] = curves
    return out
