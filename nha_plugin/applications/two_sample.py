"""Two-sample statistics and correlations on plain arrays: nothing here knows of CLIP.

- correlations: :func:`point_biserial` (scores vs a binary label), :func:`pearson`, :func:`group_summary`
  (mean score and label share per group, and their correlation across groups);
- two-sample tests, as in "Failing Loudly" (Rabanser et al., 2019): :func:`mmd_test` (unbiased MMD^2, Gaussian
  kernel with the median-heuristic bandwidth, permutation p-value), :func:`ks_test` (Kolmogorov-Smirnov with
  the exact null distribution), :func:`classifier_test` (held-out accuracy of :func:`fit_logistic`, binomial
  p-value from :func:`binomial_sf`).

Samples are numpy arrays or torch tensors, ``(N,)`` or ``(N, D)``; everything is computed in float64 and seeded,
so a test repeated on the same samples and seed gives the same numbers. Only torch and numpy are needed (the
tests check every function against scipy, scikit-learn or a brute-force sum).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["point_biserial", "pearson", "group_summary", "median_bandwidth", "mmd2_unbiased", "mmd_test",
           "ks_statistic", "ks_test", "binomial_sf", "fit_logistic", "classifier_test"]


# ---- correlations -----------------------------------------------------------------------------------------
def point_biserial(scores, presence) -> float:
    """Point-biserial correlation of scores with a binary presence.

    r = (M1 - M0) / sigma * sqrt(p q), with M1/M0 the mean score where the label is present/absent,
    p (q = 1 - p) the share present and sigma the population (ddof 0) standard deviation of all scores;
    it equals Pearson's r between the scores and the 0/1 presence.

    Args:
        scores: (N,) numbers.
        presence: (N,) bools (or 0/1).

    Returns:
        r in [-1, 1]; NaN when one class is empty or the scores are constant.
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
    """Pearson correlation of two equal-length vectors ``a`` and ``b``, (N,) each.

    Returns:
        r in [-1, 1]; NaN when either is constant or N < 2.
    """
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
        scores: (N,) per-item scores.
        presence: (N,) bool, whether the label is present in each item.
        groups: (N,) group label of each item.
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
        rows.append({"group": label.item() if isinstance(label, np.generic) else label, "n": int(sel.sum()),
                     "share": float(b[sel].mean()),
                     "mean": float(x[sel].mean()), "sd": float(x[sel].std())})
    r = pearson([row["mean"] for row in rows], [row["share"] for row in rows])
    return {"groups": rows, "r": r}


# ---- two-sample tests -------------------------------------------------------------------------------------
def _as_matrix(x) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float64)
    return t[:, None] if t.dim() == 1 else t


def median_bandwidth(x, y) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of the pooled sample (the mean
    of the two middle distances when their count is even, as numpy's median).

    Args:
        x: (m, D) or (m,) sample; y: (n, D) or (n,) sample.

    Returns:
        The bandwidth sigma; 1.0 when every point coincides (the median distance is 0).
    """
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

    MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_{i,j} k(x_i,y_j)/(mn).

    Args:
        x: (m, D) sample, m >= 2; y: (n, D) sample, n >= 2 ((m,) and (n,) are one-dimensional points).
        bandwidth: sigma; default :func:`median_bandwidth` of the pooled sample.

    Returns:
        MMD^2_u (may be slightly negative: it is unbiased).
    """
    return _observed_mmd(x, y, bandwidth)[0]


def _observed_mmd(x, y, bandwidth: Optional[float]) -> Tuple[float, Tensor, int, float]:
    """(MMD^2_u, the pooled kernel matrix (m+n, m+n), m, sigma) of samples x (m, D) and y (n, D)."""
    x, y = _as_matrix(x), _as_matrix(y)
    _check_samples(x, y, 2)
    bw = float(bandwidth) if bandwidth is not None else median_bandwidth(x, y)
    K = _gaussian_kernel(torch.cat([x, y]), bw)
    first = torch.zeros(1, len(K), dtype=torch.bool)
    first[0, :len(x)] = True
    return float(_mmd2_from_kernel(K, first)[0]), K, len(x), bw


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
    observed, K, m, bw = _observed_mmd(x, y, bandwidth)
    N = len(K)
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
    """Two-sample Kolmogorov-Smirnov statistic sup_v |F_a(v) - F_b(v)| of samples ``a`` (m,) and ``b`` (n,)
    (ties allowed)."""
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

    Args:
        a: (m,) sample; b: (n,) sample.

    Returns:
        ``{"statistic": D, "p_value"}``; the p-value is computed as 1 - P(inside), so it floors near 1e-16.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    d = ks_statistic(a, b)
    return {"statistic": d, "p_value": _ks_exact_sf(a.size, b.size, _ks_scaled(a, b))}


def binomial_sf(successes: int, trials: int, p: float = 0.5) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), summed exactly in log space (never underflows to a
    wrong 0 before the true tail does)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"expected 0 <= successes <= trials; got {successes} of {trials}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    k = np.arange(successes, trials + 1)
    logs = (np.array([math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) for i in k])
            + k * math.log(p) + (trials - k) * math.log1p(-p))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int = 200) -> Tuple[Tensor, Tensor]:
    """L2-penalised logistic regression: minimise mean BCE + l2/2 ||w||^2 (bias unpenalised) with L-BFGS.

    Equals scikit-learn's ``LogisticRegression(C=1 / (l2 * N))``.

    Args:
        x: (N, D) features; y: (N,) labels 0/1 in x's dtype.
        l2: the penalty.
        max_iter: L-BFGS iterations.

    Returns:
        ``(w, b)``: weights (D,) and bias ().
    """
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
    mean/sd; the model is :func:`fit_logistic` (mean BCE + l2/2 ||w||^2). Under H0 the number of correct
    held-out predictions is Binomial(n_test, 1/2), so p = P(X >= correct) (:func:`binomial_sf`).

    Args:
        x: (m, D) sample, m >= 4; y: (n, D) sample, n >= 4.
        seed: seed of the subsampling and the split.
        test_fraction: share of each subsample held out.
        l2: the logistic regression's penalty.

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
    w, b = fit_logistic((train - mean) / sd, labels_train, l2)
    pred = (((test - mean) / sd) @ w + b > 0).to(labels_test)
    correct = int((pred == labels_test).sum())
    return {"accuracy": correct / (2 * n_test), "correct": correct, "n_test": 2 * n_test,
            "n_train": 2 * (size - n_test), "p_value": binomial_sf(correct, 2 * n_test), "l2": float(l2)}


