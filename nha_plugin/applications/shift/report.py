"""Reports of the shift monitor: Markdown tables, a figure per (run, concept), and the JSON, all written atomically."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Union

import numpy as np

from ...files import save_figure, write_json, write_text
from ...markup import md_cell, md_row
from .units import METHODS

__all__ = ["METHOD_LABELS", "fmt", "fmt_p", "markdown", "plot", "write_report"]

METHOD_LABELS = {"nad_pairs": "NAD top-k pairs", "cosine": "cos(y, t)", "neurons": "neurons only",
                 "heads": "heads only"}


def fmt(x, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; "n/a" for None and NaN (an undefined correlation)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_p(x: float) -> str:
    """A p-value: three decimals, or scientific notation below 1e-3; "n/a" for None."""
    return "n/a" if x is None else (f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}")


def markdown(report: dict) -> str:
    """Markdown tables of a report.

    Args:
        report: ``{"protocol"?: {...}, "runs": [run_monitor(...), ...]}``.

    Returns:
        The Markdown text: the protocol, then per run the correlations per concept and method and per
        concept a table of groups (true share, mean scores, test p-values).
    """
    lines = []
    head = report.get("protocol", {})
    if head:
        lines += ["## Protocol", ""] + [f"- {md_cell(k)}: {md_cell(v)}" for k, v in head.items()] + [""]
    for run in report["runs"]:
        p = run["protocol"]
        lines += [f"## {md_cell(p['data'])}", "",
                  md_cell(f"n = {p['n_images']} images in groups {p['groups']} (reference {p['reference']}); "
                          f"k = {p['k']} pairs, {p['k_neurons']} neurons, {p['k_heads']} head(s); templates "
                          f"{p['templates']}; pair signs: {p['pair_signs']}; neuron/head PC0 from "
                          f"{p['unit_directions']}; {p['n_permutations']} MMD permutations; seed {p['seed']}."), ""]
        lines += [md_row(["concept", "presence", *(f"r per image: {METHOD_LABELS[m]}" for m in METHODS),
                          *(f"r group means: {METHOD_LABELS[m]}" for m in METHODS)]),
                  "|" + "---|" * (2 + 2 * len(METHODS))]
        for c, res in run["concepts"].items():
            lines.append(md_row([c, res["presence"], *(fmt(res["per_image_r"][m]) for m in METHODS),
                                 *(fmt(res["group_mean_r"][m]) for m in METHODS)]))
        lines.append("")
        tests = {row["group"]: row for row in run["groups"]}
        for c, res in run["concepts"].items():
            lines += [f"### {md_cell(c)}: per group", "",
                      md_row(["group", "n", "true share", *(f"mean {METHOD_LABELS[m]}" for m in METHODS), "MMD p",
                              "C2ST acc (p)", *(f"KS p {METHOD_LABELS[m]}" for m in METHODS)]),
                      "|" + "---|" * (5 + 2 * len(METHODS))]
            for row in res["groups"]:
                t = tests[row["group"]]
                if "mmd" in t:
                    mmd = fmt_p(t["mmd"]["p_value"])
                    c2 = f"{t['classifier']['accuracy']:.3f} ({fmt_p(t['classifier']['p_value'])})"
                    ks = [fmt_p(row["ks"][m]["p_value"]) for m in METHODS]
                else:
                    mmd, c2, ks = "reference", "reference", ["reference" for _ in METHODS]
                lines.append(md_row([row["group"], row["n"], f"{row['share']:.3f}",
                                     *(fmt(row["mean"][m], 4) for m in METHODS), mmd, c2, *ks]))
            lines.append("")
    return "\n".join(lines)


def _plain(value) -> str:
    """A user string as plain matplotlib text (a ``$`` would start mathtext)."""
    return str(value).replace("$", r"\$")


def plot(report: dict, path: Union[str, Path]) -> Path:
    """One column per (run, concept): top, each method's group mean as a standardised shift from the reference
    group ((mean_g - mean_ref) / pooled per-image sd) against the true concept share; bottom, the p-values of
    the two-sample tests per group (log scale).

    Args:
        report: as for :func:`markdown`.
        path: the image file (its suffix gives the format), written atomically.

    Returns:
        The path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(run, c, res) for run in report["runs"] for c, res in run["concepts"].items()]
    cols = min(len(panels), 3)
    blocks = -(-len(panels) // cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(4.8 * cols, 7.6 * blocks), squeeze=False)
    markers = dict(zip(METHODS, "osD^"))
    for i, (run, c, res) in enumerate(panels):
        top, col = axes[2 * (i // cols)], i % cols
        seed = run["protocol"].get("seed")
        c = f"{c} (seed {seed})" if seed is not None else c
        ax = top[col]
        shares = [row["share"] for row in res["groups"]]
        for m in METHODS:
            means = np.array([row["mean"][m] for row in res["groups"]])
            sds = np.array([row["sd"][m] for row in res["groups"]])
            pooled = float(np.sqrt(np.mean(sds ** 2))) or 1.0
            ax.plot(shares, (means - means[0]) / pooled, marker=markers[m],
                    label=f"{METHOD_LABELS[m]} (r={fmt(res['group_mean_r'][m], 2)})")
        # the groups name their shares on a top axis of their own, clear of the share ticks and of the data
        groups = ax.secondary_xaxis("top")
        groups.set_xticks(shares, labels=[_plain(row["group"]) for row in res["groups"]])
        groups.tick_params(labelsize=7, colors="grey")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("true concept share in group")
        ax.set_ylabel("group mean shift (pooled sd units)")
        ax.set_title(f"'{_plain(c)}': group means vs true share (top axis: group)", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[2 * (i // cols) + 1, col]
        tests = {row["group"]: row for row in run["groups"]}
        labels = [row["group"] for row in res["groups"] if "ks" in row]
        xs = np.arange(len(labels))
        series = {"MMD (embeddings)": [tests[g]["mmd"]["p_value"] for g in labels],
                  "C2ST (embeddings)": [tests[g]["classifier"]["p_value"] for g in labels]}
        for m in METHODS:
            series[f"KS {METHOD_LABELS[m]}"] = [row["ks"][m]["p_value"] for row in res["groups"] if "ks" in row]
        for name, vals in series.items():
            ax.plot(xs, np.clip(vals, 1e-16, 1), marker="o", label=name)
        ax.axhline(0.05, color="red", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(xs, [_plain(g) for g in labels])
        ax.set_xlabel(f"group (vs reference {_plain(run['protocol']['reference'])})")
        ax.set_ylabel("p-value")
        ax.set_title(f"'{_plain(c)}': two-sample tests", fontsize=9)
        ax.legend(fontsize=6)
    for j in range(len(panels), blocks * cols):
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    fig.tight_layout()
    try:
        return save_figure(path, fig, dpi=110)
    finally:
        plt.close(fig)


def write_report(report: dict, out_dir: Union[str, Path], stem: str = "shift") -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``, each atomically.

    Args:
        report: as for :func:`markdown` (NaN correlations are written as JSON ``NaN``).
        out_dir: the folder (created if needed).
        stem: the file names' stem.

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json(paths["json"], report, indent=1)
    write_text(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths
