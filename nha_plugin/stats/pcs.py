"""Exact principal components of each neuron's contribution from the (C, H, H) covariances of its coefficients."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..pool import neuron_blocks
from ..spec import AttentionPoolSpec

__all__ = ["NeuronPCs", "NEURON_CHUNK", "neuron_pcs"]

# neurons per block where a (C', D, H) slice of the direction table is built: bounds memory on RN50x64-size pools
NEURON_CHUNK = 256


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


def neuron_pcs(spec: AttentionPoolSpec, covariance: Tensor, mean: Tensor, n_components: int = 1) -> NeuronPCs:
    """Exact top principal components of each neuron's contribution ``c_n = U_n s[:, n]`` (D,).

    Its covariance is ``U_n Cov_n U_n^T``; with ``U_n = Q R`` (reduced QR, Q (D, K), K = min(D, H)) its
    eigenvectors are ``Q W`` where ``R Cov_n R^T = W diag(lambda) W^T`` is a K x K problem: no D x D matrix is
    formed. Neurons are processed in blocks of :data:`NEURON_CHUNK`.

    Args:
        spec: the model's spec.
        covariance: (C, H, H) float64 covariance of ``s[:, :, n]`` per neuron.
        mean: (H, C) float64 mean of s.
        n_components: K, between 1 and min(H, D).

    Returns:
        :class:`NeuronPCs` with (C, K, D) components, on the covariance's device.
    """
    H, C = mean.shape
    kmax = min(H, spec.output_dim)
    if not 1 <= n_components <= kmax:
        raise ValueError(f"n_components must be between 1 and min(H, D) = {kmax}; got {n_components}")
    comps, variances, means, totals = [], [], [], []
    for start in range(0, C, NEURON_CHUNK):
        sl = slice(start, min(C, start + NEURON_CHUNK))
        U = neuron_blocks(spec, sl).to(covariance.device)                          # (c, D, H)
        Q, R = torch.linalg.qr(U)
        small = R @ covariance[sl] @ R.transpose(1, 2)
        small = (small + small.transpose(1, 2)) / 2
        lam, W = torch.linalg.eigh(small)                                          # ascending
        lam, W = lam.flip(-1)[:, :n_components], W.flip(-1)[..., :n_components]
        P = Q @ W                                                                  # (c, D, K)
        mu = torch.einsum("cDh,hc->cD", U, mean[:, sl])
        sign = torch.where(torch.einsum("cDk,cD->ck", P, mu) < 0, -1.0, 1.0).to(P)
        comps.append((P * sign[:, None, :]).transpose(1, 2))
        variances.append(lam.clamp_min(0))
        means.append(mu)
        totals.append(torch.diagonal(small, dim1=-2, dim2=-1).sum(-1))
    return NeuronPCs(torch.cat(comps), torch.cat(variances), torch.cat(means), torch.cat(totals))
