"""Mean-ablation sparsity curves and reconstructions of a CLIP-ResNet embedding (docs/methods.md §1).

All embeddings are computed exactly from the linear form ``y = beta + sum_{h,n} s[h,n] u[h,n]`` (docs/methods.md §1)
through W_v then W_o per head (:func:`nha_plugin.pool.head_outputs`): the (B, H, C, D) table is never built.

- **Mean-ablation** keeps the top fraction of units by importance and replaces the coefficients s of the
  others by their dataset mean: ``y_abl = y - sum_{ablated} (s - mean) u``. Keeping everything gives the
  model's embedding; keeping nothing gives the dataset's mean embedding.
  Importance (from :class:`~nha_plugin.stats.DatasetStats`), per level:
  ``pair``: the paper's ``mean(top-k |s - mean|) * ||u||`` (:attr:`DatasetStats.importance`);
  ``neuron`` and ``head``: the root-mean-square norm of the unit's centred contribution, ``sqrt(trace Cov)``
  (:attr:`DatasetStats.neuron_importance`, :attr:`DatasetStats.head_importance`), the one-pass analogue
  (a vector unit's top-k centred norms would need the mean before the pass);
  ``pair-rms``: pairs ranked the neurons' and heads' way, ``std(s) * ||u||``, to separate the effect of
  the granularity from that of the ranking.
  The number kept is ``ceil(fraction * units)``.
- **Neuron-PC reconstruction** replaces each neuron's contribution ``c_n`` by ``mean_n + P_n P_n^T (c_n - mean_n)``
  with ``P_n`` its top principal components over the statistics' dataset (exact with all H of them).
  (The same with each pair's PC0 is the identity, since a pair's contribution is rank one.)
- **Sparse-text reconstruction** replaces each pair direction ``u[h,n]`` by its k-word OMP approximation
  (:func:`nha_plugin.text.sparse_decompose` over a prepared word dictionary): the least-squares combination
  of the k selected atoms (its norm is at most ``||u||``); ``rescale=True`` scales it back to ``||u||``.
  ``y_text = beta + sum s[h,n] u_text[h,n]``.

Zero-shot read-out as :class:`~nha_plugin.readout.ZeroShotClassifier`: the argmax over classes of the cosine
between the embedding and each class's text embedding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import save_figure, write_json, write_text
from ..markup import md_cell, md_row
from ..pool import constant_term, head_outputs, neuron_blocks, pair_directions, pool_output
from ..spec import AttentionPoolSpec
from ..stats import DatasetStats, NeuronPCs
from ..stats.pcs import NEURON_CHUNK

__all__ = ["LEVELS", "unit_importance", "keep_mask", "ablated_embedding", "neuron_pc_embedding",
           "text_directions", "text_embedding", "zero_shot_accuracy", "sparsity_curves", "sparsity_markdown",
           "plot_sparsity", "write_report"]

LEVELS = ("pair", "pair-rms", "neuron", "head")


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}; got {level!r}")


def unit_importance(stats: DatasetStats, level: str) -> Tensor:
    """Importance of every unit of a level (see the module docstring).

    Args:
        stats: dataset statistics of the model.
        level: one of :data:`LEVELS`.

    Returns:
        pair / pair-rms (H, C), neuron (C,), head (H,).
    """
    _check_level(level)
    if level == "pair":
        return stats.importance
    if level == "pair-rms":
        return stats.pair_var.sqrt() * stats.direction_norms.to(stats.mean)
    return stats.neuron_importance if level == "neuron" else stats.head_importance


def keep_mask(stats: DatasetStats, level: str, fraction: float,
              importance: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Pairs kept when the top ``fraction`` of ``level`` units by importance are kept.

    Args:
        stats: dataset statistics of the model.
        level: one of :data:`LEVELS`.
        fraction: share of the level's units kept, in [0, 1].
        importance: the level's :func:`unit_importance` if already computed.

    Returns:
        ``(mask, n_keep)``: (H, C) bool, True for kept pairs; the number of ``level`` units kept
        (``ceil(fraction * units)``; ties in importance: lower unit index first).
    """
    _check_level(level)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    imp = unit_importance(stats, level) if importance is None else importance
    flat = imp.reshape(-1)
    n_keep = math.ceil(fraction * flat.numel() - 1e-9)
    kept = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kept[flat.argsort(descending=True, stable=True)[:n_keep]] = True
    H, C = stats.shape
    if level in ("pair", "pair-rms"):
        mask = kept.view(H, C)
    elif level == "neuron":
        mask = kept.view(1, C).expand(H, C)
    else:
        mask = kept.view(H, 1).expand(H, C)
    return mask, n_keep


def ablated_embedding(spec: AttentionPoolSpec, coefficients: Tensor, stats: DatasetStats, keep: Tensor,
                      embedding: Optional[Tensor] = None) -> Tensor:
    """Mean-ablated embedding (B, D): pairs outside ``keep`` (H, C) bool get s replaced by its dataset mean.

    Args:
        spec: the model's spec.
        coefficients: s (B, H, C) of the images (float64 recommended).
        stats: dataset statistics of the same model (its ``pair_mean`` is the replacement).
        keep: (H, C) bool, True for the pairs left intact (see :func:`keep_mask`).
        embedding: the images' full embedding (B, D) if already computed (:func:`nha_plugin.pool.pool_output`).

    Returns:
        (B, D) the embeddings with the ablated pairs at their mean.
    """
    s = coefficients
    y = pool_output(spec.detached(), s) if embedding is None else embedding
    delta = (s - stats.pair_mean.to(s)) * (~keep.to(s.device)).to(s.dtype)
    return y - head_outputs(spec.detached(), delta).sum(dim=1)


def neuron_pc_embedding(spec: AttentionPoolSpec, coefficients: Tensor, stats: DatasetStats, n_components: int,
                        pcs: Optional[NeuronPCs] = None) -> Tensor:
    """Embedding with every neuron's contribution replaced by its mean plus its projection on its top
    ``n_components`` principal components: ``mean_embedding + sum_n P_n P_n^T U_n (s_n - m_n)``.

    Args:
        spec: the model's spec.
        coefficients: s (B, H, C) of the images.
        stats: dataset statistics of the same model (mean and principal components).
        n_components: principal components kept per neuron, between 1 and min(H, D).
        pcs: ``stats.neuron_pcs(n_components)`` if already computed.

    Returns:
        (B, D) reconstructed embeddings.
    """
    pcs = stats.neuron_pcs(n_components) if pcs is None else pcs
    s = coefficients
    centred = s - stats.pair_mean.to(s)
    P = pcs.components.to(s)                                                   # (C, K, D)
    C = P.shape[0]
    out = stats.mean_embedding.to(s).expand(s.shape[0], -1).clone()
    for start in range(0, C, NEURON_CHUNK):
        sl = slice(start, min(C, start + NEURON_CHUNK))
        G = torch.einsum("ckD,cDh->ckh", P[sl], neuron_blocks(spec, sl, s.dtype).to(s.device))   # P_n^T U_n
        alpha = torch.einsum("ckh,bhc->bck", G, centred[:, :, sl])
        out += torch.einsum("bck,ckD->bD", alpha, P[sl])
    return out


def text_directions(spec: AttentionPoolSpec, atoms: Tensor, k: int, *, rescale: bool = False,
                    device=None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Each pair direction u[h, n] replaced by its k-atom OMP approximation over ``atoms``.

    Args:
        spec: the model's spec.
        atoms: (N, D) a prepared dictionary (:func:`nha_plugin.text.prepare_dictionary`).
        k: atoms per direction.
        rescale: scale each approximation back to ``||u||``.
        device: where OMP runs (default: the atoms' device).
        progress: tqdm progress bar.

    Returns:
        (H, C, D) approximated directions (float64) and (H, C) relative residuals ``||u - u_text|| / ||u||``.
    """
    from ..text.omp import sparse_decompose
    spec = spec.detached()
    u = pair_directions(spec)                                                  # (H, C, D)
    H, C, D = u.shape
    # float64: word atoms are nearly dependent at k=64 in D=128, where float32 coefficients lose digits
    codes = sparse_decompose(u.reshape(H * C, D), atoms, k=k, device=device, dtype=torch.float64,
                             progress=progress)
    approx = codes.reconstruct(atoms)
    if rescale:
        approx = approx * (codes.target_norms / approx.norm(dim=1).clamp_min(1e-30))[:, None]
    rel = (codes.residual_norms / codes.target_norms.clamp_min(1e-30)).view(H, C)
    return approx.view(H, C, D).to(u.device), rel.to(u.device)


def text_embedding(spec: AttentionPoolSpec, coefficients: Tensor, directions: Tensor) -> Tensor:
    """``beta + sum_{h,n} s[h,n] u_text[h,n]`` for replaced directions.

    Args:
        spec: the model's spec.
        coefficients: s (B, H, C).
        directions: (H, C, D) replaced directions (:func:`text_directions`).

    Returns:
        (B, D) embeddings.
    """
    s = coefficients
    return constant_term(spec.detached()).to(s) + s.flatten(1) @ directions.to(s).flatten(0, 1)


def zero_shot_accuracy(embeddings: Tensor, class_embeddings: Tensor, labels: Tensor) -> float:
    """Share of images whose argmax over classes of cos(embedding, class text) is the label.

    Args:
        embeddings: (B, D) image embeddings (any scale).
        class_embeddings: (K, D) class text embeddings (e.g. ``ZeroShotClassifier(...).readout.T``).
        labels: (B,) class indices.

    Returns:
        The accuracy in [0, 1].
    """
    logits = F.normalize(embeddings, dim=-1) @ F.normalize(class_embeddings.to(embeddings), dim=-1).T
    return float((logits.argmax(dim=-1).cpu() == labels.cpu()).double().mean())


def sparsity_curves(spec: AttentionPoolSpec, coefficients: Tensor, labels: Tensor, class_embeddings: Tensor,
                    stats: DatasetStats, fractions: Sequence[float], levels: Sequence[str] = LEVELS,
                    pcs: Sequence[int] = (1, 2, 4), text: Optional[dict] = None) -> dict:
    """Zero-shot accuracy of one task under mean-ablation sweeps and reconstructions.

    Args:
        spec: the model's spec.
        coefficients: s (B, H, C) of the task's images.
        labels: (B,) class indices.
        class_embeddings: (K, D) class text embeddings.
        stats: dataset statistics of the same model (held-out data).
        fractions: kept fractions to sweep (each in [0, 1]).
        levels: unit levels to sweep.
        pcs: neuron-PC counts for the reconstructions (capped at min(H, D)).
        text: ``{label: (H, C, D) approximated directions}`` for sparse-text reconstructions.

    Returns:
        ``{"original": acc, "mean_embedding": acc, "sweeps": {level: [{"fraction", "kept", "units",
        "accuracy", "error"}, ...]}, "neuron_pcs": {n: acc}, "text": {label: acc},
        "errors": {"neuron_pcs": {n: err}, "text": {label: err}}}``, where ``error`` is the mean over images of
        ``||y' - y|| / ||y - mean embedding||`` (0: the model's embedding; 1: as far off as the mean).
    """
    s = coefficients.to(torch.float64)
    y = pool_output(spec.detached(), s)
    spread = (y - stats.mean_embedding.to(y)).norm(dim=-1)

    def acc(e: Tensor) -> float:
        return zero_shot_accuracy(e, class_embeddings, labels)

    def err(e: Tensor) -> float:
        return float(((e - y).norm(dim=-1) / spread).mean())

    out = {"original": acc(y), "mean_embedding": acc(stats.mean_embedding.to(y).expand_as(y)), "sweeps": {},
           "neuron_pcs": {}, "text": {}, "errors": {"neuron_pcs": {}, "text": {}}}
    for level in levels:
        imp = unit_importance(stats, level)
        rows = []
        for f in fractions:
            keep, n_keep = keep_mask(stats, level, f, importance=imp)
            e = ablated_embedding(spec, s, stats, keep, embedding=y)
            rows.append({"fraction": float(f), "kept": n_keep, "units": imp.numel(), "accuracy": acc(e),
                         "error": err(e)})
        out["sweeps"][level] = rows
    kmax = min(spec.num_heads, spec.output_dim)
    for n in pcs:
        if n <= kmax:
            e = neuron_pc_embedding(spec, s, stats, n)
            out["neuron_pcs"][int(n)], out["errors"]["neuron_pcs"][int(n)] = acc(e), err(e)
    for label, directions in (text or {}).items():
        e = text_embedding(spec, s, directions)
        out["text"][label], out["errors"]["text"][label] = acc(e), err(e)
    return out


# ---- reports -----------------------------------------------------------------------------------------------
def sparsity_markdown(result: dict) -> str:
    """Markdown tables of a report; user strings (the model, task names, paths, commands) are escaped
    (:mod:`nha_plugin.markup`).

    Args:
        result: ``{"tasks": {task: sparsity_curves(...)}, "meta": {...}}``.

    Returns:
        The Markdown text.
    """
    tasks = result["tasks"]
    meta = result.get("meta", {})
    lines = [f"# Sparsity and reconstruction ({md_cell(meta.get('model', ''))})", ""]
    for key in ("when", "stats", "data", "dictionary", "importance", "commands", "seconds", "note"):
        if meta.get(key):
            value = meta[key]
            if isinstance(value, list):
                lines += [f"- {key}:"] + [f"    - {md_cell(v)}" for v in value]
            else:
                lines.append(f"- {key}: {md_cell(value)}")
    lines.append("")
    names = list(tasks)
    first = tasks[names[0]]
    lines += ["## Zero-shot accuracy, keeping the top fraction of units (the rest mean-ablated)", "",
              "Each cell: accuracy (relative embedding error ||y' - y|| / ||y - mean embedding||, mean over images).",
              "", md_row(["level", "kept fraction", "kept units", *names]), "|---|---|---|" + "---|" * len(names)]
    for level, rows in first["sweeps"].items():
        for i, row in enumerate(rows):
            cells = [f"{tasks[t]['sweeps'][level][i]['accuracy']:.3f} ({tasks[t]['sweeps'][level][i]['error']:.2f})"
                     for t in names]
            lines.append(md_row([level, f"{row['fraction']:g}", f"{row['kept']} / {row['units']}", *cells]))
    lines += ["", "## Reference points and reconstructions", "", "Accuracy (relative embedding error).", "",
              md_row(["embedding", *names]), "|---|" + "---|" * len(names)]
    lines.append(md_row(["original", *(f"{tasks[t]['original']:.3f}" for t in names)]))
    lines.append(md_row(["mean embedding (everything ablated)", *(f"{tasks[t]['mean_embedding']:.3f}" for t in names)]))
    for key, name in (("neuron_pcs", "neuron PCs, {} per neuron"), ("text", "sparse text, {}")):
        for unit in first[key]:
            cells = [f"{tasks[t][key][unit]:.3f} ({tasks[t]['errors'][key][unit]:.2f})" for t in names]
            lines.append(md_row([name.format(unit).replace("text, random", "random"), *cells]))
    return "\n".join(lines) + "\n"


_LEVEL_LABELS = {"pair": "pairs (top-k importance)", "pair-rms": "pairs (RMS importance)", "neuron": "neurons",
                 "head": "heads"}


def plot_sparsity(result: dict, path) -> Path:
    """Accuracy vs kept fraction (one panel per task, one line per level, the unablated accuracy dashed),
    with the reconstructions as bars underneath, written atomically (:func:`nha_plugin.files.save_figure`).

    Args:
        result: as :func:`sparsity_markdown`.
        path: the image file (its suffix gives the format, e.g. ``.png``).

    Returns:
        The path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = result["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.6), squeeze=False)
    for j, (name, r) in enumerate(tasks.items()):
        ax = axes[0, j]
        for level, rows in r["sweeps"].items():
            xs = [max(row["kept"] / row["units"], 1e-4) for row in rows]
            ax.plot(xs, [row["accuracy"] for row in rows], marker="o", label=_LEVEL_LABELS.get(level, level))
        ax.axhline(r["original"], color="k", ls="--", lw=1, label="unablated")
        ax.axhline(r["mean_embedding"], color="grey", ls=":", lw=1, label="mean embedding")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.set_xlabel("kept fraction of units (after rounding up)")
        if j == 0:
            ax.set_ylabel("zero-shot accuracy")
            ax.legend(fontsize=7, loc="lower right")
        bars = {"original": r["original"], "mean embedding": r["mean_embedding"]}
        bars.update({f"{n} PC/neuron": v for n, v in r["neuron_pcs"].items()})
        colours = ["k", "grey"] + ["C0"] * len(r["neuron_pcs"])
        for lab, v in r["text"].items():
            control = lab.startswith("random")
            bars[lab.split(" (")[0] if control else "text " + lab.split(" (")[0]] = v
            colours.append("C1" if control else "C2")
        bx = axes[1, j]
        bx.bar(range(len(bars)), list(bars.values()), color=colours)
        bx.set_xticks(range(len(bars)))
        bx.set_xticklabels(list(bars), rotation=45, ha="right", fontsize=7)
        bx.set_ylim(0, 1.02)
        if j == 0:
            bx.set_ylabel("reconstruction accuracy")
    fig.tight_layout()
    try:
        return save_figure(path, fig, dpi=110)
    finally:
        plt.close(fig)


def write_report(result: dict, out_dir, name: str = "sparsity") -> dict:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` atomically into ``out_dir`` (created if needed).

    Args:
        result: as :func:`sparsity_markdown`.
        out_dir: the folder.
        name: the files' stem.

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    write_json(paths["json"], result)
    write_text(paths["md"], sparsity_markdown(result))
    plot_sparsity(result, paths["png"])
    return paths
