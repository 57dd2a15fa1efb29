"""Reports of a segmentation evaluation: a figure of examples (image, truth, each method) and a markdown table."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ...files import save_figure
from ...markup import md_cell, md_row
from .evaluation import ORACLE, ORACLE_DESCRIPTION
from .maps import METHOD_DESCRIPTIONS

__all__ = ["named_colour", "palette", "plot_examples", "results_markdown"]


# ignored pixels: black, or the farthest of these from every class colour when a class is (near) black
IGNORE_COLOURS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0))


def named_colour(name: str) -> Optional[Tuple[float, float, float]]:
    """The RGB (0..1) of a class named after a colour ("black", "gray", "light blue": CSS colour names, spaces and
    case ignored), else None."""
    from matplotlib.colors import CSS4_COLORS, to_rgb
    key = "".join(str(name).lower().split())
    return tuple(float(v) for v in to_rgb(CSS4_COLORS[key])) if key in CSS4_COLORS else None


def palette(class_names: Union[int, Sequence[str]]) -> np.ndarray:
    """Class colours: (K + 1, 3) float RGB, the last row for ignored pixels.

    A class named after a colour is drawn in that colour (:func:`named_colour`: "black" black, "gray" gray), so a
    figure of scenes' backgrounds reads at a glance; the other classes take distinct colours (tab20's dark hues, then
    its light ones, then seeded random colours), skipping any within 0.25 (RGB distance) of a colour already used.
    Ignored pixels are black unless a class is (near) black; then the candidate (black, white, magenta, cyan) farthest
    from every class colour.

    Args:
        class_names: the K class names, or K (no names: no class is a colour).

    Returns:
        (K + 1, 3) float64 in [0, 1].
    """
    import matplotlib
    names = [None] * class_names if isinstance(class_names, int) else list(class_names)
    fixed = [named_colour(n) if n is not None else None for n in names]
    used = [np.asarray(c) for c in fixed if c is not None]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))       # tab20's dark hues first: neighbours differ in hue
    tab = [np.asarray(matplotlib.colormaps["tab20"](i)[:3]) for i in order]
    rng = np.random.default_rng(0)

    def gap(colour) -> float:
        return min((float(np.linalg.norm(colour - u)) for u in used), default=np.inf)

    cols = []
    for c in fixed:
        if c is None:
            while tab and gap(tab[0]) <= 0.25:
                tab.pop(0)
            if tab:
                c = tab.pop(0)
            else:                                   # past tab20: the farthest of 256 seeded random colours
                draws = rng.uniform(0.15, 1.0, size=(256, 3))
                c = draws[int(np.argmax([gap(d) for d in draws]))]
            used.append(np.asarray(c))
        cols.append(np.asarray(c, dtype=np.float64))

    def distance(colour) -> float:
        return min((float(np.linalg.norm(np.asarray(colour) - c)) for c in cols), default=np.inf)

    ignore = IGNORE_COLOURS[0] if distance(IGNORE_COLOURS[0]) > 0.25 else max(IGNORE_COLOURS, key=distance)
    return np.vstack(cols + [np.asarray(ignore, dtype=np.float64)]).reshape(len(cols) + 1, 3)


def plot_examples(examples: Sequence[dict], class_names: Sequence[str], path: Union[str, Path],
                  ignore_index: int = 255, scores: Optional[Mapping[str, float]] = None) -> Path:
    """A grid, one row per example: image, ground truth, each method's prediction (same class colours, :func:`palette`:
    a class named after a colour in that colour); a legend of the classes below. Written atomically (:func:`nha_plugin.files.save_figure`).

    Args:
        examples: ``result["examples"]`` of :func:`.evaluation.evaluate`: {"image" (H, W, 3), "label" (H, W),
            "pred": {method: (H, W)}}.
        class_names: the K classes.
        path: the image file (its suffix gives the format).
        ignore_index: label drawn in the palette's ignore colour (black unless a class is black).
        scores: method -> mIoU, shown in the column titles.

    Returns:
        The path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    methods = list(examples[0]["pred"])
    K = len(class_names)
    pal = palette(class_names)

    def colour(lab):
        lab = np.asarray(lab).astype(np.int64)
        return pal[np.where((lab < 0) | (lab >= K) | (lab == ignore_index), K, lab)]

    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.9 * cols, 1.9 * len(examples) + 0.9), squeeze=False)
    for r, ex in enumerate(examples):
        panels = [ex["image"], colour(ex["label"])] + [colour(ex["pred"][m]) for m in methods]
        titles = ["image", "ground truth"] + [m if not scores else f"{m} ({100 * scores[m]:.1f})" for m in methods]
        for c, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    if K <= 30:
        # a "$" in a user's class name would start matplotlib mathtext
        handles = [Patch(facecolor=pal[i], edgecolor="0.6", lw=0.5, label=str(name).replace("$", r"\$"))
                   for i, name in enumerate(class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, K), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if K <= 30 else 0, 1, 1))
    try:
        return save_figure(path, fig, dpi=100)
    finally:
        plt.close(fig)


def results_markdown(result: Mapping, title: str, protocol: Sequence[str] = ()) -> str:
    """A markdown report of :func:`.evaluation.evaluate`'s result.

    Args:
        result: its return value.
        title: the heading.
        protocol: bullet lines describing the setting.

    Returns:
        A table (method | mIoU | pixAcc | mAcc | definition), best mIoU first, then per-class IoU.
    """
    rows = sorted(result["methods"].items(), key=lambda kv: -kv[1]["miou"])
    lines = [f"# {md_cell(title)}", ""] + [f"- {md_cell(p)}" for p in protocol] + [
        "", "| method | mIoU | pixAcc | mAcc | definition |", "|---|---|---|---|---|"]
    desc = dict(METHOD_DESCRIPTIONS, **{ORACLE: ORACLE_DESCRIPTION})
    for m, s in rows:
        lines.append(md_row([m, f"{100 * s['miou']:.1f}", f"{100 * s['pixacc']:.1f}", f"{100 * s['macc']:.1f}",
                             desc.get(m, "")]))
    names = result["class_names"]
    lines += ["", "Per-class IoU (%):", "", md_row(["method", *names]), "|---|" + "---|" * len(names)]
    for m, s in rows:
        lines.append(md_row([m, *("-" if v is None else f"{100 * v:.0f}" for v in s["iou"])]))
    return "\n".join(lines) + "\n"
