"""Distribution-shift monitoring with the neuron x head decomposition (shared/METHODS.md §A).

A concept (a text such as ``"yellow"``) is tracked across groups of images (model years, months, sites)
by the part of each image embedding that the pairs most aligned with the concept write::

    PC0[h,n]   = sign[h,n] * u[h,n] / ||u[h,n]||                   (H, C, D)   u = pair_directions(spec)
    TopK(t)    = the k pairs with the largest <PC0[h,n], t>         t = the concept's text embedding,
                                                                    template-averaged, unit norm, NOT centred
    score(y)   = || sum_{(h,n) in TopK(t)} s[h,n] u[h,n] || / ||y||  per image (y = its embedding)

``sign`` is the paper's PC0 sign: +1 when the majority of the 50 images with the largest centred
``|s[h,n] - mean s[h,n]|`` have ``s[h,n]`` above its mean (:func:`pc0_signs`; ``nha_plugin.stats`` stores the
same rule as ``DatasetStats.pc0_sign``); without data every sign is +1.

Baselines, all on the same images and the same text embedding ``t``:

- ``cosine``: cos(y, t), the plain CLIP similarity.
- ``neurons``: a neuron's contribution ``sum_h s[h,n] u[h,n]`` is not rank-1, so its direction is the PC0 of
  its contributions over the reference group (centred; sign: the majority of the 50 largest centred
  contributions project positively; :func:`nha_plugin.text.unit_direction`). The ``k_neurons`` neurons with
  the largest ``<PC0_n, t>`` are kept and ``score = || sum_{n in top} sum_h s[h,n] u[h,n] || / ||y||``.
- ``heads``: the same with head contributions ``W_o^h W_v^h s[h, :]`` (bias excluded), PC0 per head over
  the reference group, the ``k_heads`` best heads kept.

Per image, each score is correlated with the concept's presence (point-biserial r, :func:`point_biserial`);
per group, the mean score is correlated with the group's concept share. Dataset-level two-sample tests
compare each group with the reference group on the unit-normalised embeddings (MMD with a permutation
p-value, a classifier two-sample test) and on every score (two-sample Kolmogorov-Smirnov), as in
"Failing Loudly" (Rabanser et al., 2019).

Example::

    import nha_plugin as nha
    from nha_plugin.applications import shift
    from nha_plugin.scenes import years
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    sampler = years(("colour", "yellow"), shares=(0.05, 0.15, 0.3, 0.5), n_per_group=100, seed=0)
    data = shift.ShiftData.from_sampler(sampler, concept="yellow")
    result = shift.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"})
    shift.write_report({"runs": [result]}, "shift_out", "yellow")       # .json, .md, .png

Only torch and numpy are needed (scipy is used by the tests as the independent reference).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..decomposition import Contributions
from ..pool import pair_directions, pc_sign, target_weights
from ..spec import AttentionPoolSpec

__all__ = [
    "METHODS", "UnitDirections", "ConceptUnits", "ShiftData", "pc0_signs", "pair_alignment", "unit_directions",
    "select_units", "concept_scores", "point_biserial", "pearson", "group_summary", "mmd2_unbiased",
    "median_bandwidth", "mmd_test", "ks_statistic", "ks_test", "binomial_sf", "classifier_test",
    "run_monitor", "markdown", "plot", "write_report",
]

METHODS = ("nad_pairs", "cosine", "neurons", "heads")
METHOD_LABELS = {"nad_pairs": "NAD top-k pairs", "cosine": "cos(y, t)", "neurons": "neurons only",
                 "heads": "heads only"}


# ---- unit directions and concept selection ----------------------------------------------------------------
def pc0_signs(coefficients: Tensor, top: int = 50) -> Tensor:
    """The paper's PC0 sign of every pair from coefficients over a dataset.

    A pair's contribution is ``s[h,n] u[h,n]``, so the PC0 of its centred contributions is ``+-u/||u||`` and
    the paper's rule (flip unless more than half of the ``top`` largest centred contributions project
    positively) is :func:`nha_plugin.pool.pc_sign` on the ``top`` largest ``|s - mean s|``.

    Args:
        coefficients: pair coefficients s over a dataset, (B, H, C).
        top: images taken per pair (capped at B).

    Returns:
        (H, C) tensor of +1.0 / -1.0 in the coefficients' dtype.
    """
    if coefficients.dim() != 3 or coefficients.shape[0] < 1:
        raise ValueError(f"expected pair coefficients (B, H, C) with B >= 1; got {tuple(coefficients.shape)}")
    centred = coefficients - coefficients.mean(dim=0)
    k = min(int(top), centred.shape[0])
    idx = centred.abs().topk(k, dim=0).indices                          # (k, H, C)
    return pc_sign(centred.gather(0, idx), dim=0).to(coefficients.dtype)


def _pair_norms(spec: AttentionPoolSpec) -> Tensor:
    """||u[h,n]||, (H, C); one head at a time so the (H, C, D) table is never held."""
    return torch.stack([pair_directions(spec, heads=slice(h, h + 1))[0].norm(dim=-1)
                        for h in range(spec.num_heads)])


def _check_signs(pair_signs: Optional[Tensor], spec: AttentionPoolSpec) -> Tensor:
    shape = (spec.num_heads, spec.num_neurons)
    if pair_signs is None:
        return torch.ones(shape, dtype=spec.c_weight.dtype, device=spec.c_weight.device)
    pair_signs = torch.as_tensor(pair_signs)
    if tuple(pair_signs.shape) != shape:
        raise ValueError(f"pair_signs must be (H, C) = {shape}; got {tuple(pair_signs.shape)}. Use "
                         "nha_plugin.stats.DatasetStats.load(path).pc0_sign or pc0_signs(coefficients)")
    if not bool(((pair_signs == 1) | (pair_signs == -1)).all()):
        raise ValueError("pair_signs must hold only +1 and -1")
    return pair_signs.to(device=spec.c_weight.device, dtype=spec.c_weight.dtype)


def _check_text(text: Tensor, spec: AttentionPoolSpec) -> Tensor:
    text = torch.as_tensor(text)
    if text.dim() != 1 or text.shape[0] != spec.output_dim:
        raise ValueError(f"expected one text embedding of shape (D,) = ({spec.output_dim},); got {tuple(text.shape)}")
    return text.to(device=spec.c_weight.device, dtype=spec.c_weight.dtype)


def pair_alignment(spec: AttentionPoolSpec, text: Tensor, pair_signs: Optional[Tensor] = None) -> Tensor:
    """<PC0[h,n], t> = sign[h,n] <u[h,n], t> / ||u[h,n]|| for every pair, (H, C).

    Args:
        spec: the model's attention-pool spec.
        text: the concept's text embedding t, (D,) (not centred).
        pair_signs: (H, C) of +-1 (:func:`pc0_signs`, ``DatasetStats.pc0_sign``); None means +1 everywhere.
    """
    spec = spec.detached()
    t = _check_text(text, spec)
    g = target_weights(spec, t[:, None])[..., 0]                         # <u[h,n], t>, (H, C)
    return _check_signs(pair_signs, spec) * g / _pair_norms(spec).clamp_min(torch.finfo(g.dtype).tiny)


@dataclass
class UnitDirections:
    """Directions the concept units are ranked by.

    Attributes:
        pair_signs: (H, C) +-1, the PC0 sign of every pair.
        neurons: (C, D) unit PC0 of every neuron's contributions.
        heads: (H, D) unit PC0 of every head's contributions.
        source: where they come from ("weights" or "data: N images").
    """

    pair_signs: Tensor
    neurons: Tensor
    heads: Tensor
    source: str


def unit_directions(spec: AttentionPoolSpec, coefficients: Optional[Tensor] = None,
                    pair_signs: Optional[Tensor] = None, progress: bool = False) -> UnitDirections:
    """PC0 signs of pairs and PC0 directions of neurons and heads, from reference data when given.

    Args:
        spec: the model's attention-pool spec.
        coefficients: pair coefficients over a reference set, (B, H, C); None: weights only (every pair sign
            +1; neuron/head directions from :func:`nha_plugin.text.unit_direction` without data).
        pair_signs: (H, C) +-1 that overrides the signs computed from ``coefficients``.
        progress: tqdm bar over neurons.

    Returns:
        :class:`UnitDirections`.
    """
    from tqdm.auto import tqdm

    from ..text.describe import unit_direction

    spec = spec.detached()
    if coefficients is not None:
        if coefficients.dim() != 3 or tuple(coefficients.shape[1:]) != (spec.num_heads, spec.num_neurons):
            raise ValueError(f"coefficients must be (B, {spec.num_heads}, {spec.num_neurons}); "
                             f"got {tuple(coefficients.shape)}")
        coefficients = coefficients.to(device=spec.c_weight.device)
    if pair_signs is not None:
        signs = _check_signs(pair_signs, spec)
    elif coefficients is not None:
        signs = pc0_signs(coefficients.to(spec.c_weight.dtype))
    else:
        signs = _check_signs(None, spec)
    neurons = torch.stack([unit_direction(spec, ("neuron", (n,)), coefficients)
                           for n in tqdm(range(spec.num_neurons), desc="neuron PC0", disable=not progress)])
    heads = torch.stack([unit_direction(spec, ("head", (h,)), coefficients) for h in range(spec.num_heads)])
    source = "weights" if coefficients is None else f"data: {coefficients.shape[0]} images"
    return UnitDirections(pair_signs=signs, neurons=neurons, heads=heads, source=source)


@dataclass
class ConceptUnits:
    """The units a concept is read from.

    Attributes:
        concept: the concept's name.
        text: its text embedding t, (D,).
        pairs: (k, 2) long, rows (head, neuron), best first; ``pair_alignment`` (k,) their <PC0, t>.
        pair_vectors: (k, D) the pair directions u[h,n] of those pairs.
        neurons: (k_neurons,) long; ``neuron_alignment`` their <PC0, t>.
        heads: (k_heads,) long; ``head_alignment`` their <PC0, t>.
    """

    concept: str
    text: Tensor
    pairs: Tensor
    pair_alignment: Tensor
    pair_vectors: Tensor
    neurons: Tensor
    neuron_alignment: Tensor
    heads: Tensor
    head_alignment: Tensor

    def to_dict(self) -> dict:
        return {
            "pairs": [{"head": int(h), "neuron": int(n), "alignment": float(a)}
                      for (h, n), a in zip(self.pairs.tolist(), self.pair_alignment.tolist())],
            "neurons": [{"neuron": int(n), "alignment": float(a)}
                        for n, a in zip(self.neurons.tolist(), self.neuron_alignment.tolist())],
            "heads": [{"head": int(h), "alignment": float(a)}
                      for h, a in zip(self.heads.tolist(), self.head_alignment.tolist())],
        }


def select_units(spec: AttentionPoolSpec, text: Tensor, directions: Optional[UnitDirections] = None, k: int = 5,
                 k_neurons: int = 5, k_heads: int = 1, pair_signs: Optional[Tensor] = None,
                 concept: str = "") -> ConceptUnits:
    """The top-k pairs, neurons and heads for a concept, ranked by <PC0, t> (signed, largest first).

    Args:
        spec: the model's attention-pool spec.
        text: the concept's text embedding t, (D,), not centred.
        directions: from :func:`unit_directions`; None: weights only.
        k, k_neurons, k_heads: how many pairs / neurons / heads to keep.
        pair_signs: (H, C) +-1 overriding ``directions.pair_signs``; None (and no directions) means +1.
        concept: a name stored with the result.
    """
    spec = spec.detached()
    H, C = spec.num_heads, spec.num_neurons
    for name, value, limit in (("k", k, H * C), ("k_neurons", k_neurons, C), ("k_heads", k_heads, H)):
        if not 1 <= int(value) <= limit:
            raise ValueError(f"{name} must be in 1..{limit} for this model (H={H}, C={C}); got {value}")
    if directions is None:
        directions = unit_directions(spec, pair_signs=pair_signs)
    signs = pair_signs if pair_signs is not None else directions.pair_signs
    t = _check_text(text, spec)
    align = pair_alignment(spec, t, signs)
    best = align.flatten().topk(int(k))
    pairs = torch.stack([best.indices // C, best.indices % C], dim=1)
    vectors = torch.stack([pair_directions(spec, heads=slice(h, h + 1))[0, n] for h, n in pairs.tolist()])
    n_align = directions.neurons.to(t) @ t
    h_align = directions.heads.to(t) @ t
    top_n = n_align.topk(int(k_neurons))
    top_h = h_align.topk(int(k_heads))
    return ConceptUnits(concept=concept, text=t, pairs=pairs, pair_alignment=best.values, pair_vectors=vectors,
                        neurons=top_n.indices, neuron_alignment=top_n.values, heads=top_h.indices,
                        head_alignment=top_h.values)


def concept_scores(contributions: Contributions, units: ConceptUnits) -> Dict[str, Tensor]:
    """Per-image scores of one concept, each (B,).

    ``nad_pairs`` = ||sum_{top pairs} s u|| / ||y||; ``cosine`` = cos(y, t); ``neurons`` =
    ||sum_{top neurons} sum_h s[h,n] u[h,n]|| / ||y||; ``heads`` = ||sum_{top heads} W_o^h W_v^h s_h|| / ||y||.
    """
    y = contributions.embedding
    norm = y.norm(dim=-1)
    s = contributions.pair_coefficients
    vectors = units.pair_vectors.to(s)
    pair_part = torch.einsum("bk,kD->bD", s[:, units.pairs[:, 0], units.pairs[:, 1]], vectors)
    neuron_part = contributions.neuron_contributions(units.neurons.to(s.device)).sum(dim=1)
    head_part = contributions.head_contributions()[:, units.heads.to(s.device)].sum(dim=1)
    t = units.text.to(y)
    return {
        "nad_pairs": pair_part.norm(dim=-1) / norm,
        "cosine": (y @ t) / (norm * t.norm()),
        "neurons": neuron_part.norm(dim=-1) / norm,
        "heads": head_part.norm(dim=-1) / norm,
    }


# ---- correlations -----------------------------------------------------------------------------------------
def point_biserial(scores, presence) -> float:
    """Point-biserial correlation of scores (N,) with a binary presence (N,).

    r = (M1 - M0) / sigma * sqrt(p q), with M1/M0 the mean score where the concept is present/absent,
    p (q = 1 - p) the share present and sigma the population (ddof 0) standard deviation of all scores;
    it equals Pearson's r between the scores and the 0/1 presence. NaN when one class is empty or the
    scores are constant.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(presence).astype(bool).ravel()
    if x.shape != b.shape:
        raise ValueError(f"scores and presence must have the same length; got {x.shape[0]} and {b.shape[0]}")
    p = b.mean() if b.size else 0.0
    sigma = x.std()
    if b.size == 0 or p in (0.0, 1.0) or sigma == 0:
        return float("nan")
    return float((x[b].mean() - x[~b].mean()) / sigma * math.sqrt(p * (1 - p)))


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length vectors; NaN when either is constant or shorter than 2."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"expected equal lengths; got {a.shape[0]} and {b.shape[0]}")
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def group_summary(scores, presence, groups, order: Optional[Sequence] = None) -> dict:
    """Mean score and true concept share per group, and the correlation of the two across groups.

    Args:
        scores: (N,) per-image scores.
        presence: (N,) bool, whether the concept is in each image.
        groups: (N,) group label of each image.
        order: the groups in display order (default: sorted unique labels).

    Returns:
        ``{"groups": [{"group", "n", "share", "mean", "sd"}...], "r": Pearson(mean, share)}``.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(presence).astype(bool).ravel()
    g = np.asarray(groups).ravel()
    if not x.shape == b.shape == g.shape:
        raise ValueError(f"scores, presence and groups must have the same length; got {x.size}, {b.size}, {g.size}")
    order = list(order) if order is not None else sorted(set(g.tolist()))
    rows = []
    for label in order:
        sel = g == label
        if not sel.any():
            raise ValueError(f"group {label!r} has no images")
        rows.append({"group": _plain(label), "n": int(sel.sum()), "share": float(b[sel].mean()),
                     "mean": float(x[sel].mean()), "sd": float(x[sel].std())})
    r = pearson([row["mean"] for row in rows], [row["share"] for row in rows])
    return {"groups": rows, "r": r}


def _plain(value):
    """numpy scalars -> Python scalars for JSON."""
    return value.item() if isinstance(value, np.generic) else value


# ---- two-sample tests -------------------------------------------------------------------------------------
def _as_matrix(x) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float64)
    return t[:, None] if t.dim() == 1 else t


def median_bandwidth(x, y) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of the pooled sample (the mean
    of the two middle distances when their count is even, as numpy's median)."""
    z = torch.cat([_as_matrix(x), _as_matrix(y)])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), offset=1)
    med = float(np.median(d[iu[0], iu[1]].numpy())) if iu.shape[1] else 0.0
    return med if med > 0 else 1.0


def _gaussian_kernel(z: Tensor, bandwidth: float) -> Tensor:
    return torch.exp(-torch.cdist(z, z).pow(2) / (2.0 * bandwidth ** 2))


def _mmd2_from_kernel(K: Tensor, first: Tensor) -> Tensor:
    """Unbiased MMD^2 for each row of ``first`` ((P, N) bool: the first sample's members)."""
    a = first.to(K.dtype)
    b = 1.0 - a
    m, n = a.sum(dim=1), b.sum(dim=1)
    K0 = K - torch.diag(torch.diag(K))
    kxx = torch.einsum("pi,ij,pj->p", a, K0, a) / (m * (m - 1))
    kyy = torch.einsum("pi,ij,pj->p", b, K0, b) / (n * (n - 1))
    kxy = torch.einsum("pi,ij,pj->p", a, K, b) / (m * n)
    return kxx + kyy - 2.0 * kxy


def mmd2_unbiased(x, y, bandwidth: Optional[float] = None) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D), Gaussian kernel exp(-||a-b||^2 / (2 sigma^2)).

    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn);
    sigma defaults to :func:`median_bandwidth` of the pooled sample.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    _check_samples(x, y, 2)
    bw = float(bandwidth) if bandwidth is not None else median_bandwidth(x, y)
    first = torch.zeros(1, len(x) + len(y), dtype=torch.bool)
    first[0, :len(x)] = True
    return float(_mmd2_from_kernel(_gaussian_kernel(torch.cat([x, y]), bw), first)[0])


def _check_samples(x: Tensor, y: Tensor, minimum: int) -> None:
    if len(x) < minimum or len(y) < minimum:
        raise ValueError(f"each sample needs at least {minimum} points; got {len(x)} and {len(y)}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"samples must have the same dimension; got {tuple(x.shape)} and {tuple(y.shape)}")


def mmd_test(x, y, n_permutations: int = 500, seed: int = 0, bandwidth: Optional[float] = None,
             chunk: int = 100) -> dict:
    """Kernel two-sample test: unbiased MMD^2 (Gaussian kernel, median-heuristic bandwidth) with a
    permutation p-value ``(1 + #{permuted >= observed}) / (1 + n_permutations)`` (seeded, so reproducible).

    Args:
        x: (m, D) reference sample; y: (n, D) the other sample.
        n_permutations: random relabellings of the pooled sample.
        seed: seed of the permutations.
        bandwidth: kernel sigma; default the median heuristic on the pooled sample (fixed under permutation).
        chunk: permutations evaluated per batch.

    Returns:
        ``{"statistic": MMD^2_u, "p_value", "bandwidth", "n_permutations"}``.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    _check_samples(x, y, 2)
    bw = float(bandwidth) if bandwidth is not None else median_bandwidth(x, y)
    K = _gaussian_kernel(torch.cat([x, y]), bw)
    N, m = len(x) + len(y), len(x)
    first = torch.zeros(1, N, dtype=torch.bool)
    first[0, :m] = True
    observed = float(_mmd2_from_kernel(K, first)[0])
    gen = torch.Generator().manual_seed(int(seed))
    exceed, done = 0, 0
    while done < n_permutations:
        p = min(chunk, n_permutations - done)
        ranks = torch.rand(p, N, generator=gen).argsort(dim=1)
        stats = _mmd2_from_kernel(K, ranks < m)
        exceed += int((stats >= observed - 1e-12 * abs(observed)).sum())
        done += p
    return {"statistic": observed, "p_value": (1 + exceed) / (1 + n_permutations), "bandwidth": bw,
            "n_permutations": int(n_permutations)}


def _ks_scaled(a: np.ndarray, b: np.ndarray) -> int:
    """max |i*n - j*m| over the pooled values: D * m * n as an exact integer."""
    a, b = np.sort(a), np.sort(b)
    v = np.concatenate([a, b])
    i = np.searchsorted(a, v, side="right").astype(np.int64)
    j = np.searchsorted(b, v, side="right").astype(np.int64)
    return int(np.abs(i * len(b) - j * len(a)).max())


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_v |F_a(v) - F_b(v)|."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"both samples need at least one value; got {a.size} and {b.size}")
    return _ks_scaled(a, b) / (a.size * b.size)


def _ks_exact_sf(m: int, n: int, h: int) -> float:
    """P(D >= h / (m n)) under H0 (no ties), by the lattice-path recursion.

    A uniformly random arrangement of the pooled sample is a random path from (0, 0) to (m, n); from (i, j)
    it steps to (i+1, j) with probability (m-i)/(m+n-i-j). The path stays "inside" while |i n - j m| < h.
    Probabilities (never counts) are propagated one anti-diagonal at a time, so nothing overflows."""
    if h <= 0:
        return 1.0
    prob = np.array([1.0])                      # diagonal s = 0: the point (0, 0)
    for s in range(1, m + n + 1):
        i = np.arange(max(0, s - n), min(m, s) + 1)
        j = s - i
        prev_lo = max(0, s - 1 - n)                # first i on diagonal s-1
        new = np.zeros(i.shape, dtype=np.float64)
        rest = m + n - (s - 1)
        from_i = i - 1                           # came from (i-1, j)
        ok = (from_i >= prev_lo) & (from_i <= min(m, s - 1))
        new[ok] += prob[from_i[ok] - prev_lo] * (m - from_i[ok]) / rest
        ok = (i >= prev_lo) & (i <= min(m, s - 1)) & (j - 1 >= 0)   # came from (i, j-1)
        new[ok] += prob[i[ok] - prev_lo] * (n - (j[ok] - 1)) / rest
        new[np.abs(i * n - j * m) >= h] = 0.0
        prob = new
    return float(min(1.0, max(0.0, 1.0 - prob[-1])))


def ks_test(a, b) -> dict:
    """Two-sample two-sided Kolmogorov-Smirnov test with the exact null distribution (no ties assumed).

    Returns:
        ``{"statistic": D, "p_value"}``; the p-value is computed as 1 - P(inside), so it floors near 1e-16.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    d = ks_statistic(a, b)
    return {"statistic": d, "p_value": _ks_exact_sf(a.size, b.size, _ks_scaled(a, b))}


def binomial_sf(successes: int, trials: int, p: float = 0.5) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed exactly in log space."""
    if not 0 <= successes <= trials:
        raise ValueError(f"expected 0 <= successes <= trials; got {successes} of {trials}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    k = np.arange(successes, trials + 1)
    logs = (np.array([math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) for i in k])
            + k * math.log(p) + (trials - k) * math.log1p(-p))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def _fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int = 200) -> Tuple[Tensor, Tensor]:
    """L2-penalised logistic regression: minimise mean BCE + l2/2 ||w||^2 (bias unpenalised), L-BFGS."""
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def classifier_test(x, y, seed: int = 0, test_fraction: float = 0.5, l2: float = 1e-2) -> dict:
    """Classifier two-sample test: can a logistic regression tell x from y on held-out points?

    Both samples are subsampled (seeded) to the smaller size so chance accuracy is exactly 0.5; each is split
    into train/test (``test_fraction`` held out, stratified); features are standardised with the training
    mean/sd; the model is :func:`_fit_logistic` (mean BCE + l2/2 ||w||^2). Under H0 the number of correct
    held-out predictions is Binomial(n_test, 1/2), so p = P(X >= correct) (:func:`binomial_sf`).

    Returns:
        ``{"accuracy", "correct", "n_test", "n_train", "p_value", "l2"}``.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    _check_samples(x, y, 4)
    rng = np.random.default_rng(int(seed))
    size = min(len(x), len(y))
    xs = x[torch.as_tensor(rng.permutation(len(x))[:size])]
    ys = y[torch.as_tensor(rng.permutation(len(y))[:size])]
    n_test = min(size - 1, max(1, int(round(size * test_fraction))))
    train = torch.cat([xs[n_test:], ys[n_test:]])
    test = torch.cat([xs[:n_test], ys[:n_test]])
    labels_train = torch.cat([torch.zeros(size - n_test), torch.ones(size - n_test)]).to(train)
    labels_test = torch.cat([torch.zeros(n_test), torch.ones(n_test)]).to(test)
    mean, sd = train.mean(dim=0), train.std(dim=0).clamp_min(1e-12)
    w, b = _fit_logistic((train - mean) / sd, labels_train, l2)
    pred = (((test - mean) / sd) @ w + b > 0).to(labels_test)
    correct = int((pred == labels_test).sum())
    return {"accuracy": correct / (2 * n_test), "correct": correct, "n_test": 2 * n_test,
            "n_train": 2 * (size - n_test), "p_value": binomial_sf(correct, 2 * n_test), "l2": float(l2)}


# ---- a monitored dataset ----------------------------------------------------------------------------------
@dataclass
class ShiftData:
    """Images grouped for monitoring, with each concept's presence.

    Attributes:
        groups: (N,) group label per image (e.g. the year).
        presence: concept name -> (N,) bool.
        load: image index -> PIL image.
        name: a description for reports.
        presence_rule: concept name -> how presence was read (for reports).
    """

    groups: np.ndarray
    presence: Dict[str, np.ndarray]
    load: Callable[[int], "object"]
    name: str
    presence_rule: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.groups = np.asarray(self.groups)
        for c, p in self.presence.items():
            p = np.asarray(p).astype(bool)
            if p.shape != self.groups.shape:
                raise ValueError(f"presence of {c!r} has {p.size} entries for {self.groups.size} images")
            self.presence[c] = p

    def __len__(self) -> int:
        return int(self.groups.size)

    @property
    def order(self) -> list:
        return sorted(set(self.groups.tolist()))

    @classmethod
    def from_scenes(cls, n: int, seed: int = 424242) -> "ShiftData":
        """``n`` generic generated scenes (every concept at its natural rate), one group, no presence labels:
        a fit set for signs and PC0s independent of the monitored groups (as the paper fits on ImageNet)."""
        from PIL import Image

        from ..scenes import SceneDataset

        scenes = SceneDataset(n, seed=seed)
        return cls(groups=np.zeros(n, dtype=int), presence={}, load=lambda k: Image.fromarray(scenes[k].image),
                   name=f"SceneDataset(n={n}, seed={seed})")

    @classmethod
    def from_sampler(cls, sampler, concept: str) -> "ShiftData":
        """All scenes of a :class:`~nha_plugin.scenes.ShiftSampler`; presence = the planted
        concept (``scene.meta["has_concept"]``, exact)."""
        from PIL import Image

        index = [(year, i) for year in sampler.years for i in range(sampler.n_per_group)]
        presence = np.concatenate([sampler.has_concept(year) for year in sampler.years])
        attr, value = sampler.concept
        return cls(groups=np.array([y for y, _ in index]), presence={concept: presence},
                   load=lambda k: Image.fromarray(sampler.scene(*index[k]).image),
                   name=f"scenes ShiftSampler(concept={attr}={value}, shares={sampler.shares}, "
                        f"n_per_group={sampler.n_per_group}, seed={sampler.seed})",
                   presence_rule={concept: f"planted {attr} == {value!r} (exact)"})


def _batches(data: ShiftData, indices: Sequence[int], preprocess, batch_size: int, device, dtype,
             desc: str, progress: bool) -> Iterable[Tuple[np.ndarray, Tensor]]:
    from tqdm.auto import tqdm

    indices = list(indices)
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(indices), batch_size):
            idx = np.asarray(indices[i:i + batch_size])
            images = torch.stack([preprocess(data.load(int(j)).convert("RGB")) for j in idx])
            yield idx, images.to(device=device, dtype=dtype)
            bar.update(len(idx))


@torch.no_grad()
def run_monitor(model, preprocess, tokenizer, data: ShiftData, concepts: Mapping[str, str], *, k: int = 5,
                k_neurons: int = 5, k_heads: int = 1, templates: Union[None, str, Sequence[str]] = "imagenet",
                reference=None, pair_signs: Union[None, str, Tensor] = "fit", fit_data: Optional[ShiftData] = None,
                fit_images: int = 1000,
                n_permutations: int = 500, seed: int = 0, batch_size: int = 64, cache_dir=None,
                progress: bool = True) -> dict:
    """Score every image for every concept, correlate, aggregate per group and test each group against the
    reference group.

    Args:
        model, preprocess, tokenizer: as returned by :func:`nha_plugin.load_clip` (a CLIP-ResNet).
        data: the grouped images and each concept's presence (:class:`ShiftData`).
        concepts: concept name (a key of ``data.presence``) -> its text (embedded with ``templates``).
        k, k_neurons, k_heads: units kept per method.
        templates: ``"imagenet"`` (CLIP's 80), ``"photo"``, ``None`` or a list of ``{}`` strings.
        reference: the reference group (default: the first in sorted order).
        pair_signs: ``"fit"`` (the paper's sign rule on the fit images), an (H, C) +-1 tensor
            (e.g. ``DatasetStats.pc0_sign``) or None (+1 everywhere).
        fit_data: images that fit the pair signs and the neuron/head PC0s (e.g. :meth:`ShiftData.from_scenes`,
            a generic set as the paper's 1000 ImageNet images); default: the reference group. The sign rule
            is fragile on a set where the concept is rare: most large centred deviations then come from
            images without it, which flips the concept pairs' signs.
        fit_images: at most this many fit images (the first ones) are used.
        n_permutations, seed: MMD permutations and the seed of every random step.
        batch_size: images per forward pass.
        cache_dir: text-embedding cache (see :func:`nha_plugin.text.embed_texts`).
        progress: tqdm bars.

    Returns:
        A JSON-ready dict: ``protocol``, ``groups`` (per group: n and the embedding tests vs the reference)
        and ``concepts`` (per concept: units, per-image r, per-group means/shares, group-mean r, KS tests).
    """
    from ..adapters import get_spec
    from ..models import decompose
    from ..text import embed_texts, get_templates

    missing = [c for c in concepts if c not in data.presence]
    if missing:
        raise ValueError(f"no presence labels for concepts {missing}; data has {sorted(data.presence)}")
    if not concepts:
        raise ValueError("give at least one concept")
    order = data.order
    if len(order) < 2:
        raise ValueError(f"need at least two groups to monitor a shift; got {order}")
    reference = order[0] if reference is None else reference
    if reference not in order:
        raise ValueError(f"reference group {reference!r} is not among the groups {order}")
    spec = get_spec(model).detached()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    tpl = get_templates(templates) if isinstance(templates, str) or templates is None else list(templates)
    names = list(concepts)
    texts = embed_texts(model, tokenizer, [concepts[c] for c in names], tpl, cache_dir=cache_dir,
                        progress=progress)

    if fit_data is None:
        fit_source, fit_idx = data, np.flatnonzero(data.groups == reference)[:fit_images]
        fit_name = f"reference group {reference}"
    else:
        fit_source, fit_idx, fit_name = fit_data, np.arange(min(len(fit_data), fit_images)), fit_data.name
    coeffs = torch.cat([decompose(model, x).pair_coefficients.to(torch.float64).cpu()
                        for _, x in _batches(fit_source, fit_idx, preprocess, batch_size, device, dtype,
                                             "fit", progress)])
    if isinstance(pair_signs, str):
        if pair_signs != "fit":
            raise ValueError(f"pair_signs must be 'fit', an (H, C) tensor or None; got {pair_signs!r}")
        signs, sign_rule = None, f"paper's PC0 sign on {len(fit_idx)} images of {fit_name}"
    elif pair_signs is None:
        signs, sign_rule = _check_signs(None, spec), "+1 (no signs)"
    else:
        signs, sign_rule = pair_signs, "given (H, C) signs"
    dirs = unit_directions(spec, coeffs.to(spec.c_weight.dtype), pair_signs=signs, progress=progress)
    units = {c: select_units(spec, texts[i].to(spec.c_weight), dirs, k=k, k_neurons=k_neurons, k_heads=k_heads,
                             concept=c) for i, c in enumerate(names)}

    N = len(data)
    scores = {c: {m: np.zeros(N) for m in METHODS} for c in names}
    emb = np.zeros((N, spec.output_dim))
    for idx, x in _batches(data, range(N), preprocess, batch_size, device, dtype, "scoring", progress):
        contrib = decompose(model, x)
        emb[idx] = F.normalize(contrib.embedding.double(), dim=-1).cpu().numpy()
        for c in names:
            for m, v in concept_scores(contrib, units[c]).items():
                scores[c][m][idx] = v.double().cpu().numpy()

    ref = data.groups == reference
    group_rows = []
    for label in order:
        sel = data.groups == label
        row = {"group": _plain(label), "n": int(sel.sum())}
        if label != reference:
            row["mmd"] = mmd_test(emb[ref], emb[sel], n_permutations=n_permutations, seed=seed)
            row["classifier"] = classifier_test(emb[ref], emb[sel], seed=seed)
        group_rows.append(row)

    out_concepts = {}
    for i, c in enumerate(names):
        pres = data.presence[c]
        per_method = {m: group_summary(scores[c][m], pres, data.groups, order) for m in METHODS}
        groups = []
        for gi, label in enumerate(order):
            sel = data.groups == label
            row = {"group": _plain(label), "n": int(sel.sum()), "share": per_method[METHODS[0]]["groups"][gi]["share"],
                   "mean": {m: per_method[m]["groups"][gi]["mean"] for m in METHODS},
                   "sd": {m: per_method[m]["groups"][gi]["sd"] for m in METHODS}}
            if label != reference:
                row["ks"] = {m: ks_test(scores[c][m][ref], scores[c][m][sel]) for m in METHODS}
            groups.append(row)
        out_concepts[c] = {
            "text": concepts[c], "presence": data.presence_rule.get(c, "given"),
            "n_present": int(pres.sum()), "units": units[c].to_dict(),
            "per_image_r": {m: point_biserial(scores[c][m], pres) for m in METHODS},
            "group_mean_r": {m: per_method[m]["r"] for m in METHODS},
            "groups": groups,
        }
    protocol = {
        "data": data.name, "n_images": N, "groups": [_plain(g) for g in order], "reference": _plain(reference),
        "k": k, "k_neurons": k_neurons, "k_heads": k_heads,
        "templates": templates if isinstance(templates, str) or templates is None else list(templates),
        "pair_signs": sign_rule, "unit_directions": f"{dirs.source} of {fit_name}", "fit_images": int(len(fit_idx)),
        "n_permutations": n_permutations, "seed": seed,
        "embedding_tests": "unit-normalised image embeddings; MMD: Gaussian kernel, median-heuristic bandwidth, "
                           "unbiased MMD^2, permutation p; classifier: logistic regression, 50% held out, "
                           "binomial p vs 0.5",
        "score_tests": "two-sample KS (exact) of each score vs the reference group",
    }
    return {"protocol": protocol, "groups": group_rows, "concepts": out_concepts}


# ---- reports ----------------------------------------------------------------------------------------------
def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}")


def markdown(report: dict) -> str:
    """Markdown tables of a report ``{"protocol"?: ..., "runs": [run_monitor(...), ...]}``."""
    lines = []
    head = report.get("protocol", {})
    if head:
        lines += ["## Protocol", ""] + [f"- {k}: {v}" for k, v in head.items()] + [""]
    for run in report["runs"]:
        p = run["protocol"]
        lines += [f"## {p['data']}", "",
                  f"n = {p['n_images']} images in groups {p['groups']} (reference {p['reference']}); "
                  f"k = {p['k']} pairs, {p['k_neurons']} neurons, {p['k_heads']} head(s); templates "
                  f"{p['templates']}; pair signs: {p['pair_signs']}; neuron/head PC0 from {p['unit_directions']}; "
                  f"{p['n_permutations']} MMD permutations; seed {p['seed']}.", ""]
        lines += ["| concept | presence | " + " | ".join(f"r per image: {METHOD_LABELS[m]}" for m in METHODS)
                  + " | " + " | ".join(f"r group means: {METHOD_LABELS[m]}" for m in METHODS) + " |",
                  "|" + "---|" * (2 + 2 * len(METHODS))]
        for c, res in run["concepts"].items():
            lines.append(f"| {c} | {res['presence']} | "
                         + " | ".join(_f(res["per_image_r"][m]) for m in METHODS) + " | "
                         + " | ".join(_f(res["group_mean_r"][m]) for m in METHODS) + " |")
        lines.append("")
        tests = {row["group"]: row for row in run["groups"]}
        for c, res in run["concepts"].items():
            lines += [f"### {c}: per group", "",
                      "| group | n | true share | " + " | ".join(f"mean {METHOD_LABELS[m]}" for m in METHODS)
                      + " | MMD p | C2ST acc (p) | " + " | ".join(f"KS p {METHOD_LABELS[m]}" for m in METHODS) + " |",
                      "|" + "---|" * (5 + 2 * len(METHODS))]
            for row in res["groups"]:
                t = tests[row["group"]]
                if "mmd" in t:
                    mmd = _p(t["mmd"]["p_value"])
                    c2 = f"{t['classifier']['accuracy']:.3f} ({_p(t['classifier']['p_value'])})"
                    ks = " | ".join(_p(row["ks"][m]["p_value"]) for m in METHODS)
                else:
                    mmd, c2, ks = "reference", "reference", " | ".join("reference" for _ in METHODS)
                lines.append(f"| {row['group']} | {row['n']} | {row['share']:.3f} | "
                             + " | ".join(_f(row["mean"][m], 4) for m in METHODS) + f" | {mmd} | {c2} | {ks} |")
            lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Union[str, Path]) -> Path:
    """One column per (run, concept): top, each method's group mean as a standardised shift from the reference
    group ((mean_g - mean_ref) / pooled per-image sd) against the true concept share; bottom, the p-values of
    the two-sample tests per group (log scale)."""
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
                    label=f"{METHOD_LABELS[m]} (r={_f(res['group_mean_r'][m], 2)})")
        for row, share in zip(res["groups"], shares):
            ax.annotate(str(row["group"]), (share, 0), textcoords="offset points", xytext=(0, -14), fontsize=7,
                        ha="center", color="grey")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("true concept share in group")
        ax.set_ylabel("group mean shift (pooled sd units)")
        ax.set_title(f"{c!r}: group means vs true share", fontsize=9)
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
        ax.set_xticks(xs, [str(g) for g in labels])
        ax.set_xlabel(f"group (vs reference {run['protocol']['reference']})")
        ax.set_ylabel("p-value")
        ax.set_title(f"{c!r}: two-sample tests", fontsize=9)
        ax.legend(fontsize=6)
    for j in range(len(panels), blocks * cols):
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: dict, out_dir: Union[str, Path], stem: str = "shift") -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir`` (atomically); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    _atomic_text(paths["json"], json.dumps(report, indent=1, allow_nan=True))
    _atomic_text(paths["md"], markdown(report))
    plot(report, paths["png"])
    return paths
