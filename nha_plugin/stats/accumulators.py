"""The accumulators: :class:`DatasetStats`, streaming moments and top-k lists of the pair coefficients.

Moments are merged with Chan et al.'s pairwise formulas (each batch centred on its own mean first, so no large
sums of squares cancel), across processes with the parallel-axis correction; top-k lists through
:mod:`nha_plugin.stats.topk`. Files go through :mod:`nha_plugin.files` (atomic, a sha256 per tensor).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..files import CorruptFileError, jsonable, load_tensors, save_tensors
from ..pool import constant_term, head_outputs, pair_directions, pair_norms, pc_sign
from ..spec import AttentionPoolSpec
from .identity import FORMAT_VERSION, StatsMismatchError, as_spec, check_model, model_identity
from .pcs import NeuronPCs, neuron_pcs
from .topk import TopDeviations, insert_streaming, select_topk, top_deviations

__all__ = ["DatasetStats", "HEAD_COVARIANCE_AUTO_LIMIT", "default_head_covariance"]

# auto mode keeps the (H, D, D) head co-moments when they take at most this many float64 entries (128 MiB)
HEAD_COVARIANCE_AUTO_LIMIT = 2 ** 24
_META_KEY = "nha_stats"
_EXPECTED = "nha statistics (DatasetStats.save, nha stats)"


def default_head_covariance(spec: AttentionPoolSpec) -> bool:
    """Whether the auto setting keeps the (H, D, D) head co-moments: when H * D * D <= 2**24 (scenes-rn:
    yes; RN50, RN50x16: no)."""
    return spec.num_heads * spec.output_dim ** 2 <= HEAD_COVARIANCE_AUTO_LIMIT


# ---- the statistics ----------------------------------------------------------------------------------------
class DatasetStats:
    """Streaming statistics of the pair coefficients s (B, H, C) of one CLIP-ResNet over a dataset.

    Build with :func:`nha_plugin.stats.collect` (or :meth:`empty` + :meth:`update`); save with :meth:`save`,
    read back with :meth:`load`. Properties that need the model's weights (neuron PCs, head means, the mean embedding)
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
        meta: JSON-able metadata (model identity, run key and state, user fields).
        spec: the model's spec (detached) for the properties that need weights, or None.
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
        """Zeroed accumulators.

        Args:
            spec: the model's spec.
            k: length of the per-pair top-k lists (at least 1).
            head_covariance: keep the (H, D, D) head co-moments; None: :func:`default_head_covariance`.
            device: where the accumulators live (default: the spec's device).

        Returns:
            Statistics of no image.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
        if head_covariance is None:
            head_covariance = default_head_covariance(spec)
        dev = torch.device(device) if device is not None else spec.device
        f64 = dict(dtype=torch.float64, device=dev)
        return cls(count=0, mean=torch.zeros(H, C, **f64), neuron_comoment=torch.zeros(C, H, H, **f64),
                   head_sq=torch.zeros(H, **f64),
                   head_comoment=torch.zeros(H, D, D, **f64) if head_covariance else None,
                   top_max_values=torch.full((H, C, k), -math.inf, **f64),
                   top_max_indices=torch.full((H, C, k), -1, dtype=torch.long, device=dev),
                   top_min_values=torch.full((H, C, k), math.inf, **f64),
                   top_min_indices=torch.full((H, C, k), -1, dtype=torch.long, device=dev),
                   direction_norms=pair_norms(spec.detached()).to(**f64), meta={"model": model_identity(spec), "k": k},
                   spec=spec)

    @property
    def k(self) -> int:
        """Length of the per-pair top-k lists."""
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

    def _lists(self) -> list[tuple[str, bool, Tensor, Tensor]]:
        """``(name, largest, values, indices)`` of the two top-k lists (the k largest, the k smallest)."""
        return [(name, largest, getattr(self, f"top_{name}_values"), getattr(self, f"top_{name}_indices"))
                for name, largest in (("max", True), ("min", False))]

    def _set_list(self, name: str, values_indices: tuple[Tensor, Tensor]) -> None:
        setattr(self, f"top_{name}_values", values_indices[0])
        setattr(self, f"top_{name}_indices", values_indices[1])

    # ---- accumulation ---------------------------------------------------------------------------------
    def update(self, coefficients: Tensor, indices: Tensor) -> None:
        """Add a batch, in place.

        Args:
            coefficients: pair coefficients s (B, H, C) of the batch's images (any float dtype and device).
            indices: (B,) int64 sample indices, distinct, >= 0, not seen before.
        """
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
        for name, largest, run_v, run_i in self._lists():
            if streaming:
                insert_streaming(run_v, run_i, vals, indices, largest)
            else:
                idx = indices.view(1, 1, nb).expand(*self.shape, nb)
                self._set_list(name, select_topk([run_v, vals], [run_i, idx], self.k, largest))

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
        """Combine with statistics of disjoint samples (same model, k, options), in place.

        Args:
            other: statistics of other images.
            index_offset: added to ``other``'s sample indices. Two separate ``collect`` runs both number their
                samples from 0; pass ``index_offset=self.count`` to merge them. Without it, overlapping sample
                indices raise (the top-k lists identify samples by index, so they would be mixed up).

        Returns:
            self.
        """
        self._check_compatible(other)
        dev = self.mean.device
        theirs = {name: (values.to(dev), indices.to(dev) if index_offset is None else
                         torch.where(indices >= 0, indices + int(index_offset), indices).to(dev))
                  for name, _, values, indices in other._lists()}
        mine = torch.cat([self.top_max_indices.flatten(), self.top_min_indices.flatten()]).unique()
        other_samples = torch.cat([theirs["max"][1].flatten(), theirs["min"][1].flatten()]).unique()
        shared = mine[(mine >= 0) & torch.isin(mine, other_samples)]
        if shared.numel():
            raise ValueError(f"both statistics hold samples numbered {shared[:5].tolist()}...: they must describe "
                             "disjoint samples with distinct indices. Two separate collect() runs both count from "
                             f"0: pass index_offset={self.count} (this object's sample count) to renumber the other")
        like = self.mean
        self._merge_moments(dict(count=other.count, mean=other.mean.to(like), head_sq=other.head_sq.to(like),
                                 neuron_comoment=other.neuron_comoment.to(like),
                                 head_comoment=None if other.head_comoment is None else other.head_comoment.to(like)))
        for name, largest, values, indices in self._lists():
            self._set_list(name, select_topk([values, theirs[name][0]], [indices, theirs[name][1]], self.k, largest))
        return self

    def all_reduce(self, group=None) -> "DatasetStats":
        """Merge the statistics of every process of ``group`` exactly, in place (all ranks end equal).

        Means and co-moments: ``all_reduce`` SUM of float64 ``n_r m_r`` and of ``M_r + n_r d_r d_r^T``
        with ``d_r = m_r - m`` (the parallel-axis theorem); top-k lists: ``all_gather`` then re-selection.

        Args:
            group: the ``torch.distributed`` process group (None: the default group).

        Returns:
            self.
        """
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
        for name, largest, vals, idx in self._lists():
            gv = [torch.empty_like(vals) for _ in range(world)]
            gi = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(gv, vals.contiguous(), group=group)
            dist.all_gather(gi, idx.contiguous(), group=group)
            self._set_list(name, select_topk(gv, gi, self.k, largest))
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
        """The k largest ``|s - mean|`` per pair (:func:`nha_plugin.stats.topk.top_deviations`), (H, C, k')
        tensors with k' = min(k, count)."""
        self._require_data()
        return top_deviations(self.top_max_values, self.top_max_indices, self.top_min_values, self.top_min_indices,
                              self.mean, min(self.k, self.count))

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
        """Exact top principal components of each neuron's contribution ``c_n = U_n s[:, n]`` (D,), from the
        (C, H, H) covariances alone (:func:`nha_plugin.stats.pcs.neuron_pcs`).

        Args:
            n_components: K, between 1 and min(H, D).

        Returns:
            :class:`NeuronPCs` with (C, K, D) components.
        """
        return neuron_pcs(self._need_spec("neuron PCs"), self.neuron_covariance, self.pair_mean, n_components)

    # ---- persistence ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The accumulators by name, as :meth:`save` stores them (``head_comoment`` only when collected)."""
        out = {"mean": self.mean, "neuron_comoment": self.neuron_comoment, "head_sq": self.head_sq,
               "top_max_values": self.top_max_values, "top_max_indices": self.top_max_indices,
               "top_min_values": self.top_min_values, "top_min_indices": self.top_min_indices,
               "direction_norms": self.direction_norms}
        if self.head_comoment is not None:
            out["head_comoment"] = self.head_comoment
        return out

    def clone(self) -> "DatasetStats":
        """An independent copy (tensors and metadata copied; the spec shared, it is read-only here)."""
        t = {name: v.clone() for name, v in self.state_tensors().items()}
        return DatasetStats(count=self.count, head_comoment=t.pop("head_comoment", None), meta=copy.deepcopy(self.meta),
                            spec=self.spec, **t)

    def save(self, path: Union[str, Path], **meta: Any) -> Path:
        """Write the statistics atomically to a checksummed safetensors file (:func:`nha_plugin.files.save_tensors`).

        Args:
            path: the file (``.safetensors`` by convention).
            **meta: JSON-able fields stored with the statistics' metadata (model identity, run key, ...).

        Returns:
            The path.
        """
        full = dict(self.meta, **meta, count=self.count, format_version=FORMAT_VERSION,
                    head_covariance=self.head_comoment is not None)
        return save_tensors(path, self.state_tensors(), {_META_KEY: json.dumps(full, default=jsonable)})

    @classmethod
    def load(cls, path: Union[str, Path], model=None, *, device: Union[str, torch.device] = "cpu") -> "DatasetStats":
        """Read statistics written by :meth:`save` (or a checkpoint of :func:`nha_plugin.stats.collect`).

        Nothing is unpickled: a file that is not safetensors (a planted pickle, a torch.save file) is refused.

        Args:
            path: the safetensors file.
            model: optional CLIP-ResNet (or spec) the statistics are for: checked against the stored
                identity and kept for the properties that need weights.
            device: where to put the tensors.

        Returns:
            The statistics.

        Raises:
            FileNotFoundError: no such file.
            nha_plugin.files.CorruptFileError: truncated, corrupted (checksum), not safetensors or not statistics.
            StatsMismatchError: another format version, or ``model`` is not the statistics' model.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} not found; create it with `nha stats --out {path}` "
                                    "or nha_plugin.stats.collect(...).save(path)")
        t, header = load_tensors(path, device)
        count, meta = _read_meta(path, header)
        missing = [name for name in _REQUIRED if name not in t]
        if missing:
            raise CorruptFileError(path, f"no tensor {missing[0]!r}", _EXPECTED)
        stats = cls(count=count, head_comoment=t.pop("head_comoment", None), meta=meta,
                    **{name: t[name] for name in _REQUIRED})
        if model is not None:
            stats.attach(model)
        return stats

    def attach(self, model) -> "DatasetStats":
        """Check that ``model`` (a CLIP-ResNet or spec) is the one the statistics were collected on and keep
        its spec for the properties that need weights.

        Returns:
            self.

        Raises:
            StatsMismatchError: another model (weights fingerprint, H, C or D differ).
        """
        spec = as_spec(model)
        check_model(self.meta.get("model", {}), model_identity(spec))
        self.spec = spec.detached()
        return self

    def _check_compatible(self, other: "DatasetStats") -> None:
        check_model(self.meta.get("model", {}), other.meta.get("model", {}))
        if other.k != self.k:
            raise StatsMismatchError(f"top-k lengths differ: {self.k} vs {other.k}; merge statistics collected "
                                     "with the same k")
        if (other.head_comoment is None) != (self.head_comoment is None):
            raise StatsMismatchError("one set of statistics has head covariances and the other not; merge "
                                     "statistics collected with the same head_covariance setting")

    def __repr__(self) -> str:
        H, C = self.shape
        source = self.meta.get("model", {}).get("source")
        return (f"DatasetStats(count={self.count}, H={H}, C={C}, k={self.k}, "
                f"head_covariance={self.head_comoment is not None}, model={source!r})")


_REQUIRED = ("mean", "neuron_comoment", "head_sq", "top_max_values", "top_max_indices", "top_min_values",
             "top_min_indices", "direction_norms")


def _read_meta(path: Path, header: dict) -> tuple[int, dict]:
    """The sample count and the remaining metadata of a statistics file's header, checked for its format."""
    try:
        meta = json.loads(header[_META_KEY])
        count = int(meta["count"])
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(path, f"no statistics metadata ({_META_KEY!r} with a count) in its header",
                               _EXPECTED) from e
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise StatsMismatchError(
            f"{path} holds statistics of format {version}; this version of nha_plugin reads format {FORMAT_VERSION} "
            "(checksummed files, another weights fingerprint) and cannot check the old file against a model. "
            "Collect them again: `nha stats --fresh --out FILE`, or nha_plugin.stats.collect(..., resume=False)")
    for key in ("count", "head_covariance"):
        meta.pop(key, None)
    return count, meta
