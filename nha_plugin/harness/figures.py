"""The benchmark's figures: a grid of heat maps (one row per method) and one bar chart per metric.

Reading them at a glance:

- every heat map has its own colour bar; a method whose maps take negative values anywhere in the grid (IG,
  InputXGradient, GradientShap, NAD, ...) is drawn with a diverging colour map centred at 0 (red positive, blue
  negative, white 0) and symmetric limits; the others with a sequential map from their minimum. Colour limits
  are the 99.5th percentile of |map| (resp. of the map), so a few extreme pixels do not wash the rest out; the
  colour bar says so with its pointed ends.
- bar charts show the mean and its 95% bootstrap interval, coloured by method family with a legend; log-scaled
  axes get at most one labelled tick per decade and no minor labels.

User strings (class names, method names) are drawn with mathtext off, so ``$`` or ``\\`` in a class name is shown
as written instead of being typeset or raising.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..files import save_figure
from . import metrics as M
from .report import COLUMNS

__all__ = ["heatmap_grid", "metric_charts", "FAMILY_COLOURS", "is_signed", "colour_limits"]

FAMILY_COLOURS = {"nad": "tab:red", "clip": "tab:green", "captum": "tab:blue", "zennit": "tab:purple",
                  "vit": "tab:brown", "floor": "tab:gray", "user": "tab:orange"}
PERCENTILE = 99.5


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def is_signed(maps: Sequence[Optional[np.ndarray]]) -> bool:
    """Whether any of a method's maps has a negative value beyond rounding (1e-6 of its largest magnitude)."""
    for m in maps:
        if m is None:
            continue
        m = np.asarray(m, dtype=np.float64)
        scale = np.abs(m).max()
        if scale > 0 and m.min() < -1e-6 * scale:
            return True
    return False


def colour_limits(heat: np.ndarray, signed: bool) -> tuple:
    """``(vmin, vmax)``: symmetric +-(99.5th percentile of |heat|) for a signed map; (min, 99.5th percentile)
    otherwise; a constant map gets a unit-wide range around its value."""
    h = np.asarray(heat, dtype=np.float64)
    if signed:
        top = float(np.percentile(np.abs(h), PERCENTILE))
        top = top if top > 0 else float(np.abs(h).max()) or 1.0
        return -top, top
    low, top = float(h.min()), float(np.percentile(h, PERCENTILE))
    if top <= low:
        top = float(h.max()) if h.max() > low else low + 1.0
    return low, top


def heatmap_grid(items, methods: Sequence[str], load_map: Callable[[str, int], Optional[np.ndarray]],
                 path: Path) -> Optional[Path]:
    """PNG grid: one row per method, one column per image, each map with its colour bar, object outlined.

    Args:
        items: the :class:`~nha_plugin.harness.data.BenchItem` columns (image (S, S, 3), mask, label).
        methods: candidate rows; a method without a map for the first image is left out.
        load_map: ``load_map(method, i)`` -> the (S, S) map of the benchmark's image i, or None.
        path: the PNG (written atomically).

    Returns:
        The path, or None when no method has a map.
    """
    plt = _pyplot()
    from matplotlib import ticker
    maps = {m: [load_map(m, i) for i in range(len(items))] for m in methods}
    rows = [m for m in methods if items and maps[m][0] is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows) + 1, len(items), figsize=(2.1 * len(items) + 1.2, 1.75 * (len(rows) + 1)),
                             squeeze=False)
    for j, it in enumerate(items):
        axes[0, j].imshow(it.image)
        axes[0, j].set_title(str(it.label), fontsize=8, parse_math=False)
        axes[0, j].contour(it.mask, levels=[0.5], colors="w", linewidths=0.8)
    for i, m in enumerate(rows, start=1):
        signed = is_signed(maps[m])
        cmap = "RdBu_r" if signed else "viridis"
        axes[i, 0].set_ylabel(f"{m}\n({'signed' if signed else 'unsigned'})", fontsize=7, rotation=0, ha="right",
                              va="center", parse_math=False)
        for j, it in enumerate(items):
            ax, heat = axes[i, j], maps[m][j]
            ax.imshow(np.asarray(it.image).mean(axis=-1), cmap="gray", alpha=0.45)
            if heat is None:
                continue
            vmin, vmax = colour_limits(heat, signed)
            im = ax.imshow(np.asarray(heat, dtype=np.float32), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.75)
            ax.contour(it.mask, levels=[0.5], colors="k", linewidths=0.6)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                              extend="both" if signed else "max")
            cb.ax.tick_params(labelsize=5, length=2)
            cb.locator = ticker.MaxNLocator(nbins=3, symmetric=signed)
            cb.formatter = ticker.FuncFormatter(lambda v, _: f"{v:.2g}")
            cb.update_ticks()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Heat maps for the target class. Signed methods: diverging colours centred at 0 (red +, blue -); "
                 f"colour limits at the {PERCENTILE:g}th percentile of |map|. Outline: the explained object.",
                 fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    save_figure(path, fig, dpi=90)
    plt.close(fig)
    return Path(path)


def _log_axis(ax, values: List[float]) -> None:
    """A log x axis with one labelled tick per decade (fewer when the range spans many decades), no minor
    labels, so labels never overlap."""
    from matplotlib import ticker
    ax.set_xscale("log")
    lo, hi = min(values), max(values)
    decades = max(1, math.ceil(math.log10(hi)) - math.floor(math.log10(lo)))
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, numticks=min(decades + 1, 6)))
    ax.xaxis.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10) * 0.1, numticks=12))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))


LOG_SCALED = ("completeness_error", "seconds_per_image", "max_sensitivity", "infidelity")


def metric_charts(results: dict, out: Path) -> List[Path]:
    """One horizontal bar chart per metric: mean and 95% bootstrap interval per method, coloured by family.

    Args:
        results: the results dict (:func:`~nha_plugin.harness.report.summarise`).
        out: the folder; charts are written as ``metric_<key>.png``.

    Returns:
        The paths written.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch
    paths = []
    for key, _ in COLUMNS:
        ms = [(n, e) for n, e in results["methods"].items() if key in e and e[key]["mean"] is not None]
        if not ms:
            continue
        vals = np.array([e[key]["mean"] for _, e in ms])
        cis = np.array([[np.nan if c is None else c for c in (e[key].get("ci95") or [None, None])] for _, e in ms])
        lower = np.where(np.isfinite(cis[:, 0]), vals - cis[:, 0], 0).clip(min=0)
        upper = np.where(np.isfinite(cis[:, 1]), cis[:, 1] - vals, 0).clip(min=0)
        families = [e["family"] for _, e in ms]
        fig, ax = plt.subplots(figsize=(6.2, 0.3 * len(ms) + 1.4))
        log = key in LOG_SCALED and vals.min() > 0
        if log:
            lower = np.minimum(lower, vals * (1 - 1e-9))            # a log axis cannot show a bar below 0
        ax.barh(range(len(ms)), vals, xerr=[lower, upper], ecolor="k", capsize=2,
                color=[FAMILY_COLOURS.get(f, "tab:orange") for f in families])
        ax.set_yticks(range(len(ms)))
        ax.set_yticklabels([n for n, _ in ms], fontsize=7)
        for label in ax.get_yticklabels():
            label.set_parse_math(False)
        ax.invert_yaxis()
        if log:
            _log_axis(ax, list(vals - lower) + list(vals + upper))
        info = M.METRICS[key]
        ax.set_title(f"{key} ({'higher' if info.higher_is_better else 'lower'} is better); "
                     "bars: mean, whiskers: 95% bootstrap interval over images", fontsize=8)
        seen: Dict[str, None] = dict.fromkeys(families)
        ax.legend(handles=[Patch(color=FAMILY_COLOURS.get(f, "tab:orange"), label=f) for f in seen],
                  title="family", fontsize=7, title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), framealpha=0.85)
        fig.tight_layout()
        p = save_figure(Path(out) / f"metric_{key}.png", fig, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
