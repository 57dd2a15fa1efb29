"""TextSpan (docs/methods.md §2) on CLIP-ViT attention heads over a dataset, and the checks that go with it.

A head's direct contribution to the image embedding, ``c[l, h]`` (D,) per image (``ViTContributions.
head_contributions()``; summed over source tokens, LN_post statistics frozen), is collected over K images for
the analysed layers (the last 4 by default: only they matter directly). For each head, TextSpan picks m texts
whose (projected) directions explain the most variance of the head's centred contributions; the m texts span
a subspace, and replacing the head's contribution by ``mean + projection onto that span`` tests whether the
texts capture what the head writes.

    from nha_plugin.vit.textspan_heads import (collect_head_statistics, head_text_spans,
                                               reconstruction_report)
    stats = collect_head_statistics(model, images, layers=4)           # HeadStatistics (K images)
    spans = head_text_spans(stats, text_embeddings, texts, m=20)       # one HeadSpan per analysed head
    report = reconstruction_report(stats, spans, class_directions, labels, ms=(1, 2, 4, 8, 16, 20))

Everything downstream of the collection is linear algebra on the stored contributions: the embedding with a
set of heads mean-ablated is ``y - sum_dropped (c - mean)``; with the analysed heads reconstructed from m
texts it is ``y - sum_all_heads (c - mean) + sum_analysed P_m (c - mean)`` (earlier heads mean-ablated, MLPs
and the input embedding intact). These are direct-effect ablations: later layers still see the original
head outputs, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import files, runs
from ..text.textspan import text_span
from .decomposition import decompose
from .spec import ViTSpec, vit_spec

__all__ = ["HeadStatistics", "HeadSpan", "collect_head_statistics", "resolve_layers", "head_text_spans",
           "project_onto_span", "mean_ablated_embeddings", "reconstructed_embeddings", "predict", "accuracy",
           "reconstruction_report", "spans_to_json"]

ImagesSource = Union[Tensor, Callable[[int, int], Tensor]]
PARTS_VERSION = 2          # 1: torch.save parts keyed on meta; 2: safetensors parts, keyed on the images
_STATS_FORMAT = "nha-head-statistics"


@dataclass
class HeadStatistics:
    """Per-image direct contributions of attention heads over K images.

    Attributes:
        layers: the analysed layers (sorted), n of them.
        num_layers: L, all layers of the model.
        contributions: (K, n, H, D) each analysed head's contribution per image.
        layer_heads: (K, L, D) per image, the sum over heads of each layer's contribution (every layer).
        embedding: (K, D) the model's image embedding (unnormalised).
        head_means: (L, H, D) mean contribution of every head over the K images.
        labels: optional (K,) int64 class labels; groups: optional (K,) int64 group ids.
    """

    layers: List[int]
    num_layers: int
    contributions: Tensor
    layer_heads: Tensor
    embedding: Tensor
    head_means: Tensor
    labels: Optional[Tensor] = None
    groups: Optional[Tensor] = None
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return self.embedding.shape[0]

    @property
    def num_heads(self) -> int:
        return self.head_means.shape[1]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def head_index(self, layer: int, head: int) -> int:
        """Position of ``layer`` in :attr:`contributions`' second axis (raises if it was not analysed)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not analysed (analysed: {self.layers}); collect it with layers=[...]")
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head {head} out of range: the model has {self.num_heads} heads per layer")
        return self.layers.index(layer)

    def save(self, path: Union[str, Path]) -> Path:
        """Write to a state file (:func:`nha_plugin.files.save_state`: safetensors, atomic, checksummed; ``meta``
        must be JSON-able or numpy). Returns the path (``.safetensors`` by convention)."""
        return files.save_state(path, {"format": _STATS_FORMAT, "version": 1,
                                       **{f.name: getattr(self, f.name) for f in fields(self)}})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HeadStatistics":
        """Read :meth:`save`'s file (nothing is unpickled).

        Raises:
            FileNotFoundError: no such file.
            files.CorruptFileError: not a file of :meth:`save` (e.g. an old ``torch.save`` file), or damaged.
        """
        tree = files.load_state(path)
        tag = (tree.pop("format", None), tree.pop("version", None)) if isinstance(tree, dict) else None
        if tag != (_STATS_FORMAT, 1):
            raise files.CorruptFileError(path, "no head statistics in it", "a file of HeadStatistics.save")
        return cls(**tree)


@dataclass
class HeadSpan:
    """TextSpan of one head.

    Attributes:
        layer, head: which head.
        texts: the m picked texts (in pick order); indices (m,) their rows in the pool.
        variances: (m,) the variance :func:`~nha_plugin.text.text_span` reported at each pick.
        explained: (m,) share of the head's total centred variance explained by the first j texts' span.
        basis: (m, D) orthonormal basis of that span, row j the j-th pick's new direction (a zero row when a
            pick adds none, e.g. past the data's rank).
        mean: (D,) the head's mean contribution on the fitting images.
        rank: the number of singular directions the texts were projected onto (r clipped to the numerical
            rank of the head's contributions, at most min(K, D)).
        total_variance: mean squared norm of the centred contributions.
    """

    layer: int
    head: int
    texts: Optional[List[str]]
    indices: Tensor
    variances: Tensor
    explained: Tensor
    basis: Tensor
    mean: Tensor
    rank: int
    total_variance: float

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "unit": f"L{self.layer}H{self.head}", "texts": self.texts,
                "indices": self.indices.tolist(), "variances": self.variances.tolist(),
                "explained": self.explained.tolist(), "rank": self.rank, "total_variance": self.total_variance}


def resolve_layers(num_layers: int, layers: Union[None, int, Sequence[int]] = None) -> List[int]:
    """``None`` -> the last min(4, L) layers; an int n -> the last min(n, L); a list -> those (negatives count
    from the end), sorted."""
    if layers is None:
        layers = 4
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"asked for the last {layers} layers; give a positive number")
        return list(range(max(0, num_layers - layers), num_layers))
    out = []
    for l in layers:
        if not -num_layers <= int(l) < num_layers:
            raise ValueError(f"layer {l} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
        out.append(int(l) % num_layers)
    if not out:
        raise ValueError("layers is empty; give at least one layer")
    return sorted(set(out))


def _batch_parts(spec: ViTSpec, images: Tensor, layers: List[int]) -> dict:
    c = decompose(spec, images, token_layers=None)
    heads = c.head_contributions().detach()                                  # (b, L, H, D)
    return {"contributions": heads[:, layers].cpu(), "layer_heads": heads.sum(dim=2).cpu(),
            "embedding": c.embedding.detach().cpu(), "head_sum": heads.sum(dim=0).cpu()}


def _parts_run(spec: ViTSpec, images: ImagesSource, total: int, batch_size: int, layers: List[int],
               parts_dir: Union[str, Path], meta: Optional[dict], fresh: bool) -> runs.RunDir:
    """The run folder of :func:`collect_head_statistics`: keyed on the settings, the images and the weights."""
    if not meta and not isinstance(images, Tensor):
        raise ValueError("parts_dir needs meta (a description of the images: dataset, seed, ...) when images is "
                         "a function: it names the images in the run key (each batch's fingerprint is checked too)")
    dtype = spec.dtype
    # a function's images are only known batch by batch: each part stores its batch's fingerprint instead
    data = {"meta": meta or None,
            "images": runs.images_fingerprint(images) if isinstance(images, Tensor) else "checked per part"}
    key = runs.run_key({"n": total, "batch_size": batch_size, "layers": layers, "dtype": str(dtype)}, data=data,
                       weights=runs.module_fingerprint(spec.module), version=PARTS_VERSION)
    return runs.RunDir(parts_dir, key, fresh=fresh)


def _resumed_part(run: runs.RunDir, name: str, images: Tensor, start: int) -> Tuple[Optional[dict], str]:
    """(the saved part or None, the fingerprint of ``images``); refuses a part computed on other images."""
    fingerprint = runs.images_fingerprint(images)
    part = run.load_part(name)
    if part is not None and part.get("images") != fingerprint:
        raise runs.RunMismatchError(
            f"{run.path}: part {name} was computed on other images than images {start}..{start + len(images) - 1} "
            f"given now, although the run key (settings, meta, weights) is the same: the image source changed. "
            "Pass --fresh (CLI) / fresh=True (API) to discard the parts, or use another parts folder.")
    return part, fingerprint


@torch.no_grad()
def collect_head_statistics(model: nn.Module, images: ImagesSource, n: Optional[int] = None, *,
                            layers: Union[None, int, Sequence[int]] = None, batch_size: int = 32,
                            labels: Optional[Sequence[int]] = None, groups: Optional[Sequence[int]] = None,
                            parts_dir: Union[str, Path, None] = None, fresh: bool = False, progress: bool = True,
                            meta: Optional[dict] = None) -> HeadStatistics:
    """Decompose K images with :func:`nha_plugin.vit.decompose` and keep what TextSpan and ablations need.

    Args:
        model: a CLIP-ViT :func:`~nha_plugin.vit.spec.vit_spec` reads (open_clip, transformers, timm) or its spec.
        images: preprocessed images (K, 3, S, S) on the model's device and dtype, or a function
            ``images(start, stop) -> (stop - start, 3, S, S)`` (generates batches lazily; with ``n``).
        n: number of images when ``images`` is a function.
        layers: analysed layers (see :func:`resolve_layers`; default the last min(4, L)).
        batch_size: images per decomposition.
        labels, groups: optional per-image ints stored with the statistics.
        parts_dir: a :class:`~nha_plugin.runs.RunDir` holding each batch's result (``part_XXXXX``, safetensors)
            so a killed run resumes. Its key: ``n``, ``batch_size``, the layers, the dtype, ``meta``, the
            fingerprint of the images (of a tensor; a function's batches are fingerprinted as they are
            produced and checked against the one stored in each part) and of the weights. Another key raises
            :class:`~nha_plugin.runs.RunMismatchError`, so parts of other images are never mixed in.
        fresh: discard the parts of an earlier run in ``parts_dir``.
        meta: JSON-able description of the images (dataset, seed, ...): stored with the statistics and part of
            the run key (required with ``parts_dir`` when ``images`` is a function).
        progress: tqdm bar.

    Returns:
        :class:`HeadStatistics` on the CPU, in the model's dtype.

    Raises:
        runs.RunMismatchError: ``parts_dir`` holds a run of other settings, images or weights.
        files.CorruptFileError: a part or ``run.json`` there is damaged (names the file).
    """
    from tqdm.auto import tqdm
    if isinstance(images, Tensor):
        total = images.shape[0]
        source = lambda a, b: images[a:b]                                # noqa: E731
    else:
        if n is None:
            raise ValueError("give n (the number of images) when images is a function images(start, stop)")
        total, source = int(n), images
    if total < 1:
        raise ValueError("no images: need at least one (two or more for variances)")
    spec = vit_spec(model)
    num_layers = spec.layers
    layers = resolve_layers(num_layers, layers)
    run = None if parts_dir is None else _parts_run(spec, images, total, batch_size, layers, parts_dir, meta, fresh)
    parts = []
    for i, a in enumerate(tqdm(range(0, total, batch_size), desc="head contributions", unit="batch",
                               disable=not progress)):
        x = source(a, min(total, a + batch_size))
        if run is None:
            parts.append(_batch_parts(spec, x, layers))
            continue
        part, fingerprint = _resumed_part(run, f"part_{i:05d}", x, a)
        if part is None:
            part = {**_batch_parts(spec, x, layers), "images": fingerprint}
            run.save_part(f"part_{i:05d}", part)
        parts.append(part)
    head_sum = torch.stack([p["head_sum"] for p in parts]).sum(dim=0)
    as_long = lambda v: None if v is None else torch.as_tensor(list(v), dtype=torch.long)   # noqa: E731
    return HeadStatistics(layers=layers, num_layers=num_layers,
                          contributions=torch.cat([p["contributions"] for p in parts]),
                          layer_heads=torch.cat([p["layer_heads"] for p in parts]),
                          embedding=torch.cat([p["embedding"] for p in parts]),
                          head_means=head_sum / total, labels=as_long(labels), groups=as_long(groups),
                          meta=dict(meta or {}))


def _span_basis(X: Tensor, T: Tensor, indices: Tensor, rank: int) -> Tensor:
    """Orthonormal (m, D) basis whose first j rows span the first j picked texts projected onto the top-``rank``
    right singular vectors of X (what :func:`text_span` deflates with, recomputed the same way)."""
    V = torch.linalg.svd(X, full_matrices=False).Vh[:rank]
    picked = (T[indices] @ V.T) @ V                                          # (m, D)
    Q, R = torch.linalg.qr(picked.T)
    diag = torch.diagonal(R)
    # QR's column signs are arbitrary: point each basis vector along its text. A pick that adds no new
    # direction (its projected text already lies in the span) gets a zero row, not QR's arbitrary completion
    tol = torch.finfo(Q.dtype).eps ** 0.5 * diag.abs().max().clamp_min(torch.finfo(Q.dtype).tiny)
    sign = torch.where(diag < 0, -1.0, 1.0).to(Q) * (diag.abs() > tol).to(Q)
    return (Q * sign).T


def head_text_spans(stats: HeadStatistics, text_embeddings: Tensor, texts: Optional[Sequence[str]] = None,
                    m: int = 20, rank: int = 80, heads: Optional[Sequence[Tuple[int, int]]] = None,
                    progress: bool = True) -> List[HeadSpan]:
    """TextSpan of every analysed head (or of ``heads``, a list of (layer, head)).

    Args:
        stats: from :func:`collect_head_statistics`.
        text_embeddings: (M, D) unit text embeddings of the pool (no templates for the paper's setting).
        texts: the M texts.
        m: texts per head, clipped to the rank and to M.
        rank: r, singular directions of a head's contributions the texts are projected onto; clipped to the
            numerical rank of its (K, D) contributions (at most min(K, D): what K images support).

    Returns:
        one :class:`HeadSpan` per head, in (layer, head) order.
    """
    from tqdm.auto import tqdm
    M, D = text_embeddings.shape
    if D != stats.dim:
        raise ValueError(f"text embeddings have D={D} but the head contributions have D={stats.dim}; embed the "
                         "pool with the same CLIP model")
    if stats.num_images < 2:
        raise ValueError("TextSpan needs contributions of at least 2 images")
    heads = list(heads) if heads is not None else [(l, h) for l in stats.layers for h in range(stats.num_heads)]
    dtype = stats.contributions.dtype if stats.contributions.dtype == torch.float64 else torch.float32
    T = text_embeddings.to(dtype)
    out = []
    for layer, head in tqdm(heads, desc="TextSpan heads", unit="head", disable=not progress):
        X = stats.contributions[:, stats.head_index(layer, head), head].to(dtype)
        # singular directions with zero singular value carry no data: projecting texts on them would let
        # TextSpan pick texts the head never writes
        r = min(rank, int(torch.linalg.matrix_rank(X)))
        if r < 1:
            raise ValueError(f"head L{layer}H{head} writes the same vector for every image (rank 0); nothing to span")
        res = text_span(X, T, texts, m=min(m, r, M), rank=r)
        basis = _span_basis(X, T, res.indices, r)
        Xc = X - X.mean(dim=0)
        total = float((Xc ** 2).sum(dim=1).mean())
        explained = ((Xc @ basis.T) ** 2).mean(dim=0).cumsum(0) / max(total, torch.finfo(dtype).tiny)
        out.append(HeadSpan(layer, head, res.texts, res.indices, res.variances, explained, basis, X.mean(dim=0), r,
                            total))
    return out


def project_onto_span(contributions: Tensor, span: HeadSpan, m: Optional[int] = None) -> Tensor:
    """``mean + P_m (c - mean)`` for contributions (K, D): the head rebuilt from its first ``m`` texts."""
    B = span.basis[:m] if m is not None else span.basis
    mu = span.mean.to(contributions)
    B = B.to(contributions)
    return mu + ((contributions - mu) @ B.T) @ B


def _drop_matrix(stats: HeadStatistics, drop: Tensor) -> Tensor:
    drop = torch.as_tensor(drop, dtype=torch.bool)
    if drop.shape != (stats.num_layers, stats.num_heads):
        raise ValueError(f"drop must be an (L, H) = ({stats.num_layers}, {stats.num_heads}) bool mask; got "
                         f"{tuple(drop.shape)}")
    return drop


def mean_ablated_embeddings(stats: HeadStatistics, drop: Tensor, head_means: Optional[Tensor] = None) -> Tensor:
    """Embeddings (K, D) with the heads where ``drop`` (L, H) is True replaced by their means (direct effect).

    Heads of layers that were not analysed can only be dropped a whole layer at a time (their per-head
    contributions were not kept). ``head_means`` (L, H, D) default to the statistics' own means; pass the
    means of another set (e.g. the training images) to ablate test images with training statistics."""
    drop = _drop_matrix(stats, drop)
    means = (stats.head_means if head_means is None else head_means).to(stats.embedding)
    y = stats.embedding.clone()
    for l in range(stats.num_layers):
        if not drop[l].any():
            continue
        if l in stats.layers:
            i = stats.layers.index(l)
            y -= (stats.contributions[:, i, drop[l]] - means[l, drop[l]]).sum(dim=1)
        elif drop[l].all():
            y -= stats.layer_heads[:, l] - means[l].sum(dim=0)
        else:
            raise ValueError(f"layer {l} was not analysed, so only all of its heads can be dropped; collect it "
                             f"with layers=[..., {l}] to drop single heads")
    return y


def reconstructed_embeddings(stats: HeadStatistics, spans: Sequence[HeadSpan], m: Optional[int],
                             head_means: Optional[Tensor] = None, ablate_others: bool = True) -> Tensor:
    """Embeddings (K, D) with each spanned head replaced by its m-text reconstruction.

    With ``ablate_others`` (the paper's protocol) every other head is mean-ablated; MLPs and the input
    embedding stay intact. ``m = 0`` mean-ablates the spanned heads too; ``m = None`` uses every picked text."""
    means = (stats.head_means if head_means is None else head_means).to(stats.embedding)
    drop = torch.zeros(stats.num_layers, stats.num_heads, dtype=torch.bool)
    if ablate_others:
        drop[:] = True
    for s in spans:
        drop[s.layer, s.head] = True
    y = mean_ablated_embeddings(stats, drop, means)
    for s in spans:
        if m != 0:
            c = stats.contributions[:, stats.head_index(s.layer, s.head), s.head]
            y += project_onto_span(c, s, m) - means[s.layer, s.head]
    return y


def predict(embeddings: Tensor, weight: Tensor, bias: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
    """Class predictions (K,) of a linear read-out ``normalize?(y) @ weight (+ bias)``; weight (D, C)."""
    y = embeddings.to(weight.dtype)
    if normalize:
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    logits = y @ weight
    if bias is not None:
        logits = logits + bias.to(logits)
    return logits.argmax(dim=-1)


def accuracy(embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
             normalize: bool = True) -> float:
    """Share of images whose :func:`predict` equals ``labels`` (K,)."""
    return float((predict(embeddings, weight, bias, normalize) == labels.to(torch.long)).double().mean())


def reconstruction_report(stats: HeadStatistics, spans: Sequence[HeadSpan], weight: Tensor, labels: Tensor,
                          ms: Sequence[int] = (1, 2, 4, 8, 16, 20), bias: Optional[Tensor] = None,
                          normalize: bool = True) -> dict:
    """Accuracies of the paper's reconstruction protocol and of mean-ablations, on the statistics' images.

    Returns a dict: ``original``; ``analysed_heads_only`` (every head outside the spanned ones mean-ablated);
    ``textspan`` {m: accuracy with the spanned heads rebuilt from m texts, the others mean-ablated}
    (m clipped to the texts picked); ``all_heads_mean_ablated``; ``layer_mean_ablated`` {layer: accuracy with
    that layer's heads mean-ablated}; ``early_layers_mean_ablated`` (all heads before the analysed layers)."""
    acc = lambda y: accuracy(y, weight, labels, bias, normalize)            # noqa: E731
    L, H = stats.num_layers, stats.num_heads
    picked = min((len(s.indices) for s in spans), default=0)
    out = {"original": acc(stats.embedding),
           "analysed_heads_only": acc(reconstructed_embeddings(stats, spans, None)),
           "textspan": {int(m): acc(reconstructed_embeddings(stats, spans, min(int(m), picked))) for m in ms},
           "all_heads_mean_ablated": acc(mean_ablated_embeddings(stats, torch.ones(L, H, dtype=torch.bool)))}
    layer_acc = {}
    for l in range(L):
        drop = torch.zeros(L, H, dtype=torch.bool)
        drop[l] = True
        layer_acc[l] = acc(mean_ablated_embeddings(stats, drop))
    out["layer_mean_ablated"] = layer_acc
    early = torch.zeros(L, H, dtype=torch.bool)
    early[:min(stats.layers)] = True
    out["early_layers_mean_ablated"] = acc(mean_ablated_embeddings(stats, early))
    return out


def spans_to_json(spans: Sequence[HeadSpan]) -> List[dict]:
    return [s.to_json() for s in spans]
