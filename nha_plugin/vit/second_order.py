"""Second-order effects of CLIP-ViT MLP neurons (docs/methods.md §3), exact under frozen statistics.

A post-activation neuron n of layer l writes ``m_i[n] * r_n`` into the residual stream at every token i,
with ``r_n = ls_2 ⊙ c_proj[:, n]`` (W,). Its *second-order effect* is the part of the output that flows
through the value path of exactly one later attention head (layer l' > l, head h) into the class token,
then through LN_post and the projection P, with every attention pattern and every LayerNorm's sigma frozen
from the image's own forward pass::

    phi_n(I) = sum_{l'>l} sum_h  c[n, (l',h)] * U[n, (l',h)]                                          (D,)
    c[n, (l',h)] = (1 / sigma_post) * sum_i a^{l',h}[0, i] * m_i[n] / sigma_i^{l'}       per image  (scalar)
    U[n, (l',h)] = P^T diag(g_post) C  diag(ls_1^{l'}) W_O^{l',h} W_V^{l',h} diag(g_1^{l'}) C  r_n       (D,)

``C = I - 11^T/W`` is LayerNorm's centring: the mean LayerNorm subtracts is linear in its input, so a vector v
added at a token leaves a LayerNorm (sigma frozen) as ``g ⊙ (v - mean(v)) / sigma``; we keep that centring,
for LN_1 of every later layer and for LN_post. (the paper's formula omits both the centring and the LN_post
gain g_post; without them the effects would not be the derivative of the frozen-statistics network.) Layer
scale (``ls_1``, ``ls_2``) enters where the block applies it. Second-order effects carry no bias or shift
terms: b_V, b_O, the LN betas and the LN mean/bias *shares* of docs/methods.md §2 do not depend on the neuron, so
phi_n is the purely linear path (the constant parts stay with the attention components they belong to).

So ``phi_n`` is a sum of K = (L - l - 1) * H fixed directions with per-image scalars, exactly like NAD's
pairs but with K directions per neuron instead of one: it is only approximately rank one, and every dataset
statistic of ``phi_n`` follows from statistics of the (K,) coefficient vector mapped through ``U[n]``
(K, D). Nothing here builds (B, L', H, N, M, D): coefficients are one einsum over tokens, effects another
over the K heads.

Functions:
    :func:`second_order_directions` (M, K, D), :func:`second_order_coefficients` (B, M, K),
    :func:`second_order_effects` (B, M, D), :func:`second_order_total` (B, D) = sum over neurons,
    :func:`collect_second_order` -> :class:`SecondOrderStats` (streaming, two passes, resumable),
    :func:`ablated_embeddings` (mean-ablation / significant-only / PC1 reconstruction), :func:`neuron_maps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import files, runs

__all__ = ["second_order_directions", "second_order_coefficients", "second_order_effects", "second_order_total",
           "SecondOrderStats", "collect_second_order", "ablated_embeddings", "neuron_maps", "head_labels",
           "ABLATIONS"]

ABLATIONS = ("none", "mean", "significant", "pc1")
CHECKPOINT_VERSION = 2     # 1: torch.save, fingerprint of the directions; 2: state files keyed with runs.run_key
_STATS, _CHECKPOINT = "nha-second-order-stats", "nha-second-order-checkpoint"


# ---- the linear path --------------------------------------------------------------------------------------
def _check_layer(spec, layer: int) -> int:
    L = spec.layers
    if not -L <= layer < L:
        raise ValueError(f"layer {layer} out of range: this ViT has {L} layers (0..{L - 1})")
    layer = layer % L
    if layer == L - 1:
        raise ValueError(f"layer {layer} is the last layer: no attention head follows it, so its neurons have no "
                         f"second-order effect; choose a layer in 0..{L - 2}")
    return layer


def head_labels(spec, layer: int) -> list[str]:
    """Labels ``"L{l'}H{h}"`` of the K = (L - layer - 1) * H later heads, in the order of the K axis."""
    layer = _check_layer(spec, layer)
    return [f"L{lp}H{h}" for lp in range(layer + 1, spec.layers) for h in range(spec.heads)]


def _centre(x: Tensor, dim: int) -> Tensor:
    return x - x.mean(dim=dim, keepdim=True)


@torch.no_grad()
def second_order_directions(spec, layer: int, neurons: Optional[Union[Sequence[int], Tensor]] = None,
                            dtype: Optional[torch.dtype] = None) -> Tensor:
    """The fixed directions ``U[n, k]`` of every neuron's second-order effect, (M, K, D).

    Args:
        spec: ``vit.vit_spec(model)``.
        layer: the neurons' layer l (0..L-2).
        neurons: a subset of neuron indices (default all M); the result then has that many rows.
        dtype: computation dtype (default the spec's).

    Returns:
        (M, K, D) with K = (L - l - 1) * H in the order of :func:`head_labels`. Cost: O(L' H d W (M + D));
        memory M K D values (ViT-B-32, layer 9: 38M).
    """
    layer = _check_layer(spec, layer)
    blk = spec.blocks[layer]
    dtype = dtype or spec.dtype
    R = blk.c_proj.to(dtype)                                                    # (W, M)
    if neurons is not None:
        R = R[:, torch.as_tensor(neurons, dtype=torch.long, device=R.device)]
    R = blk.ls_2.to(dtype)[:, None] * R
    CR = _centre(R, 0)                                                          # LN_1 centring of a later layer
    post = spec.ln_post
    P = spec.output_projection().to(dtype)                                      # (W, D)
    Q = _centre((post.gamma.to(dtype)[:, None] * P).T, 1)                       # P^T diag(g_post) C, (D, W)
    out = []
    for lp in range(layer + 1, spec.layers):
        b = spec.blocks[lp]
        V = torch.einsum("hew,wm->hem", b.W_v.to(dtype), b.ln_1.gamma.to(dtype)[:, None] * CR)    # (H, d, M)
        T = torch.einsum("Dw,hwe->hDe", Q * b.ls_1.to(dtype)[None], b.W_o_heads.to(dtype))        # (H, D, d)
        out.append(torch.einsum("hDe,hem->mhD", T, V))
    return torch.cat(out, dim=1)


def second_order_coefficients(trace, layer: int, neurons: Optional[Union[Sequence[int], Tensor]] = None) -> Tensor:
    """Per-image scalars ``c[b, n, k]`` of the second-order effects, (B, M, K).

    ``c[b, n, (l',h)] = sum_i a^{l',h}[b, 0, i] * m[b, i, n] / sigma^{l'}[b, i] / sigma_post[b]`` with the
    attention probabilities, LN_1 and LN_post sigmas and post-activation neurons read from ``trace``
    (``vit.trace(spec, images)``).

    Args:
        trace: a ``ViTTrace``.
        layer: the neurons' layer l (0..L-2).
        neurons: optional subset of neuron indices.
    """
    L = len(trace.attn)
    if not 0 <= layer % L < L - 1:
        raise ValueError(f"layer {layer} has no later attention layer in a {L}-layer ViT; choose 0..{L - 2}")
    layer = layer % L
    m = trace.mlp_hidden[layer]                                                 # (B, N, M)
    if neurons is not None:
        m = m[..., torch.as_tensor(neurons, dtype=torch.long, device=m.device)]
    w = torch.cat([trace.attn[lp][:, :, 0, :] / trace.ln1_std[lp][:, None, :] for lp in range(layer + 1, L)],
                  dim=1)                                                        # (B, K, N)
    return torch.einsum("bkn,bnm->bmk", w.to(m.dtype), m) / trace.post_std.to(m.dtype)[:, None, None]


def second_order_effects(trace, directions: Tensor, layer: int,
                         neurons: Optional[Union[Sequence[int], Tensor]] = None) -> Tensor:
    """Second-order effects phi (B, M, D) of a layer's neurons (or of ``neurons``; then ``directions`` must be
    those neurons' rows).

    Args:
        trace: ``vit.trace(spec, images)``.
        directions: (M, K, D) from :func:`second_order_directions` (same layer, same neuron subset).
        layer: the neurons' layer.
    """
    c = second_order_coefficients(trace, layer, neurons)
    _check_directions(c, directions)
    return torch.einsum("bmk,mkd->bmd", c, directions.to(c))


def second_order_total(coefficients: Tensor, directions: Tensor) -> Tensor:
    """Sum over neurons of the second-order effects, (B, D), without building (B, M, D)."""
    _check_directions(coefficients, directions)
    return torch.einsum("bmk,mkd->bd", coefficients, directions.to(coefficients))


def _check_directions(c: Tensor, U: Tensor) -> None:
    if U.dim() != 3 or U.shape[:2] != c.shape[1:]:
        raise ValueError(f"directions must be (M, K, D) = ({c.shape[1]}, {c.shape[2]}, D) to match the "
                         f"coefficients {tuple(c.shape)}; got {tuple(U.shape)}: compute both for the same layer "
                         "and neuron subset")


# ---- dataset statistics -----------------------------------------------------------------------------------
@dataclass
class SecondOrderStats:
    """Dataset statistics of one layer's second-order effects (all in coefficient space, float64).

    Attributes:
        layer: the neurons' layer.
        k: how many top images are kept per neuron.
        count: images seen.
        coef_mean: (M, K) mean coefficient vector (the mean effect is ``coef_mean @ U``).
        coef_comoment: (M, K, K) sum over images of centred coefficient outer products (merged batch by batch
            with Chan's parallel formulas, so no large sums of squares cancel).
        top_norms: (M, k) the k largest norms of the *centred* effects ``||phi_n - mean_n||``, descending.
        top_coef: (M, k, K) the coefficients of those images.
        top_index: (M, k) their image indices.
        heads: the K head labels.
    """

    layer: int
    k: int
    count: int
    coef_mean: Tensor
    coef_comoment: Tensor
    top_norms: Tensor
    top_coef: Tensor
    top_index: Tensor
    heads: list = field(default_factory=list)

    @property
    def mean_coef(self) -> Tensor:
        """(M, K) mean coefficient vector."""
        return self.coef_mean

    def mean_effect(self, directions: Tensor) -> Tensor:
        """(M, D) mean second-order effect of every neuron."""
        return torch.einsum("mk,mkd->md", self.coef_mean, directions.to(self.coef_mean))

    def covariance_coef(self) -> Tensor:
        """(M, K, K) covariance of the coefficients over all images (divides by count)."""
        return self.coef_comoment / max(self.count, 1)

    def update_moments(self, c: Tensor) -> None:
        """Merge a batch of coefficients (B, M, K) into the count, mean and co-moment (Chan et al.)."""
        nb = c.shape[0]
        mb = c.mean(dim=0)
        xc = c - mb
        n = self.count + nb
        delta = mb - self.coef_mean
        self.coef_comoment += torch.einsum("bmk,bml->mkl", xc, xc) + \
            delta[:, :, None] * delta[:, None, :] * (self.count * nb / n)
        self.coef_mean += delta * (nb / n)
        self.count = n

    @property
    def threshold(self) -> Tensor:
        """(M,) significance threshold: the neuron's k-th largest centred training norm. An effect is
        *significant* when its centred norm is strictly above it (≈ k / count of the training images)."""
        return self.top_norms[:, -1]

    def centred_norms(self, coefficients: Tensor, directions: Tensor) -> Tensor:
        """(B, M) norms ``||phi_n - mean_n||`` of new images' effects, from their coefficients (B, M, K)."""
        return _centred_norms(coefficients, self.mean_coef.to(coefficients), _gram(directions).to(coefficients))

    def significant(self, coefficients: Tensor, directions: Tensor) -> Tensor:
        """(B, M) bool: centred norm above :attr:`threshold`."""
        return self.centred_norms(coefficients, directions) > self.threshold.to(coefficients)

    def pc1(self, directions: Tensor, source: str = "topk") -> dict:
        """First principal direction of each neuron's centred effects, (M, D), with explained variances.

        ``source="topk"`` (the paper): the k images with the largest centred norm, SVD of their centred
        effects (no second centring), sign such that the majority of those k effects project positively (on a
        tie, such that their projections sum to a positive number).
        ``source="all"``: top eigenvector of the covariance over all images (streamed), same sign rule.
        Both run in coefficient space: with ``U[n]^T = Q R`` (D x K, K x K), ``phi = c U = (c R^T) Q^T``.

        Returns a dict: ``pc1`` (M, D) unit rows; ``explained_topk`` (M,) share of the top-k centred
        effects' energy along pc1; ``explained_all`` (M,) share of the all-image variance along pc1;
        ``explained_all_max`` (M,) the same for the all-image top eigenvector (the best any direction does).
        """
        if source not in ("topk", "all"):
            raise ValueError(f"source must be 'topk' (the paper's top-k SVD) or 'all'; got {source!r}")
        U = directions.to(self.coef_mean)
        Q, R = torch.linalg.qr(U.transpose(1, 2))                              # (M, D, K), (M, K, K)
        Y = torch.einsum("mjk,mlk->mjl", self.top_coef - self.mean_coef[:, None], R)   # (M, k, K)
        _, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        cov = R @ self.covariance_coef() @ R.transpose(1, 2)                   # (M, K, K): covariance in Q basis
        evals, evecs = torch.linalg.eigh(cov)
        w = Vh[:, 0] if source == "topk" else evecs[:, :, -1]                  # (M, K)
        proj = torch.einsum("mjk,mk->mj", Y, w)
        votes = (proj > 0).sum(dim=1) - (proj < 0).sum(dim=1)
        flip = (votes < 0) | ((votes == 0) & (proj.sum(dim=1) < 0))            # a tie: the projections' sum decides
        w = torch.where(flip[:, None], -w, w)
        total = evals.clamp_min(0).sum(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        return {"pc1": torch.einsum("mdk,mk->md", Q, w),
                "explained_topk": (proj ** 2).sum(dim=1) / (S ** 2).sum(dim=1).clamp_min(torch.finfo(w.dtype).tiny),
                "explained_all": torch.einsum("mk,mkl,ml->m", w, cov, w) / total,
                "explained_all_max": evals[:, -1].clamp_min(0) / total}

    def state(self) -> dict:
        return {"layer": self.layer, "k": self.k, "count": self.count, "coef_mean": self.coef_mean,
                "coef_comoment": self.coef_comoment, "top_norms": self.top_norms, "top_coef": self.top_coef,
                "top_index": self.top_index, "heads": list(self.heads)}

    @classmethod
    def from_state(cls, state: dict) -> "SecondOrderStats":
        return cls(**state)

    def save(self, path: Union[str, Path]) -> Path:
        """Write :meth:`state` to a state file (:func:`nha_plugin.files.save_state`: safetensors, atomic,
        checksummed). Returns the path (``.safetensors`` by convention)."""
        return files.save_state(path, {"format": _STATS, "version": 1, "state": self.state()})

    @classmethod
    def load(cls, path: Union[str, Path], layer: Optional[int] = None) -> "SecondOrderStats":
        """Read :meth:`save`'s file or a finished :func:`collect_second_order` checkpoint (``layer`` picks one of
        its layers; needed when it holds several). Nothing is unpickled.

        Raises:
            FileNotFoundError: no such file.
            files.CorruptFileError: neither kind of file (e.g. an old ``torch.save`` file), or damaged.
            ValueError: an unfinished checkpoint, or ``layer`` missing / not in it.
        """
        tree = files.load_state(path)
        kind = tree.get("format") if isinstance(tree, dict) else None
        if kind == _STATS and tree.get("version") == 1:
            return cls.from_state(tree["state"])
        if kind != _CHECKPOINT:
            raise files.CorruptFileError(path, "no second-order statistics in it",
                                         "a file of SecondOrderStats.save or a collect_second_order checkpoint")
        if tree["phase"] != "done":
            raise ValueError(f"{path} is an unfinished collection (phase {tree['phase']!r}); rerun "
                             "collect_second_order with the same settings to finish it")
        states = tree["stats"]
        if layer is None:
            if len(states) != 1:
                raise ValueError(f"{path} holds layers {sorted(states)}; pass layer=")
            layer = next(iter(states))
        if layer not in states:
            raise ValueError(f"{path} holds layers {sorted(states)}, not {layer}")
        return cls.from_state(states[layer])


def _gram(directions: Tensor) -> Tensor:
    return directions @ directions.transpose(1, 2)                              # (M, K, K)


def _centred_norms(c: Tensor, mean: Tensor, gram: Tensor) -> Tensor:
    x = c - mean
    return torch.einsum("bmk,mkl,bml->bm", x, gram, x).clamp_min(0).sqrt()


def _empty_stats(spec, layer: int, k: int, M: int, K: int) -> SecondOrderStats:
    f64 = dict(dtype=torch.float64)
    return SecondOrderStats(layer, k, 0, torch.zeros(M, K, **f64), torch.zeros(M, K, K, **f64),
                            torch.full((M, k), -1.0, **f64), torch.zeros(M, k, K, **f64),
                            torch.full((M, k), -1, dtype=torch.long), head_labels(spec, layer))


def _merge_top(stats: SecondOrderStats, c: Tensor, gram: Tensor, start: int) -> None:
    """Keep each neuron's k largest centred norms among the stored ones and a new batch c (B, M, K)."""
    M, k, K = stats.top_coef.shape
    norms = _centred_norms(c, stats.coef_mean, gram)                            # (B, M)
    all_norms = torch.cat([stats.top_norms, norms.T], dim=1)
    all_coef = torch.cat([stats.top_coef, c.transpose(0, 1)], dim=1)
    all_index = torch.cat([stats.top_index, torch.arange(start, start + c.shape[0]).expand(M, -1)], dim=1)
    best = all_norms.topk(k, dim=1).indices                                     # sorted descending
    stats.top_norms = all_norms.gather(1, best)
    stats.top_coef = all_coef.gather(1, best[..., None].expand(-1, -1, K))
    stats.top_index = all_index.gather(1, best)


def _open_checkpoint(path: Union[str, Path, None], key: dict, fresh: bool) -> Optional[dict]:
    """The checkpoint at ``path`` to resume from, or None to start over (no path, no file, or ``fresh``)."""
    if path is None or fresh or not Path(path).exists():
        return None
    tree = files.load_state(path)
    if not (isinstance(tree, dict) and tree.get("format") == _CHECKPOINT):
        raise files.CorruptFileError(path, "not a collect_second_order checkpoint", "a checkpoint of "
                                     "collect_second_order (pass fresh=True / --fresh to overwrite it)")
    runs.check_key(tree["key"], key, path)
    return tree


def _checked(images: Tensor, seen: list, i: int, s: int, path) -> Tensor:
    """``images`` (batch ``i``, from image ``s``) once their fingerprint equals the one pass 1 stored (or is stored)."""
    fingerprint = runs.images_fingerprint(images)
    if i == len(seen):
        seen.append(fingerprint)
    elif seen[i] != fingerprint:
        raise runs.RunMismatchError(
            f"{path}: images {s}..{s + len(images) - 1} differ from the ones its statistics were computed on, with "
            "the same run key (settings, dataset_id, weights): the image source changed or is not deterministic. "
            "Pass --fresh (CLI) / fresh=True (API) to start over, or use another path.")
    return images


def collect_second_order(spec, layer: Union[int, Sequence[int]], images: Callable[[int, int], Tensor],
                         n_images: int, *, batch_size: int = 64, k: int = 100, path: Union[str, Path, None] = None,
                         fresh: bool = False, save_every: int = 1, progress: bool = True, dataset_id: str = ""):
    """Stream second-order statistics of one or several layers over a dataset: mean, covariance, top-k norms.

    Two passes over the images, because the top-k images are ranked by the norm of the *centred* effect and
    the mean is only known after the first pass: pass 1 merges the coefficients' mean and co-moment, pass 2
    keeps each neuron's k largest ``||phi_n - mean_n||`` (with their coefficients). Several layers share each
    traced forward pass. Per batch the extra work is O(B M K^2) per layer; memory O(M K^2 + M k K) per layer,
    independent of the dataset size.

    Args:
        spec: ``vit.vit_spec(model)``.
        layer: the neurons' layer (0..L-2), or a sequence of layers.
        images: ``images(start, stop)`` -> preprocessed images (stop - start, 3, S, S) of the spec's dtype and
            device; must return the same images for the same range (both passes and resumed runs call it).
        n_images: dataset size.
        batch_size: images per call.
        k: top images kept per neuron (the paper: 100; needs k <= n_images).
        path: checkpoint file (a :func:`~nha_plugin.files.save_state` file, ``.safetensors`` by convention);
            an interrupted run resumes there and the final statistics are saved there too. Its run key holds
            the layers, ``k``, ``n_images``, ``batch_size``, the dtype, ``dataset_id`` and the weights'
            fingerprint (``spec.module``); pass 1 stores each batch's image fingerprint and every later call
            of ``images`` is checked against it.
        fresh: ignore and overwrite the checkpoint at ``path``.
        save_every: batches between checkpoints.
        progress: tqdm bar.
        dataset_id: a string naming the images, part of the run key (required with ``path``).

    Returns:
        :class:`SecondOrderStats` for an int ``layer``; a dict layer -> SecondOrderStats for a sequence.

    Raises:
        runs.RunMismatchError: the checkpoint at ``path`` is of other settings, images or weights.
        files.CorruptFileError: the file at ``path`` is damaged or not a checkpoint (names it).
    """
    from tqdm.auto import tqdm

    from .trace import trace as vit_trace

    single = isinstance(layer, int)
    layers = [_check_layer(spec, lay) for lay in ([layer] if single else layer)]
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"give distinct layers; got {layer}")
    if not 1 <= k <= n_images:
        raise ValueError(f"k must be between 1 and n_images ({n_images}); got {k}")
    if path is not None and not (dataset_id and spec.module is not None):
        raise ValueError("a checkpoint path needs dataset_id (a string naming the images: dataset, seed, ...) and "
                         "spec.module (vit_spec(model) sets it): the resume key names the images and the weights")
    Us = [second_order_directions(spec, lay).to(torch.float64) for lay in layers]
    grams = [_gram(U) for U in Us]
    key = None if path is None else runs.run_key(
        {"layers": layers, "k": k, "n_images": n_images, "batch_size": batch_size, "dtype": str(spec.dtype)},
        data={"dataset_id": dataset_id}, weights=runs.module_fingerprint(spec.module), version=CHECKPOINT_VERSION)
    ck = _open_checkpoint(path, key, fresh)
    if ck is not None:
        stats = {lay: SecondOrderStats.from_state(ck["stats"][lay]) for lay in layers}
        phase, start, seen = ck["phase"], ck["start"], list(ck["images"])
    else:
        stats = {lay: _empty_stats(spec, lay, k, U.shape[0], U.shape[1]) for lay, U in zip(layers, Us)}
        phase, start, seen = "mean", 0, []

    def checkpoint(ph, st):
        if path is not None:
            files.save_state(path, {"format": _CHECKPOINT, "key": key, "phase": ph, "start": st, "images": seen,
                                    "stats": {lay: v.state() for lay, v in stats.items()}})

    starts = list(range(0, n_images, batch_size))
    if phase != "done":
        bar = tqdm(total=2 * len(starts), desc=f"second-order stats, layers {layers}", unit="batch",
                   disable=not progress)
        bar.update(sum(s < start for s in starts) + (len(starts) if phase == "topk" else 0))
        for ph in ("mean", "topk")[(phase == "topk"):]:
            for i, s in enumerate(starts):
                if s < start:
                    continue
                e = min(n_images, s + batch_size)
                x = images(s, e) if path is None else _checked(images(s, e), seen, i, s, path)
                with torch.no_grad():
                    tr = vit_trace(spec, x)
                    for lay, g in zip(layers, grams):
                        c = second_order_coefficients(tr, lay).to("cpu", torch.float64)
                        if ph == "mean":
                            stats[lay].update_moments(c)
                        else:
                            _merge_top(stats[lay], c, g, s)
                bar.update(1)
                if (i + 1) % save_every == 0 and e < n_images:
                    checkpoint(ph, e)
            start = 0
            checkpoint("topk" if ph == "mean" else "done", 0 if ph == "mean" else n_images)
        bar.close()
    return stats[layers[0]] if single else stats


# ---- applications that stay in coefficient space --------------------------------------------------------
def ablated_embeddings(output: Tensor, coefficients: Tensor, directions: Tensor, stats: SecondOrderStats,
                       mode: str = "mean", pc1: Optional[Tensor] = None) -> Tensor:
    """The image embedding (B, D) with a layer's second-order effects replaced, exact under frozen statistics.

    ``y' = y - sum_n phi_n + sum_n replacement_n`` where the replacement is
    ``"mean"``: the neuron's dataset mean; ``"significant"``: phi_n where its centred norm exceeds the
    threshold, the mean otherwise; ``"pc1"``: ``mean_n + <phi_n - mean_n, pc1_n> pc1_n``; ``"none"``: phi_n.

    Args:
        output: (B, D) the model's embedding (``trace.output``).
        coefficients: (B, M, K) :func:`second_order_coefficients` of the same images.
        directions: (M, K, D).
        stats: the layer's :class:`SecondOrderStats`.
        pc1: (M, D) unit directions for ``mode="pc1"`` (``stats.pc1(directions)["pc1"]``).
    """
    if mode not in ABLATIONS:
        raise ValueError(f"mode must be one of {ABLATIONS}; got {mode!r}")
    c = coefficients.to(torch.float64)
    U = directions.to(c)
    mu = stats.mean_coef.to(c)
    if mode == "none":
        return output
    if mode == "mean":
        repl = c - mu                                       # subtract (phi - mean) for every neuron
        return (output.to(c) - torch.einsum("bmk,mkd->bd", repl, U)).to(output.dtype)
    if mode == "significant":
        keep = stats.significant(c, U)                      # (B, M)
        repl = (c - mu) * (~keep)[..., None]
        return (output.to(c) - torch.einsum("bmk,mkd->bd", repl, U)).to(output.dtype)
    if pc1 is None:
        raise ValueError("mode='pc1' needs pc1 (M, D): pass stats.pc1(directions)['pc1']")
    v = pc1.to(c)
    z = torch.einsum("mkd,md->mk", U, v)                    # <U[n,k], v_n>
    proj = torch.einsum("bmk,mk->bm", c - mu, z)            # <phi_n - mean_n, v_n>
    removed = torch.einsum("bmk,mkd->bd", c - mu, U)
    return (output.to(c) - removed + torch.einsum("bm,md->bd", proj, v)).to(output.dtype)


def neuron_maps(trace, layer: int, neurons: Union[Sequence[int], Tensor], grid: Sequence[int]) -> Tensor:
    """Activation maps of neurons at the patch tokens, (B, len(neurons), gh, gw) (class token dropped)."""
    m = trace.mlp_hidden[layer][:, 1:, :][..., torch.as_tensor(neurons, dtype=torch.long)]   # (B, gh*gw, n)
    gh, gw = grid
    if m.shape[1] != gh * gw:
        raise ValueError(f"the trace has {m.shape[1]} patch tokens but grid {tuple(grid)} has {gh * gw}")
    return m.transpose(1, 2).reshape(m.shape[0], -1, gh, gw)
