"""Per-pair top-k lists of the statistics: deterministic selection, streaming insertion and the top-k centred
deviations resolved from the k largest and k smallest coefficients.

Every selection breaks ties by the smaller sample index, so any batching, merge order or process count picks
the same samples.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["TopDeviations", "select_topk", "insert_streaming", "top_deviations"]


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


def select_topk(values: Sequence[Tensor], indices: Sequence[Tensor], k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k best entries of several lists joined along the last axis, ties broken by the smaller index.

    Args:
        values: tensors (..., n_i) on one device, joined along the last axis.
        indices: matching int64 sample indices (..., n_i).
        k: how many to keep.
        largest: keep the largest values (else the smallest).

    Returns:
        ``(values, indices)``, each (..., k), best first.
    """
    values, indices = torch.cat(list(values), -1), torch.cat(list(indices), -1)
    order = indices.argsort(dim=-1, stable=True)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    order = values.argsort(dim=-1, descending=largest, stable=True)[..., :k]
    return values.gather(-1, order), indices.gather(-1, order)


def insert_streaming(run_values: Tensor, run_indices: Tensor, values: Tensor, indices: Tensor,
                     largest: bool) -> None:
    """Merge a batch into sorted top-k lists in place, when the batch follows every listed sample.

    Valid when every batch index exceeds every listed index and the batch is in index order: a single
    stable sort of [list, batch] then keeps the tie rule, and only the rows where some batch value beats the
    list's last entry need sorting (a tie with it loses on the index): after the first few batches, few do.

    Args:
        run_values: (..., k) the lists, best first; updated in place.
        run_indices: (..., k) their sample indices; updated in place.
        values: (..., B) the batch's values.
        indices: (B,) the batch's sample indices, increasing.
        largest: the lists keep the largest values (else the smallest).
    """
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


def top_deviations(max_values: Tensor, max_indices: Tensor, min_values: Tensor, min_indices: Tensor,
                   mean: Tensor, k: int) -> TopDeviations:
    """The k largest ``|s - mean|`` per pair from the k largest and k smallest s (they lie among those 2k).

    Args:
        max_values, max_indices: (H, C, K) the K largest s and their sample indices (-1: unfilled).
        min_values, min_indices: (H, C, K) the K smallest.
        mean: (H, C) the mean of s.
        k: how many to return, at most K and at most the number of samples.

    Returns:
        :class:`TopDeviations` of (H, C, k) tensors.
    """
    vals = torch.cat([max_values, min_values], -1)
    idx = torch.cat([max_indices, min_indices], -1)
    order = idx.argsort(dim=-1, stable=True)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    # with fewer than 2K samples a sample can sit in both lists: keep one copy
    drop = idx < 0
    drop[..., 1:] |= idx[..., 1:] == idx[..., :-1]
    dev = (vals - mean[..., None]).abs().masked_fill(drop, -1.0)
    # entries are in index order, so a stable sort breaks ties by the smaller index
    order = dev.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return TopDeviations(dev.gather(-1, order), vals.gather(-1, order), idx.gather(-1, order))
