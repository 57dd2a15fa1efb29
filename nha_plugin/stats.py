"""Streaming dataset statistics of the pair coefficients, in one pass, resumable and torchrun-aware.

Everything the dataset-level methods of METHODS.md §A need follows from the pair coefficients
s (B, H, C) alone, because a pair's contribution is ``s[h,n] u[h,n]`` with a fixed direction
(DESIGN.md §1). :func:`collect` streams a loader once and keeps, in float64:

- the count and the per-pair mean, merged batch by batch with Chan's parallel formulas (each batch is
  centred on its own mean first, so no large sums of squares ever cancel);
- the per-neuron co-moments of ``s[:, :, n]`` (C, H, H): their diagonal is the per-pair variance, and
  mapped through ``U_n = [u[0,n] ... u[H-1,n]]`` (D, H) they give the covariance of the neuron's
  contribution, hence its exact principal components without a D x D matrix per neuron;
- the summed squared norm of each head's centred contribution (H,) and, optionally, the head
  contributions' full co-moments (H, D, D) (input for TextSpan);
- per pair, the k largest and the k smallest coefficients with their sample indices (H, C, k). The k
  largest ``|s - m|`` for any m lie among those 2k values, so the paper's top-k centred norms (and the
  PC0 sign) are exact once the mean is known, after the single pass.

The mean embedding and the head means are derived from the pair mean (the decomposition is linear).

Sharding under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node N``; gloo on CPU, NCCL on GPU):

- a ``Dataset`` with ``batch_size``: process r reads indices ``r, r + W, r + 2W, ...`` (W = world size);
- an iterable of batches: every process iterates the whole loader and process r decomposes batches
  ``r, r + W, ...`` (round robin), so the loader must yield the same batches in the same order on every
  process. Loading is then paid W times: for large data pass a Dataset.

Statistics are merged exactly: counts, weighted means and co-moments (with the parallel-axis correction
``n_r (m_r - m)(m_r - m)^T``) by ``all_reduce`` SUM in float64, top-k lists by ``all_gather`` and
re-selection. Sample indices are dataset indices (Dataset) or positions in the stream (iterable), so
they are the same for any number of processes.

Top-k ties are broken by the smaller sample index, which makes every selection deterministic.

Example::

    import nha_plugin as nha
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    stats = nha.stats.collect(model, dataset, batch_size=32, checkpoint="stats.partial.safetensors",
                              resume=True)
    stats.save("stats.safetensors")
    stats.importance          # (H, C) the paper's pair importance
    stats.pc0_sign            # (H, C) +-1: PC0 = sign * u / ||u||
    stats.neuron_pcs(2)       # exact top-2 PCs of every neuron's contribution
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .pool import constant_term, head_outputs, neuron_blocks, pair_directions, pc_sign
from .spec import AttentionPoolSpec

__all__ = ["DatasetStats", "NeuronPCs", "TopDeviations", "StatsMismatchError", "collect", "spec_fingerprint",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
# auto mode keeps the (H, D, D) head co-moments when they take at most this many float64 entries (128 MiB)
HEAD_COVARIANCE_AUTO_LIMIT = 2 ** 24
_NEURON_CHUNK = 256


class StatsMismatchError(ValueError):
    """Statistics (or a checkpoint) do not belong to this model or run configuration."""


class NeuronPCs(NamedTuple):
    """Principal components of each neuron's contribution ``sum_h s[h,n] u[h,n]`` over the dataset.

    Attributes:
        components: (C, K, D) unit directions, by decreasing variance; sign: the neuron's mean
            contribution projects non-negatively on each.
        variances: (C, K) variance of the contribution along each component (population, divided by n).
        mean: (C, D) the neuron's mean contribution ``U_n m_n``.
        total_variance: (C,) trace of the contribution's covariance (sum over all components).
    """

    components: Tensor
    variances: Tensor
    mean: Tensor
    total_variance: Tensor


class TopDeviations(NamedTuple):
    """Per pair, the k samples with the largest ``|s - mean|`` (ties: smaller sample index first).

    Attributes:
        deviations: (H, C, k') ``|s - mean|``, decreasing; k' = min(k, count).
        coefficients: (H, C, k') the coefficients s of those samples.
        indices: (H, C, k') their sample indices.
    """

    deviations: Tensor
    coefficients: Tensor
    indices: Tensor


# ---- helpers on a spec -----------------------------------------------------------------------------------
def spec_fingerprint(spec: AttentionPoolSpec) -> str:
    """sha256 of the attention pool's weights (as float32) and head count: identifies the model the
    statistics belong to, whatever precision it runs in (fp32 / fp64 copies of the same weights agree)."""
    h = hashlib.sha256(f"heads={spec.num_heads}".encode())
    for name in AttentionPoolSpec._WEIGHTS:
        t = getattr(spec, name).detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _model_identity(spec: AttentionPoolSpec) -> dict:
    return {"fingerprint": spec_fingerprint(spec), "num_heads": spec.num_heads, "num_neurons": spec.num_neurons,
            "output_dim": spec.output_dim, "grid_size": spec.grid_size, "source": spec.source}


def _select(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k best entries along the last axis with ties broken by the smaller index (deterministic)."""
    order = indices.argsort(dim=-1, stable=True)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    order = values.argsort(dim=-1, descending=largest, stable=True)[..., :k]
    return values.gather(-1, order), indices.gather(-1, order)


def _insert_streaming(run_values: Tensor, run_indices: Tensor, values: Tensor, indices: Tensor,
                      largest: bool) -> None:
    """In place: merge a batch (..., B) into sorted top-k lists (..., k) when every batch index exceeds every
    listed index and the batch is in index order. Then a single stable sort of [list, batch] keeps the
    tie rule (smaller index first), and only the rows where some batch value beats the list's last entry
    need sorting (a tie with it loses on the index): after the first few batches, few rows do."""
    k, B = run_values.shape[-1], values.shape[-1]
    rv, ri, bv = run_values.view(-1, k), run_indices.view(-1, k), values.reshape(-1, B)
    last = rv[:, -1:]
    rows = ((bv > last) if largest else (bv < last)).any(dim=1).nonzero()[:, 0]
    if rows.numel() == 0:
        return
    cand_v = torch.cat([rv[rows], bv[rows]], dim=1)
    cand_i = torch.cat([ri[rows], indices.expand(rows.numel(), B)], dim=1)
    order = cand_v.argsort(dim=1, descending=largest, stable=True)[:, :k]
    rv[rows] = cand_v.gather(1, order)
    ri[rows] = cand_i.gather(1, order)


def _atomic_save(tensors: dict, meta: dict, path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"nha_stats": json.dumps(meta)})
    os.replace(tmp, path)


# ---- the statistics ----------------------------------------------------------------------------------------
class DatasetStats:
    """Streaming statistics of the pair coefficients s (B, H, C) of one CLIP-ResNet over a dataset.

    Build with :func:`collect` (or :meth:`empty` + :meth:`update`); save with :meth:`save`, read back with
    :meth:`load`. Properties that need the model's weights (neuron PCs, head means, the mean embedding)
    use the spec given at construction or to :meth:`load`.

    Attributes:
        count: number of images seen.
        k: length of the per-pair top-k lists.
        mean: (H, C) float64 per-pair mean of s.
        neuron_comoment: (C, H, H) float64 ``sum_i (s_i[:, n] - m[:, n])(s_i[:, n] - m[:, n])^T``.
        head_sq: (H,) float64 summed squared norm of each head's centred contribution.
        head_comoment: (H, D, D) float64 co-moments of the head contributions, or None.
        top_max_values, top_max_indices: (H, C, k) the k largest s per pair and their sample indices
            (index -1 and value -inf while fewer than k samples were seen).
        top_min_values, top_min_indices: (H, C, k) the k smallest (value +inf while unfilled).
        direction_norms: (H, C) ``||u[h, n]||``, stored so pair importance needs no model.
        meta: JSON-able metadata (model identity, run state, user fields).
    """

    def __init__(self, *, count: int, mean: Tensor, neuron_comoment: Tensor, head_sq: Tensor,
                 head_comoment: Optional[Tensor], top_max_values: Tensor, top_max_indices: Tensor,
                 top_min_values: Tensor, top_min_indices: Tensor, direction_norms: Tensor, meta: dict,
                 spec: Optional[AttentionPoolSpec] = None):
        self.count = int(count)
        self.mean = mean
        self.neuron_comoment = neuron_comoment
        self.head_sq = head_sq
        self.head_comoment = head_comoment
        self.top_max_values, self.top_max_indices = top_max_values, top_max_indices
        self.top_min_values, self.top_min_indices = top_min_values, top_min_indices
        self.direction_norms = direction_norms
        self.meta = meta
        self.spec = spec.detached() if spec is not None else None

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def empty(cls, spec: AttentionPoolSpec, k: int = 50, head_covariance: Optional[bool] = None,
              device: Union[str, torch.device, None] = None) -> "DatasetStats":
        """Zeroed accumulators for ``spec``; ``head_covariance=None`` keeps the (H, D, D) co-moments when
        they hold at most 2**24 entries (scenes-rn: yes; RN50, RN50x16: no)."""
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
        if head_covariance is None:
            head_covariance = H * D * D <= HEAD_COVARIANCE_AUTO_LIMIT
        dev = torch.device(device) if device is not None else spec.device
        f64 = dict(dtype=torch.float64, device=dev)
        norms = torch.cat([pair_directions(spec.detached(), slice(h, h + 1)).double().norm(dim=-1)
                           for h in range(H)])
        return cls(count=0, mean=torch.zeros(H, C, **f64), neuron_comoment=torch.zeros(C, H, H, **f64),
                   head_sq=torch.zeros(H, **f64),
                   head_comoment=torch.zeros(H, D, D, **f64) if head_covariance else None,
                   top_max_values=torch.full((H, C, k), -math.inf, **f64),
                   top_max_indices=torch.full((H, C, k), -1, dtype=torch.long, device=dev),
                   top_min_values=torch.full((H, C, k), math.inf, **f64),
                   top_min_indices=torch.full((H, C, k), -1, dtype=torch.long, device=dev),
                   direction_norms=norms.to(dev), meta={"model": _model_identity(spec), "k": k}, spec=spec)

    @property
    def k(self) -> int:
        return self.top_max_values.shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, C)."""
        return tuple(self.mean.shape)

    def _need_spec(self, what: str) -> AttentionPoolSpec:
        if self.spec is None:
            raise RuntimeError(f"{what} needs the model's weights: load the statistics with "
                               "DatasetStats.load(path, model=model) or set stats.spec = get_spec(model)")
        return self.spec

    def _head_of(self, coefficients: Tensor) -> Tensor:
        return head_outputs(self._need_spec("head contributions").detached(), coefficients)

    # ---- accumulation ---------------------------------------------------------------------------------
    def update(self, coefficients: Tensor, indices: Tensor) -> None:
        """Add a batch: coefficients s (B, H, C) and the samples' indices (B,) int64 (distinct, >= 0)."""
        if coefficients.dim() != 3 or tuple(coefficients.shape[1:]) != self.shape:
            raise ValueError(f"expected pair coefficients (B, {self.shape[0]}, {self.shape[1]}); "
                             f"got {tuple(coefficients.shape)}")
        if coefficients.shape[0] == 0:
            return
        s = coefficients.to(self.mean.device, torch.float64)
        nb = s.shape[0]
        mb = s.mean(dim=0)
        sc = s - mb
        hc = self._head_of(sc)                                                   # (B, H, D)
        batch = dict(count=nb, mean=mb, neuron_comoment=torch.einsum("bhn,bgn->nhg", sc, sc),
                     head_sq=(hc * hc).sum(dim=(0, 2)),
                     head_comoment=torch.einsum("bhd,bhe->hde", hc, hc) if self.head_comoment is not None else None)
        self._merge_moments(batch)
        indices = indices.to(self.mean.device, torch.long)
        vals = s.permute(1, 2, 0)
        streaming = bool((indices[1:] > indices[:-1]).all()) and \
            int(indices[0]) > int(torch.maximum(self.top_max_indices.max(), self.top_min_indices.max()))
        for name, largest in (("max", True), ("min", False)):
            run_v, run_i = getattr(self, f"top_{name}_values"), getattr(self, f"top_{name}_indices")
            if streaming:
                _insert_streaming(run_v, run_i, vals, indices, largest)
            else:
                idx = indices.view(1, 1, nb).expand(*self.shape, nb)
                run_v, run_i = _select(torch.cat([run_v, vals], -1), torch.cat([run_i, idx], -1), self.k, largest)
                setattr(self, f"top_{name}_values", run_v)
                setattr(self, f"top_{name}_indices", run_i)

    def _merge_moments(self, other: dict) -> None:
        """Chan et al.'s pairwise merge of (count, mean, co-moments) with another set of moments."""
        na, nb = self.count, other["count"]
        n = na + nb
        if nb == 0:
            return
        delta = other["mean"] - self.mean                                        # (H, C)
        w = na * nb / n
        dh = self._head_of(delta[None])[0]                                       # (H, D)
        self.mean = self.mean + delta * (nb / n)
        self.neuron_comoment = self.neuron_comoment + other["neuron_comoment"] + \
            w * torch.einsum("hn,gn->nhg", delta, delta)
        self.head_sq = self.head_sq + other["head_sq"] + w * (dh * dh).sum(dim=-1)
        if self.head_comoment is not None:
            self.head_comoment = self.head_comoment + other["head_comoment"] + w * torch.einsum("hd,he->hde", dh, dh)
        self.count = n

    def merge(self, other: "DatasetStats", index_offset: Optional[int] = None) -> "DatasetStats":
        """Combine with statistics of disjoint samples (same model, k, options), in place; returns self.

        Args:
            other: statistics of other images.
            index_offset: added to ``other``'s sample indices. Two separate ``collect`` runs both number their
                samples from 0; pass ``index_offset=self.count`` to merge them. Without it, overlapping sample
                indices raise (the top-k lists identify samples by index, so they would be mixed up).
        """
        self._check_compatible(other.meta.get("model", {}), other.k, other.head_comoment is not None)
        other_max, other_min = other.top_max_indices, other.top_min_indices
        if index_offset is not None:
            other_max = torch.where(other_max >= 0, other_max + int(index_offset), other_max)
            other_min = torch.where(other_min >= 0, other_min + int(index_offset), other_min)
        mine = torch.cat([self.top_max_indices.flatten(), self.top_min_indices.flatten()]).unique()
        theirs = torch.cat([other_max.flatten(), other_min.flatten()]).unique().to(mine.device)
        shared = mine[(mine >= 0) & torch.isin(mine, theirs)]
        if shared.numel():
            raise ValueError(f"both statistics hold samples numbered {shared[:5].tolist()}...: they must describe "
                             "disjoint samples with distinct indices. Two separate collect() runs both count from "
                             f"0: pass index_offset={self.count} (this object's sample count) to renumber the other")
        like = self.mean
        self._merge_moments(dict(count=other.count, mean=other.mean.to(like), head_sq=other.head_sq.to(like),
                                 neuron_comoment=other.neuron_comoment.to(like),
                                 head_comoment=None if other.head_comoment is None else other.head_comoment.to(like)))
        dev = self.mean.device
        self.top_max_values, self.top_max_indices = _select(
            torch.cat([self.top_max_values, other.top_max_values.to(dev)], -1),
            torch.cat([self.top_max_indices, other_max.to(dev)], -1), self.k, True)
        self.top_min_values, self.top_min_indices = _select(
            torch.cat([self.top_min_values, other.top_min_values.to(dev)], -1),
            torch.cat([self.top_min_indices, other_min.to(dev)], -1), self.k, False)
        return self

    def all_reduce(self, group=None) -> "DatasetStats":
        """Merge the statistics of every process of ``group`` exactly, in place (all ranks end equal).

        Means and co-moments: ``all_reduce`` SUM of float64 ``n_r m_r`` and of ``M_r + n_r d_r d_r^T``
        with ``d_r = m_r - m`` (the parallel-axis theorem); top-k lists: ``all_gather`` then re-selection."""
        import torch.distributed as dist
        world = dist.get_world_size(group)
        if world == 1:
            return self
        dev = self.mean.device
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=dev)
        dist.all_reduce(n, group=group)
        total = int(round(n.item()))
        if total == 0:
            raise ValueError("no process saw any image: the loader is empty")
        mean = self.mean * self.count
        dist.all_reduce(mean, group=group)
        mean = mean / total
        d = self.mean - mean
        dh = self._head_of(d[None])[0]
        com = self.neuron_comoment + self.count * torch.einsum("hn,gn->nhg", d, d)
        hsq = self.head_sq + self.count * (dh * dh).sum(dim=-1)
        for t in (com, hsq):
            dist.all_reduce(t, group=group)
        if self.head_comoment is not None:
            hcom = self.head_comoment + self.count * torch.einsum("hd,he->hde", dh, dh)
            dist.all_reduce(hcom, group=group)
            self.head_comoment = hcom
        self.count, self.mean, self.neuron_comoment, self.head_sq = total, mean, com, hsq
        for name, largest in (("max", True), ("min", False)):
            vals, idx = getattr(self, f"top_{name}_values"), getattr(self, f"top_{name}_indices")
            gv = [torch.empty_like(vals) for _ in range(world)]
            gi = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(gv, vals.contiguous(), group=group)
            dist.all_gather(gi, idx.contiguous(), group=group)
            vals, idx = _select(torch.cat(gv, -1), torch.cat(gi, -1), self.k, largest)
            setattr(self, f"top_{name}_values", vals)
            setattr(self, f"top_{name}_indices", idx)
        return self

    # ---- statistics -----------------------------------------------------------------------------------
    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no image has been accumulated yet")

    @property
    def pair_mean(self) -> Tensor:
        """(H, C) mean of s."""
        self._require_data()
        return self.mean

    @property
    def pair_var(self) -> Tensor:
        """(H, C) population variance of s (divided by n, like ``numpy.var``)."""
        self._require_data()
        return torch.diagonal(self.neuron_comoment, dim1=-2, dim2=-1).T / self.count

    @property
    def neuron_covariance(self) -> Tensor:
        """(C, H, H) population covariance of ``s[:, :, n]`` per neuron."""
        self._require_data()
        return self.neuron_comoment / self.count

    @property
    def head_covariance(self) -> Tensor:
        """(H, D, D) population covariance of each head's contribution ``W_o^h W_v^h s_h``.

        TextSpan of head h over the dataset: ``nha_plugin.text.text_span(covariance=stats.head_covariance[h],
        mean=stats.head_mean[h], text_embeddings=..., texts=...)``."""
        self._require_data()
        if self.head_comoment is None:
            raise RuntimeError("head covariances were not collected: pass head_covariance=True to collect()")
        return self.head_comoment / self.count

    @property
    def head_mean(self) -> Tensor:
        """(H, D) mean contribution of each head (without bias)."""
        self._require_data()
        return self._head_of(self.mean[None])[0]

    @property
    def mean_embedding(self) -> Tensor:
        """(D,) the dataset mean of the image embedding, ``beta + sum_{h,n} mean(s)[h,n] u[h,n]``."""
        return constant_term(self._need_spec("the mean embedding")).to(self.mean) + self.head_mean.sum(dim=0)

    def top_deviations(self) -> TopDeviations:
        """The k largest ``|s - mean|`` per pair, resolved from the stored k largest and k smallest s."""
        self._require_data()
        kk = min(self.k, self.count)
        vals = torch.cat([self.top_max_values, self.top_min_values], -1)
        idx = torch.cat([self.top_max_indices, self.top_min_indices], -1)
        order = idx.argsort(dim=-1, stable=True)
        vals, idx = vals.gather(-1, order), idx.gather(-1, order)
        # with fewer than 2k samples a sample can sit in both lists: keep one copy
        drop = idx < 0
        drop[..., 1:] |= idx[..., 1:] == idx[..., :-1]
        dev = (vals - self.mean[..., None]).abs().masked_fill(drop, -1.0)
        # entries are in index order, so a stable sort breaks ties by the smaller index
        order = dev.argsort(dim=-1, descending=True, stable=True)[..., :kk]
        return TopDeviations(dev.gather(-1, order), vals.gather(-1, order), idx.gather(-1, order))

    @property
    def pc0_sign(self) -> Tensor:
        """(H, C) int64 of +-1: the pair's PC0 is ``sign * u / ||u||``.

        The paper's recipe (centre, top-k centred norms, first singular vector, flip unless more than k/2
        of the top k project positively) with exact directions: +1 when more than half of the top-k samples
        have s above the mean (:func:`nha_plugin.pool.pc_sign`; an exact tie gives -1)."""
        top = self.top_deviations()
        return pc_sign(top.coefficients - self.mean[..., None])

    @property
    def importance(self) -> Tensor:
        """(H, C) the paper's pair importance: the mean of the top-k centred contribution norms,
        ``mean(top-k |s - mean|) * ||u||``."""
        return self.top_deviations().deviations.mean(dim=-1) * self.direction_norms.to(self.mean)

    @property
    def head_importance(self) -> Tensor:
        """(H,) root-mean-square norm of each head's centred contribution, ``sqrt(trace Cov(c_h))``.

        The one-pass analogue of the pair importance for vector-valued units (their top-k centred norms
        would need the mean before the pass)."""
        self._require_data()
        return (self.head_sq / self.count).sqrt()

    @property
    def neuron_importance(self) -> Tensor:
        """(C,) root-mean-square norm of each neuron's centred contribution, ``sqrt(trace(U_n Cov_n U_n^T))``."""
        return self.neuron_pcs(1).total_variance.clamp_min(0).sqrt()

    def pc0_directions(self) -> Tensor:
        """(H, C, D) each pair's PC0, ``pc0_sign * u / ||u||`` (builds the direction table: small models)."""
        u = pair_directions(self._need_spec("PC0 directions")).to(self.mean)
        return self.pc0_sign[..., None] * u / u.norm(dim=-1, keepdim=True)

    def neuron_pcs(self, n_components: int = 1) -> NeuronPCs:
        """Exact top principal components of each neuron's contribution ``c_n = U_n s[:, n]`` (D,).

        Its covariance is ``U_n Cov_n U_n^T``; with ``U_n = Q R`` (reduced QR, Q (D, K), K = min(D, H)) its
        eigenvectors are ``Q W`` where ``R Cov_n R^T = W diag(lambda) W^T`` is a K x K problem: no D x D
        matrix is formed. Neurons are processed in chunks of 256."""
        spec = self._need_spec("neuron PCs")
        self._require_data()
        H, C = self.shape
        kmax = min(H, spec.output_dim)
        if not 1 <= n_components <= kmax:
            raise ValueError(f"n_components must be between 1 and min(H, D) = {kmax}; got {n_components}")
        cov = self.neuron_covariance
        comps, variances, means, totals = [], [], [], []
        for start in range(0, C, _NEURON_CHUNK):
            sl = slice(start, min(C, start + _NEURON_CHUNK))
            U = neuron_blocks(spec, sl).to(cov.device)                                  # (c, D, H)
            Q, R = torch.linalg.qr(U)
            small = R @ cov[sl] @ R.transpose(1, 2)
            small = (small + small.transpose(1, 2)) / 2
            lam, W = torch.linalg.eigh(small)                                          # ascending
            lam, W = lam.flip(-1)[:, :n_components], W.flip(-1)[..., :n_components]
            P = Q @ W                                                                  # (c, D, K)
            mu = torch.einsum("cDh,hc->cD", U, self.mean[:, sl])
            sign = torch.where(torch.einsum("cDk,cD->ck", P, mu) < 0, -1.0, 1.0).to(P)
            comps.append((P * sign[:, None, :]).transpose(1, 2))
            variances.append(lam.clamp_min(0))
            means.append(mu)
            totals.append(torch.diagonal(small, dim1=-2, dim2=-1).sum(-1))
        return NeuronPCs(torch.cat(comps), torch.cat(variances), torch.cat(means), torch.cat(totals))

    # ---- persistence ----------------------------------------------------------------------------------
    def _tensors(self) -> dict:
        out = {"mean": self.mean, "neuron_comoment": self.neuron_comoment, "head_sq": self.head_sq,
               "top_max_values": self.top_max_values, "top_max_indices": self.top_max_indices,
               "top_min_values": self.top_min_values, "top_min_indices": self.top_min_indices,
               "direction_norms": self.direction_norms}
        if self.head_comoment is not None:
            out["head_comoment"] = self.head_comoment
        return out

    def save(self, path: Union[str, Path], **meta: Any) -> Path:
        """Write the statistics atomically to a safetensors file (tensors + JSON metadata incl. the model's
        identity). Extra keyword arguments are stored in the metadata (JSON-able values)."""
        path = Path(path)
        full = dict(self.meta, **meta, count=self.count, format_version=FORMAT_VERSION,
                    head_covariance=self.head_comoment is not None)
        _atomic_save(self._tensors(), full, path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model=None, *, device: Union[str, torch.device] = "cpu") -> "DatasetStats":
        """Read statistics written by :meth:`save` (or a checkpoint of :func:`collect`).

        Args:
            path: the safetensors file.
            model: optional CLIP-ResNet (or spec) the statistics are for: checked against the stored
                identity (a :class:`StatsMismatchError` if it differs) and kept for the properties that
                need weights.
            device: where to put the tensors.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} not found; create it with `nha stats --out {path}` "
                                    "or nha_plugin.stats.collect(...).save(path)")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("nha_stats")
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not nha statistics (no 'nha_stats' metadata)")
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has statistics format {meta.get('format_version')}; this version reads "
                             f"{FORMAT_VERSION}: collect them again")
        t = load_file(str(path), device=str(device))
        stats = cls(count=meta.pop("count"), mean=t["mean"], neuron_comoment=t["neuron_comoment"],
                    head_sq=t["head_sq"], head_comoment=t.get("head_comoment"),
                    top_max_values=t["top_max_values"], top_max_indices=t["top_max_indices"],
                    top_min_values=t["top_min_values"], top_min_indices=t["top_min_indices"],
                    direction_norms=t["direction_norms"], meta=meta)
        meta.pop("format_version", None)
        meta.pop("head_covariance", None)
        if model is not None:
            stats.attach(model)
        return stats

    def attach(self, model) -> "DatasetStats":
        """Check that ``model`` (a CLIP-ResNet or spec) is the one the statistics were collected on and keep
        its spec for the properties that need weights. Returns self."""
        spec = _as_spec(model)
        self._check_compatible(_model_identity(spec))
        self.spec = spec.detached()
        return self

    def _check_compatible(self, identity: dict, k: Optional[int] = None, head_cov: Optional[bool] = None) -> None:
        mine = self.meta.get("model", {})
        keys = ("num_heads", "num_neurons", "output_dim", "fingerprint")
        if any(mine.get(key) != identity.get(key) for key in keys):
            def show(d):
                return (f"H={d.get('num_heads')}, C={d.get('num_neurons')}, D={d.get('output_dim')}, "
                        f"source {d.get('source')!r}, weights {str(d.get('fingerprint'))[:12]}")
            raise StatsMismatchError(
                f"these statistics were collected on another model ({show(mine)}); this model is {show(identity)}. "
                "Collect the statistics again for this model (nha stats / nha_plugin.stats.collect)")
        if k is not None and k != self.k:
            raise StatsMismatchError(f"top-k lengths differ: {self.k} vs {k}")
        if head_cov is not None and head_cov != (self.head_comoment is not None):
            raise StatsMismatchError("one set of statistics has head covariances and the other not")

    def __repr__(self) -> str:
        H, C = self.shape
        source = self.meta.get("model", {}).get("source")
        return (f"DatasetStats(count={self.count}, H={H}, C={C}, k={self.k}, "
                f"head_covariance={self.head_comoment is not None}, model={source!r})")


def _as_spec(model) -> AttentionPoolSpec:
    if isinstance(model, AttentionPoolSpec):
        return model
    from .adapters import get_spec
    return get_spec(model)


# ---- the pass ----------------------------------------------------------------------------------------------
def _first(item):
    """An image tensor from a dataset item or a batch: the tensor itself or the first entry of a tuple/dict."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, dict):
        for key in ("image", "images", "pixel_values"):
            if isinstance(item.get(key), Tensor):
                return item[key]
    raise TypeError(f"expected image tensors, (images, labels) tuples or dicts with an 'image' tensor; got "
                    f"{type(item).__name__}. Apply the model's preprocess in the dataset")


def _stack_images(items: list) -> Tensor:
    return torch.stack([_first(x) for x in items])


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_path(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def _dataset_batches(dataset, batch_size: int, rank: int, world: int, start_batch: int, num_workers: int):
    """(indices, images) batches of this rank's shard ``rank::world`` from batch ``start_batch`` on."""
    from torch.utils.data import DataLoader, Subset
    shard = list(range(rank, len(dataset), world))
    rest = shard[start_batch * batch_size:]
    if not rest:
        return
    loader = DataLoader(Subset(dataset, rest), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_stack_images)
    for b, images in enumerate(loader):
        yield torch.tensor(rest[b * batch_size:b * batch_size + images.shape[0]]), images


def _stream_batches(loader: Iterable, rank: int, world: int, start_batch: int, start_sample: int, state: dict):
    """(indices, images) for the stream batches ``rank, rank + world, ...`` at or after ``start_batch``;
    ``state`` tracks the stream position (batches, samples) fully accounted for."""
    position = start_sample
    for b, batch in enumerate(loader):
        if b < start_batch:
            continue
        images = _first(batch)
        indices = torch.arange(position, position + images.shape[0])
        position += images.shape[0]
        # advanced before the batch is processed: a checkpoint is only written after processing
        state["batches"], state["samples"] = b + 1, position
        if b % world == rank:
            yield indices, images


def collect(model, loader, *, batch_size: Optional[int] = None, k: int = 50,
            head_covariance: Optional[bool] = None, checkpoint: Union[str, Path, None] = None,
            checkpoint_every: int = 50, resume: bool = False, progress: bool = True, num_workers: int = 0,
            meta: Optional[dict] = None) -> DatasetStats:
    """One streaming pass over images that collects :class:`DatasetStats` of the pair coefficients.

    Args:
        model: a CLIP-ResNet (open_clip / OpenAI / timm, whole model or image tower) or its spec.
        loader: an iterable of image batches (B, 3, S, S) or of (images, labels, ...) tuples, e.g. a
            ``DataLoader``; or, with ``batch_size``, a map-style ``Dataset`` whose items are image tensors
            (3, S, S) or (image, label) tuples. Images must be preprocessed; they are moved to the model's
            device and dtype.
        batch_size: set when ``loader`` is a Dataset (then sharded by index under torch.distributed).
        k: length of the per-pair top-k lists (the paper uses 50).
        head_covariance: keep the (H, D, D) head co-moments; None: only when H * D * D <= 2**24.
        checkpoint: file for periodic atomic checkpoints of the accumulators (one per process under
            torch.distributed: ``NAME.rank{r}-of-{W}.safetensors``). Left in place at the end (marked
            complete), so a resumed finished run returns at once.
        checkpoint_every: batches (of this process) between checkpoints.
        resume: continue from ``checkpoint`` if it exists, skipping the batches it consumed. The loader must
            yield the same batches in the same order as before (a deterministic loader).
        progress: tqdm progress bar (rank 0 only).
        num_workers: DataLoader workers when ``loader`` is a Dataset.
        meta: JSON-able fields stored with the statistics (e.g. a description of the data). Its ``"data"`` entry
            (or the whole dict) identifies the data: resuming a checkpoint written for other data raises
            :class:`StatsMismatchError` instead of mixing the two.

    Returns:
        :class:`DatasetStats`, merged over all processes when torch.distributed is initialised.
    """
    from tqdm.auto import tqdm

    from .models import decompose
    spec = _as_spec(model).detached()
    rank, world = _dist_info()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1; got {checkpoint_every}")
    is_dataset = batch_size is not None
    if is_dataset:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if not (hasattr(loader, "__getitem__") and hasattr(loader, "__len__")):
            raise TypeError(f"batch_size was given, so loader must be a map-style Dataset (__getitem__ and __len__); "
                            f"got {type(loader).__name__}. Pass an iterable of batches without batch_size instead")
    run = {"mode": "dataset" if is_dataset else "iterable", "world_size": world, "rank": rank,
           "batch_size": batch_size, "dataset_len": len(loader) if is_dataset else None,
           "data": json.loads(json.dumps((meta or {}).get("data", meta or {}), default=str))}
    path = _rank_path(Path(checkpoint), rank, world) if checkpoint is not None else None
    stats, state = None, {"batches": 0, "samples": 0, "complete": False}
    if resume and path is not None and path.is_file():
        stats = DatasetStats.load(path, device=spec.device)
        stats.attach(spec)
        if stats.k != k or (head_covariance is not None and head_covariance != (stats.head_comoment is not None)):
            raise StatsMismatchError(f"checkpoint {path} was written with k={stats.k}, head_covariance="
                                     f"{stats.head_comoment is not None}; this run asks for k={k}, head_covariance="
                                     f"{head_covariance}. Use the same settings or resume=False to start over")
        saved = stats.meta.get("run", {})
        if any(saved.get(key) != run[key] for key in ("mode", "world_size", "rank", "batch_size", "dataset_len",
                                                      "data")):
            raise StatsMismatchError(f"checkpoint {path} belongs to another run ({saved}); this run is {run}. "
                                     "Resume with the same loader, data description (meta), batch size and number "
                                     "of processes, or pass resume=False to start over")
        state.update(stats.meta.get("state", {}))
    if stats is None:
        stats = DatasetStats.empty(spec, k=k, head_covariance=head_covariance)
    stats.meta["run"] = run
    if meta:
        stats.meta.update(meta)

    def save_checkpoint() -> None:
        if path is not None:
            stats.meta["state"] = dict(state)
            stats.save(path)

    if is_dataset:
        per_rank = len(range(rank, len(loader), world))
        total = math.ceil(per_rank / batch_size)
        batches = _dataset_batches(loader, batch_size, rank, world, state["batches"], num_workers)
    else:
        total = math.ceil(len(loader) / world) if hasattr(loader, "__len__") else None
        batches = _stream_batches(loader, rank, world, state["batches"], state["samples"], state)
    done_here = state["batches"] if is_dataset else math.ceil(max(0, state["batches"] - rank) / world)
    if not state["complete"]:
        bar = tqdm(total=total, initial=done_here, desc="dataset statistics", unit="batch",
                   disable=not progress or rank != 0)
        since = 0
        for indices, images in batches:
            images = images.to(spec.device, spec.dtype)
            stats.update(decompose(spec, images).pair_coefficients, indices)
            if is_dataset:
                state["batches"] += 1
                state["samples"] += images.shape[0]
            since += 1
            bar.update(1)
            if since >= checkpoint_every:
                save_checkpoint()
                since = 0
        bar.close()
        state["complete"] = True
        save_checkpoint()
    stats.meta["state"] = dict(state)
    if world > 1:
        stats.all_reduce()
    if stats.count == 0:
        raise ValueError("the loader yielded no images")
    return stats
