"""Aggregate benchmark records into the results dict and its Markdown and plain-text tables.

The fields of ``results.json`` (format :data:`FORMAT`) are listed in :data:`RESULTS_FIELDS`, which results.md
repeats. Undefined numbers are ``null`` (never NaN), so the file is strict JSON. Every user string written to
Markdown (method names, descriptions, class names, paths) goes through :mod:`nha_plugin.markup`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence

from ..markup import md_cell, md_row
from . import confidence as CI
from . import metrics as M
from .registry import get_method

__all__ = ["summarise", "markdown", "table", "protocol", "COLUMNS", "PER_IMAGE", "FORMAT", "REFERENCES",
           "reference_of", "RESULTS_FIELDS"]

FORMAT = "nha-benchmark-results/2"
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
# the method every other is compared with, in order of preference (the first one that ran)
REFERENCES = ("nad_spatial", "vit_spatial")
RESULTS_FIELDS = (
    ("format", f"{FORMAT!r}"),
    ("protocol", "every setting needed to reproduce the numbers (model, data, forward, target mode, seeds, each "
                 "metric's settings); protocol.statistics says how intervals and comparisons are computed and names "
                 "the reference method"),
    ("metrics.<metric>", "name, higher_is_better, direction ('higher' or 'lower' is better), description, kind"),
    ("methods.<method>", "family, description, n_images, one entry per metric the method was scored on, "
                         "randomisation_curves (mean similarity per randomisation stage), vs_reference"),
    ("methods.<method>.<metric>", "mean: the statistic on all n scored images; ci95: [low, high], its 95% "
                                  "bootstrap interval over images; n: images scored; sem: standard error of the "
                                  "per-image values (null for the dataset-level pixacc, miou, map)"),
    ("methods.<method>.vs_reference", "reference: the method compared with (nad_spatial, or vit_spatial on a "
                                      "ViT); metrics.<metric>: difference (method minus reference, in the metric's "
                                      "units), ci95 (paired bootstrap over the images both were scored on), "
                                      "n_pairs, verdict ('better', 'worse' or 'no clear difference' in the metric's "
                                      "direction)"),
)


def reference_of(methods: Sequence[str]) -> Optional[str]:
    """The reference method of a run: the first of :data:`REFERENCES` among ``methods`` (None if none ran)."""
    return next((r for r in REFERENCES if r in methods), None)


def protocol(cfg, data_desc: str, accuracy: float, classes: Sequence[str],
             reference: Optional[str] = None) -> Dict[str, object]:
    """Everything a reader needs to reproduce the numbers: model, data, forward, targets, every setting."""
    contrastive = getattr(cfg, "target_mode", "plain") == "contrastive"
    return {
        "model": cfg.model, "dataset": data_desc, "device": cfg.device, "seed": cfg.seed,
        "forward": f"ZeroShotClassifier over {len(classes)} classes {list(classes)}, template 'a photo of a {{}}.', "
                   "logits = 100 cos", "zero_shot_accuracy_on_targets": accuracy,
        "target": "class of the explained (largest) object, identical for every method",
        "target_mode": ("contrastive: every method explains logit_c - mean_k logit_k (readout.contrastive: each "
                        "read-out column minus the mean column); softmax scores are unchanged" if contrastive
                        else "plain: every method explains the target's logit"),
        "post_processing": "channel sum for pixel attributions; bilinear upsampling (align_corners=False) of layer "
                           "maps to the image size; float32; no per-method normalisation before the metrics",
        "segmentation": "ImageNet-Segmentation protocol (docs/methods.md §2) on the explained object's mask: clip "
                        "negatives, min-max, threshold at the map mean; pixAcc/mIoU (background, object) from dataset "
                        "totals, mAP = mean per-image AP. Maps are for the target class; no class-mean subtraction "
                        "(part of TextSpan's map construction, not of the scoring)",
        "deletion_insertion_score": "softmax probability of the target over the classes after each step",
        "captum": dataclasses.asdict(cfg.captum),
        "deletion_insertion": dict(M.DEL_INS_SETTINGS, steps=cfg.del_ins_steps),
        "infidelity": dict(M.INFIDELITY_SETTINGS, n_perturb_samples=cfg.infidelity_samples),
        "max_sensitivity": dict(M.SENSITIVITY_SETTINGS, n_perturb_samples=cfg.sensitivity_samples),
        "images_per_metric": ("every metric on every image" if cfg.n_subset is None else
                              f"max-sensitivity and randomisation on the first {cfg.n_subset} images only; every "
                              "other metric on every image"),
        "randomisation_stages": list(cfg.randomisation_stages),
        "batch_size": cfg.batch_size,
        "seeds": f"image i's random draws (gradient_shap, infidelity, max-sensitivity) come from its own seed "
                 f"(numpy SeedSequence of (seed {cfg.seed}, i)), never from a stream shared with other images; a "
                 "resumed run recomputes unfinished batches whole, so it reproduces an uninterrupted run's numbers",
        "statistics": {"interval": CI.METHOD_TEXT, "paired": CI.PAIRED_TEXT, "level": CI.LEVEL,
                       "n_boot": CI.N_BOOT, "bootstrap_seed": cfg.seed, "reference": reference},
    }


def summarise(cfg, records: Mapping[str, List[dict]], data_desc: str, accuracy: float, classes) -> dict:
    """The results dict (see the module docstring) from each method's per-image records."""
    reference = reference_of(list(records))
    scored = {name: CI.statistics_of(rows, PER_IMAGE) for name, rows in records.items()}
    methods = {}
    for name, rows in records.items():
        m = get_method(name)
        entry: Dict[str, object] = {"family": m.family, "description": m.description, "n_images": len(rows)}
        for key, s in scored[name].items():
            entry[key] = CI.summary_entry(s, cfg.seed)
        curves = [r["curves"] for r in rows if "curves" in r]
        if curves:
            entry["randomisation_curves"] = {k: [float(sum(c[k][i] for c in curves) / len(curves))
                                                 for i in range(len(curves[0][k]))] for k in curves[0]}
        if reference is not None and name != reference:
            entry["vs_reference"] = {"reference": reference, "metrics": {
                key: cmp for key, s in scored[name].items() if key in scored[reference]
                for cmp in [CI.paired_comparison(s, scored[reference][key], cfg.seed,
                                                 M.METRICS[key].higher_is_better)] if cmp is not None}}
        methods[name] = entry
    metric_info = {k: dict(dataclasses.asdict(v), direction="higher" if v.higher_is_better else "lower")
                   for k, v in M.METRICS.items()}
    return {"format": FORMAT, "protocol": protocol(cfg, data_desc, accuracy, classes, reference),
            "metrics": metric_info, "methods": methods}


def _num(v: Optional[float], key: str) -> str:
    if v is None:
        return "–"
    if key == "completeness_error":
        return f"{v:.1e}"
    if key in ("seconds_per_image", "infidelity", "max_sensitivity"):
        return f"{v:.3g}"
    return f"{v:.3f}"


def _fmt(entry: dict, key: str, interval: bool = False) -> str:
    if key not in entry:
        return "–"
    e = entry[key]
    text = _num(e["mean"], key)
    if interval and e.get("ci95") and e["ci95"][0] is not None:
        text += f" [{_num(e['ci95'][0], key)}, {_num(e['ci95'][1], key)}]"
    return text


def _best(results: dict, key: str) -> str:
    higher = M.METRICS[key].higher_is_better
    vals = {n: e[key]["mean"] for n, e in results["methods"].items()
            if key in e and e["family"] != "floor" and e[key]["mean"] is not None}
    if not vals:
        return ""
    return (max if higher else min)(vals, key=vals.get)


def _columns(results: dict) -> list:
    return [(k, h) for k, h in COLUMNS if any(k in e for e in results["methods"].values())]


def _arrow(key: str) -> str:
    return "↑" if M.METRICS[key].higher_is_better else "↓"


def table(results: dict) -> str:
    """Plain-text comparison table of means (the best non-floor method per column marked with *)."""
    cols = _columns(results)
    best = {k: _best(results, k) for k, _ in cols}
    head = ["method"] + [h + _arrow(k) for k, h in cols]
    rows = [[name] + [_fmt(e, k) + ("*" if best[k] == name else "") for k, _ in cols]
            for name, e in results["methods"].items()]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _comparison_cell(cmp: Optional[dict], key: str) -> str:
    if cmp is None:
        return "–"
    lo, hi = cmp["ci95"]
    sign = lambda v: "–" if v is None else ("+" if v >= 0 else "") + _num(v, key)   # noqa: E731
    return f"{sign(cmp['difference'])} [{sign(lo)}, {sign(hi)}] {cmp['verdict']}"


def markdown(results: dict) -> str:
    """results.md: the table of means with 95% intervals, the paired comparison with the reference, the
    protocol, the metrics (with directions), the methods, and the fields of results.json."""
    cols = _columns(results)
    best = {k: _best(results, k) for k, _ in cols}
    methods = results["methods"]
    head = md_row(["method"] + [f"{h} {_arrow(k)}" for k, h in cols])
    sep = "|---|" + "---:|" * len(cols)
    body = []
    for name, e in methods.items():
        cells = [md_cell(_fmt(e, k, interval=True)) for k, _ in cols]
        cells = [f"**{c}**" if best[k] == name else c for c, (k, _) in zip(cells, cols)]
        body.append(f"| {md_cell(name)} | " + " | ".join(cells) + " |")
    lines = ["# Attribution benchmark", "", head, sep] + body + [
        "", "Each cell: mean over images [95% bootstrap interval over images]; pixAcc/mIoU from dataset totals. "
        "Bold: the best mean among non-floor methods; whether a difference is clear is in the paired comparison "
        "below.", ""]
    compared = [(n, e) for n, e in methods.items() if "vs_reference" in e]
    if compared:
        lines += ["## Paired comparison with the reference", "",
                  "Each cell: method minus reference [95% paired bootstrap interval] and the verdict in the metric's "
                  "direction (" + md_cell(CI.PAIRED_TEXT) + ").", "",
                  md_row(["method", "reference"] + [f"{h} {_arrow(k)}" for k, h in cols]),
                  "|---|---|" + "---:|" * len(cols)]
        for name, e in compared:
            vs = e["vs_reference"]
            lines.append(md_row([name, vs["reference"]] + [_comparison_cell(vs["metrics"].get(k), k)
                                                            for k, _ in cols]))
        lines.append("")
    lines += ["## Protocol", ""] + _bullets(results["protocol"])
    lines += ["", "## Metrics", ""]
    lines += [f"- **{md_cell(k)}** ({md_cell(v['direction'])} is better): {md_cell(v['description'])}"
              for k, v in results["metrics"].items()]
    lines += ["", "## Methods", ""]
    lines += [f"- **{md_cell(n)}** ({md_cell(e['family'])}): {md_cell(e['description'])}"
              for n, e in methods.items()]
    lines += ["", "## Fields of results.json", ""]
    lines += [f"- **{md_cell(k)}**: {md_cell(v)}" for k, v in RESULTS_FIELDS] + [""]
    return "\n".join(lines)


def _bullets(settings: Mapping[str, object], depth: int = 0) -> List[str]:
    """Markdown bullets of a protocol; a nested mapping (settings, statistics, a side-by-side run's protocol)
    becomes nested bullets."""
    out = []
    for k, v in settings.items():
        if isinstance(v, Mapping):
            out.append("  " * depth + f"- **{md_cell(k)}**:")
            out += _bullets(v, depth + 1)
        else:
            out.append("  " * depth + f"- **{md_cell(k)}**: {md_cell(v)}")
    return out
