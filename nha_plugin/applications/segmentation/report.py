"""Reports of a segmentation evaluation: a figure of examples (image, truth, each method) and a markdown table."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ...files import save_figure
from .evaluation import ORACLE, ORACLE_DESCRIPTION
from .maps import METHOD_DESCRIPTIONS

__all__ = ["palette", "plot_examples", "results_markdown"]


def palette(k: int) -> np.ndarray:
    """Class colours: (k + 1, 3) float RGB; the last row (black) is for ignored pixels."""
    import matplotlib
    if k <= 20:
        # tab20 holds 10 hues, each dark then light: take the dark ones first so neighbouring classes differ in hue
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        cols = np.asarray([matplotlib.colormaps["tab20"](i)[:3] for i in order[:k]])
    else:
        cols = np.random.default_rng(0).uniform(0.15, 1.0, size=(k, 3))
    return np.vstack([cols, np.zeros((1, 3))])


def plot_examples(examples: Sequence[dict], class_names: Sequence[str], path: Union[str, Path],
                  ignore_index: int = 255, scores: Optional[Mapping[str, float]] = None) -> Path:
    """A grid, one row per example: image, ground truth, each method's prediction (same class colours; ignored
    pixels black); a legend of the classes below. Written atomically (:func:`nha_plugin.files.save_figure`).

    Args:
        examples: ``result["examples"]`` of :func:`.evaluation.evaluate`: {"image" (H, W, 3), "label" (H, W),
            "pred": {method: (H, W)}}.
        class_names: the K classes.
        path: the image file (its suffix gives the format).
        ignore_index: label drawn black.
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
    pal = palette(K)

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
        handles = [Patch(color=pal[i], label=name) for i, name in enumerate(class_names)]
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
    lines = [f"# {title}", ""] + [f"- {p}" for p in protocol] + ["", "| method | mIoU | pixAcc | mAcc | definition |",
                                                                     "|---|---|---|---|---|"]
    desc = dict(METHOD_DESCRIPTIONS, **{ORACLE: ORACLE_DESCRIPTION})
    for m, s in rows:
        lines.append(f"| {m} | {100 * s['miou']:.1f} | {100 * s['pixacc']:.1f} | {100 * s['macc']:.1f} | "
                     f"{desc.get(m, '')} |")
    names = result["class_names"]
    lines += ["", "Per-class IoU (%):", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for m, s in rows:
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.0f}" for v in s["iou"]) + " |")
    return "\n".join(lines) + "\n"
