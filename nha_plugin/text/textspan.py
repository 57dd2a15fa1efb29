"""TextSpan (docs/methods.md §2): greedy text bases for a component's contributions.

Given a component's contributions C (K images x D) and text embeddings T (M x D), TextSpan projects T onto
the top-r right singular vectors of C, centres C, then m times: picks the text whose projections of C
have the largest variance, records it, and removes that text's direction from C and from every text.
The same greedy steps run on a covariance (D x D) streamed over a dataset, since the variance of C along
t is t^T Sigma t; pass the mean too to take the projection basis from the uncentred second moment, as the
data path does. Works for any component with a (K, D) contribution: attention-pool heads
(``Contributions.head_contributions()[:, h]``) now, CLIP-ViT heads later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["TextSpanResult", "text_span"]


@dataclass
class TextSpanResult:
    """Output of :func:`text_span`.

    Attributes:
        indices: (m,) int64 rows of the text pool, in the order picked.
        variances: (m,) variance (normalised by K) of the remaining contributions' projections on each picked
            text, at the step it was picked.
        texts: the picked texts when a pool was given, else None.
        reconstruction: (K, D) mean + projections of C on the picked directions (data input only).
    """

    indices: Tensor
    variances: Tensor
    texts: Optional[list[str]] = None
    reconstruction: Optional[Tensor] = None


def text_span(contributions: Optional[Tensor] = None, text_embeddings: Optional[Tensor] = None,
              texts: Optional[Sequence[str]] = None, m: int = 20, rank: int = 80, *,
              covariance: Optional[Tensor] = None, mean: Optional[Tensor] = None) -> TextSpanResult:
    """Greedy TextSpan decomposition of one component.

    Args:
        contributions: (K, D) the component's contribution to K images' embeddings. Or give ``covariance``.
        text_embeddings: (M, D) text embeddings of the pool (unit norm, no centring needed).
        texts: the M texts (optional; returned for the picked rows).
        m: texts to pick (m <= M).
        rank: r, the number of right singular vectors of C the texts are projected onto (capped at D).
        covariance: (D, D) covariance of the contributions, normalised by K (``torch.cov(c.T, correction=0)``),
            e.g. streamed over a dataset.
        mean: (D,) mean contribution; with ``covariance``, the projection basis comes from
            covariance + mean mean^T (the uncentred second moment), as with data.

    Returns:
        :class:`TextSpanResult`.
    """
    if (contributions is None) == (covariance is None):
        raise ValueError("give exactly one of contributions (K, D) or covariance (D, D)")
    if text_embeddings is None or text_embeddings.dim() != 2:
        raise ValueError("text_embeddings must be an (M, D) tensor")
    M, D = text_embeddings.shape
    if texts is not None and len(texts) != M:
        raise ValueError(f"{len(texts)} texts for {M} text embeddings")
    if not 1 <= m <= M:
        raise ValueError(f"m must be between 1 and the number of texts ({M}); got {m}")
    dtype = torch.float64 if text_embeddings.dtype == torch.float64 else torch.float32
    T = text_embeddings.to(dtype)
    r = min(rank, D)
    data = None
    if contributions is not None:
        if contributions.dim() != 2 or contributions.shape[1] != D:
            raise ValueError(f"contributions must be (K, {D}); got {tuple(contributions.shape)}")
        X = contributions.to(T.device, dtype)
        basis = torch.linalg.svd(X, full_matrices=False).Vh[:r]             # (r, D), from uncentred data
        mu = X.mean(dim=0)
        data = X - mu
        sigma = None
    else:
        if covariance.shape != (D, D):
            raise ValueError(f"covariance must be ({D}, {D}); got {tuple(covariance.shape)}")
        sigma = covariance.to(T.device, dtype)
        second = sigma if mean is None else sigma + torch.outer(mean.to(sigma), mean.to(sigma))
        evals, evecs = torch.linalg.eigh((second + second.T) / 2)
        basis = evecs[:, evals.argsort(descending=True)[:r]].T
    T = (T @ basis.T) @ basis                                             # project texts onto the span
    picked, variances = [], []
    recon = mu.expand_as(data).clone() if data is not None else None
    tiny = torch.finfo(dtype).tiny
    for _ in range(m):
        if data is not None:
            var = (data @ T.T).var(dim=0, correction=0)
        else:
            var = ((T @ sigma) * T).sum(dim=1)
        if picked:
            var[torch.tensor(picked, device=var.device)] = -1.0
        top = int(var.argmax())
        picked.append(top)
        variances.append(float(var[top]))
        t = T[top]
        tn = (t @ t).clamp_min(tiny)
        if data is not None:
            proj = (data @ t / tn)[:, None] * t
            recon += proj
            data = data - proj
        else:
            P = torch.eye(D, dtype=dtype, device=T.device) - torch.outer(t, t) / tn
            sigma = P @ sigma @ P
        T = T - (T @ t / tn)[:, None] * t
    return TextSpanResult(indices=torch.tensor(picked), variances=torch.tensor(variances, dtype=dtype),
                          texts=[texts[i] for i in picked] if texts is not None else None,
                          reconstruction=recon)
