"""Aggregate benchmark records into a results dict, a Markdown table with its protocol, and figures."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..files import save_figure
from . import metrics as M
from .registry import get_method

__all__ = ["summarise", "markdown", "table", "heatmap_grid", "metric_charts", "COLUMNS"]

# (results key, column header) in table order
COLUMNS = (
    ("pointing_game", "point"), ("mass_in_mask", "mass"), ("pixacc", "pixAcc"), ("miou", "mIoU"), ("map", "mAP"),
    ("deletion_auc", "del"), ("insertion_auc", "ins"), ("infidelity", "infid"), ("max_sensitivity", "maxsens"),
    ("randomisation_spearman", "rand rho"), ("randomisation_spearman_abs", "rand abs rho"),
    ("randomisation_ssim", "rand SSIM"), ("completeness_error", "compl err"), ("seconds_per_image", "s/img"),
)
PER_IMAGE = ("pointing_game", "mass_in_mask", "deletion_auc", "insertion_auc", "infidelity", "max_sensitivity",
             "randomisation_spearman", "randomisation_spearman_abs", "randomisation_ssim", "completeness_error",
             "seconds_per_image")


def _mean_sem(values: List[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return {}
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": int(v.size)}


def protocol(cfg, data_desc: str, accuracy: float, classes: Sequence[str]) -> Dict[str, object]:
    """Everything a reader needs to reproduce the numbers: model, data, forward, targets, every setting."""
    return {
        "model": cfg.model, "dataset": data_desc, "device": cfg.device, "seed": cfg.seed,
        "forward": f"ZeroShotClassifier over {len(classes)} classes {list(classes)}, template 'a photo of a {{}}.', "
                   "logits = 100 cos", "zero_shot_accuracy_on_targets": accuracy,
        "target": "class of the explained (largest) object, identical for every method",
        "post_processing": "channel sum for pixel attributions; bilinear upsampling (align_corners=False) of layer "
                           "maps to 224 px; float32; no per-method normalisation before the metrics",
        "segmentation": "ImageNet-Segmentation protocol (docs/methods.md §2) on the explained object's mask: clip "
                        "negatives, min-max, threshold at the map mean; pixAcc/mIoU (background, object) from dataset "
                        "totals, mAP = mean per-image AP. Maps are for the target class; no class-mean subtraction "
                        "(part of TextSpan's map construction, not of the scoring)",
        "deletion_insertion_score": "softmax probability of the target over the classes after each step",
        "captum": dataclasses.asdict(cfg.captum),
        "deletion_insertion": dict(M.DEL_INS_SETTINGS, steps=cfg.del_ins_steps),
        "infidelity": dict(M.INFIDELITY_SETTINGS, n_perturb_samples=cfg.infidelity_samples),
        "max_sensitivity": dict(M.SENSITIVITY_SETTINGS, n_perturb_samples=cfg.sensitivity_samples),
        "subset_metrics_images": cfg.n_subset, "randomisation_stages": list(cfg.randomisation_stages),
        "batch_size": cfg.batch_size,
        "seeds": f"image i's random draws (gradient_shap, infidelity, max-sensitivity) come from its own seed "
                 f"(numpy SeedSequence of (seed {cfg.seed}, i)), never from a stream shared with other images; a "
                 "resumed run recomputes unfinished batches whole, so it reproduces an uninterrupted run's numbers",
    }


def summarise(cfg, records: Dict[str, List[dict]], data_desc: str, accuracy: float, classes) -> dict:
    methods = {}
    for name, rows in records.items():
        m = get_method(name)
        entry: Dict[str, object] = {"family": m.family, "description": m.description, "n_images": len(rows)}
        for key in PER_IMAGE:
            stats = _mean_sem([r.get(key) for r in rows if key in r])
            if stats:
                entry[key] = stats
        seg = [r["segmentation"] for r in rows if "segmentation" in r]
        if seg:
            for k, v in M.segmentation_summary(seg).items():
                entry[k] = {"mean": v, "sem": float("nan"), "n": len(seg)}
        curves = [r["curves"] for r in rows if "curves" in r]
        if curves:
            entry["randomisation_curves"] = {k: np.mean([c[k] for c in curves], axis=0).tolist() for k in curves[0]}
        methods[name] = entry
    return {"protocol": protocol(cfg, data_desc, accuracy, classes),
            "metrics": {k: dataclasses.asdict(v) for k, v in M.METRICS.items()}, "methods": methods}


def _fmt(entry: dict, key: str) -> str:
    if key not in entry:
        return "–"
    v = entry[key]["mean"]
    if key == "completeness_error":
        return f"{v:.1e}"
    if key in ("seconds_per_image", "infidelity", "max_sensitivity"):
        return f"{v:.3g}"
    return f"{v:.3f}"


def _best(results: dict, key: str) -> str:
    higher = M.METRICS[{"pixacc": "pixacc", "miou": "miou", "map": "map"}.get(key, key)].higher_is_better
    vals = {n: e[key]["mean"] for n, e in results["methods"].items() if key in e and e["family"] != "floor"}
    if not vals:
        return ""
    return (max if higher else min)(vals, key=vals.get)


def table(results: dict) -> str:
    """Plain-text comparison table (the best non-floor method per column marked with *)."""
    cols = [(k, h) for k, h in COLUMNS if any(k in e for e in results["methods"].values())]
    best = {k: _best(results, k) for k, _ in cols}
    head = ["method"] + [h + ("↑" if M.METRICS[k].higher_is_better else "↓") for k, h in cols]
    rows = [[name] + [_fmt(e, k) + ("*" if best[k] == name else "") for k, _ in cols]
            for name, e in results["methods"].items()]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown(results: dict) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in e for e in results["methods"].values())]
    best = {k: _best(results, k) for k, _ in cols}
    head = "| method | " + " | ".join(h + (" ↑" if M.METRICS[k].higher_is_better else " ↓") for k, h in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = []
    for name, e in results["methods"].items():
        cells = [(f"**{_fmt(e, k)}**" if best[k] == name else _fmt(e, k)) for k, _ in cols]
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    p = results["protocol"]
    lines = ["# Attribution benchmark", "", head, sep] + body + [
        "", "Bold: best non-floor method per column. Means over images (sem in results.json); pixAcc/mIoU from "
        "dataset totals.", "", "## Protocol", ""]
    lines += [f"- **{k}**: {v}" for k, v in p.items()]
    lines += ["", "## Metrics", ""]
    lines += [f"- **{k}** ({'higher' if v['higher_is_better'] else 'lower'} is better): {v['description']}"
              for k, v in results["metrics"].items()]
    lines += ["", "## Methods", ""]
    lines += [f"- **{n}** ({e['family']}): {e['description']}" for n, e in results["methods"].items()]
    return "\n".join(lines) + "\n"


def heatmap_grid(items, methods: Sequence[str], load_map: Callable[[str, int], Optional[np.ndarray]],
                 path: Path) -> None:
    """PNG grid: one row per method, one column per image; each map min-max scaled on its own, object outlined.

    Args:
        items: the :class:`~nha_plugin.harness.data.BenchItem` columns: the benchmark's first images.
        methods: candidate rows; a method without a map for the first image is left out.
        load_map: ``load_map(method, i)`` -> the (S, S) map of the benchmark's image i, or None.
        path: the PNG (written atomically).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    maps = {m: [load_map(m, i) for i in range(len(items))] for m in methods}
    rows = [m for m in methods if items and maps[m][0] is not None]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows) + 1, len(items), figsize=(1.6 * len(items), 1.6 * (len(rows) + 1)),
                             squeeze=False)
    for j, it in enumerate(items):
        axes[0, j].imshow(it.image)
        axes[0, j].set_title(it.label, fontsize=7)
        for i, m in enumerate(rows, start=1):
            ax = axes[i, j]
            ax.imshow(it.image, alpha=0.35)
            if maps[m][j] is not None:
                ax.imshow(np.asarray(maps[m][j], dtype=np.float32), cmap="jet", alpha=0.65)
            ax.contour(it.mask, levels=[0.5], colors="w", linewidths=0.6)
            if j == 0:
                ax.set_ylabel(m, fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(path, fig, dpi=90)
    plt.close(fig)


def metric_charts(results: dict, out: Path) -> List[Path]:
    """One horizontal bar chart per metric (mean ± sem), floors in grey, NAD in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"nad": "tab:red", "floor": "tab:gray", "clip": "tab:green", "captum": "tab:blue",
               "zennit": "tab:purple"}
    paths = []
    for key, header in COLUMNS:
        ms = [(n, e) for n, e in results["methods"].items() if key in e]
        if not ms:
            continue
        fig, ax = plt.subplots(figsize=(5, 0.28 * len(ms) + 1))
        vals = [e[key]["mean"] for _, e in ms]
        errs = [0 if math.isnan(e[key]["sem"]) else e[key]["sem"] for _, e in ms]
        ax.barh(range(len(ms)), vals, xerr=errs, color=[colours.get(e["family"], "tab:orange") for _, e in ms])
        ax.set_yticks(range(len(ms)), [n for n, _ in ms], fontsize=7)
        ax.invert_yaxis()
        direction = "higher" if M.METRICS[key].higher_is_better else "lower"
        ax.set_title(f"{key} ({direction} is better)", fontsize=9)
        if key in ("completeness_error", "seconds_per_image", "max_sensitivity", "infidelity") and min(vals) > 0:
            ax.set_xscale("log")
        fig.tight_layout()
        p = save_figure(Path(out) / f"metric_{key}.png", fig, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
