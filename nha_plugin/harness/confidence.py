"""Confidence intervals and paired comparisons of benchmark scores: a percentile bootstrap over images.

What is resampled: the images (each image's record is one unit; pixels, perturbations and runs are never
resampled separately). :data:`N_BOOT` resamples of the n images, drawn with replacement by numpy's PCG64
generator seeded with the run's seed (``BenchmarkConfig.seed``); the interval is the 2.5th and 97.5th
percentile of the statistic over the resamples (95%). Every method and metric of a run reuses the same resampled
index sets for the same n (common random numbers), so intervals of different methods describe the same resamples.

Statistics (:func:`statistics_of`): per-image metrics use the mean over images; pixAcc and mIoU are recomputed
from the resampled images' pixel totals (the ImageNet-Segmentation protocol accumulates over the dataset); mAP
is the mean of the resampled images' average precisions.

Paired comparison (:func:`paired_comparison`): on the images both methods were scored on, the statistic's
difference (method minus reference) is computed on each resample of those images, with the same index set for
both methods, so the interval is that of the paired difference. The verdict is "better" or "worse" when the 95%
interval excludes 0 (in the metric's direction), otherwise "no clear difference".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["N_BOOT", "LEVEL", "resample_indices", "interval", "statistics_of", "summary_entry",
           "paired_comparison", "verdict", "Scored", "METHOD_TEXT", "PAIRED_TEXT"]

N_BOOT = 10_000
LEVEL = 0.95
METHOD_TEXT = (f"percentile bootstrap over images: {N_BOOT} resamples of the scored images with replacement "
               "(numpy PCG64 seeded with the run's seed), 2.5th-97.5th percentile of the statistic (mean over "
               "images; pixAcc/mIoU recomputed from the resampled images' pixel totals)")
PAIRED_TEXT = ("paired percentile bootstrap over the images both methods were scored on: the same resampled "
               "images for both, interval of (method - reference); verdict 'better'/'worse' when the 95% interval "
               "excludes 0 in the metric's direction, else 'no clear difference'")

# A statistic maps resampled image indices (..., n) to values (...): the leading axes are resamples.
Statistic = Callable[[np.ndarray], np.ndarray]


def resample_indices(n: int, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """Bootstrap index sets over ``n`` images.

    Args:
        n: number of images (>= 1).
        seed: the generator's seed (the run's seed).
        n_boot: number of resamples.

    Returns:
        (n_boot, n) int64 indices in [0, n), the same for the same (n, seed, n_boot).
    """
    if n < 1:
        raise ValueError(f"cannot resample {n} images")
    return np.random.Generator(np.random.PCG64(int(seed))).integers(0, n, size=(n_boot, n))


def interval(stat: Statistic, n: int, seed: int, n_boot: int = N_BOOT) -> List[float]:
    """The 95% percentile-bootstrap interval ``[low, high]`` of ``stat`` over ``n`` images."""
    values = stat(resample_indices(n, seed, n_boot))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [math.nan, math.nan]
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _mean(values: np.ndarray) -> Statistic:
    return lambda idx: values[idx].mean(axis=-1)


def _nanmean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of the finite entries along ``axis``; NaN where there is none (without numpy's empty-slice warning)."""
    ok = np.isfinite(a)
    count = ok.sum(axis=axis)
    total = np.where(ok, a, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _segmentation(counts: Sequence[Mapping[str, float]]) -> Dict[str, Statistic]:
    """pixAcc, mIoU (from the resampled images' totals) and mAP (mean of their APs) as statistics."""
    keys = ("correct", "labelled", "inter0", "union0", "inter1", "union1")
    table = np.array([[float(c[k]) for k in keys] for c in counts])                 # (n, 6)
    ap = np.array([float(c["ap"]) for c in counts])                                 # NaN for an empty mask

    def pixacc(idx):
        t = table[idx].sum(axis=-2)
        return t[..., 0] / np.maximum(t[..., 1], 1)

    def miou(idx):
        t = table[idx].sum(axis=-2)
        with np.errstate(invalid="ignore", divide="ignore"):
            ious = np.stack([t[..., 2] / t[..., 3], t[..., 4] / t[..., 5]], axis=-1)    # NaN where a union is 0
        return _nanmean(ious)

    return {"pixacc": pixacc, "miou": miou, "map": lambda idx: _nanmean(ap[idx])}


@dataclass(frozen=True)
class Scored:
    """One metric of one method: the images it rests on, its statistic, and the per-image values when the
    statistic is their mean (None for dataset-level metrics)."""

    indices: np.ndarray
    stat: Statistic
    values: Optional[np.ndarray] = None


def statistics_of(rows: Sequence[Mapping[str, object]], per_image: Sequence[str]) -> Dict[str, Scored]:
    """Each metric's statistic over a method's records.

    Args:
        rows: the method's per-image records (``index`` and metric values; ``segmentation`` counts).
        per_image: the per-image metric keys to read.

    Returns:
        ``metric -> Scored``; a metric no record holds is left out.
    """
    out: Dict[str, Scored] = {}
    for key in per_image:
        pairs = [(int(r["index"]), float(r[key])) for r in rows
                 if r.get(key) is not None and math.isfinite(float(r[key]))]
        if pairs:
            idx, vals = (np.array(v) for v in zip(*pairs))
            out[key] = Scored(idx, _mean(vals), vals)
    seg = [(int(r["index"]), r["segmentation"]) for r in rows if "segmentation" in r]
    if seg:
        idx = np.array([i for i, _ in seg])
        for key, stat in _segmentation([c for _, c in seg]).items():
            out[key] = Scored(idx, stat)
    return out


def _finite(x: float) -> Optional[float]:
    """JSON-clean: NaN and infinities become None (strict JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(x) else None


def summary_entry(scored: Scored, seed: int) -> Dict[str, object]:
    """``{"mean", "ci95": [low, high], "n", "sem"}`` of one metric for one method.

    Args:
        scored: the metric's images and statistic (:func:`statistics_of`).
        seed: the bootstrap seed.

    Returns:
        The entry: ``mean`` is the statistic on all n images; ``sem`` the standard error of the per-image values
        (None for dataset-level metrics and for one image); None stands for an undefined number.
    """
    n = len(scored.indices)
    point = float(scored.stat(np.arange(n)))
    sem = None
    if scored.values is not None and n > 1:
        sem = float(np.std(scored.values, ddof=1) / math.sqrt(n))
    low, high = interval(scored.stat, n, seed)
    return {"mean": _finite(point), "ci95": [_finite(low), _finite(high)], "n": n, "sem": _finite(sem)}


def verdict(low: Optional[float], high: Optional[float], higher_is_better: bool) -> str:
    """"better" / "worse" when the interval of (method - reference) excludes 0 in the metric's direction."""
    if low is None or high is None:
        return "no clear difference"
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no clear difference"


def paired_comparison(method: Scored, reference: Scored, seed: int, higher_is_better: bool) -> Optional[dict]:
    """Paired bootstrap of (method - reference) on their common images.

    Args:
        method, reference: the two methods' :class:`Scored` for one metric.
        seed: the bootstrap seed.
        higher_is_better: the metric's direction.

    Returns:
        ``{"difference", "ci95", "n_pairs", "verdict"}``, or None without a common image.
    """
    common = np.intersect1d(method.indices, reference.indices)
    if common.size == 0:
        return None
    # where each common image sits in each method's own records, so one resample picks the same images for both
    m_pos = _positions(method.indices, common)
    r_pos = _positions(reference.indices, common)

    def diff(idx):
        return method.stat(m_pos[idx]) - reference.stat(r_pos[idx])

    point = float(diff(np.arange(common.size)))
    low, high = (_finite(v) for v in interval(diff, common.size, seed))
    return {"difference": _finite(point), "ci95": [low, high], "n_pairs": int(common.size),
            "verdict": verdict(low, high, higher_is_better)}


def _positions(indices: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``indices`` (distinct image indices, any order) of each of ``wanted`` (all present)."""
    order = np.argsort(indices, kind="stable")
    return order[np.searchsorted(indices[order], wanted)]
