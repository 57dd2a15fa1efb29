"""Batched orthogonal matching pursuit (OMP) and dictionary preprocessing.

:func:`sparse_decompose` writes each of B targets as a combination of exactly ``k`` dictionary atoms,
all targets at once. Per step it computes the correlations ``R @ A^T`` for the whole chunk of targets (one
matrix product, no N x N Gram matrix), picks each target's best unused atom, extends a per-target Cholesky
factor of the selected atoms' Gram matrix by one row, and re-solves the least-squares coefficients. This
is scikit-learn's ``orthogonal_mp(X, y, n_nonzero_coefs=k)`` (its Cholesky variant) with ``X = A^T``,
batched over targets; ``tests/test_text_omp.py`` checks supports and coefficients against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["SparseCodes", "sparse_decompose", "prepare_dictionary", "NORMALIZATIONS"]

NORMALIZATIONS = ("text", "legacy_axis0", "none")


@dataclass
class SparseCodes:
    """The result of :func:`sparse_decompose` for B targets and k atoms.

    Attributes:
        indices: (B, k) int64 dictionary rows, in the order OMP selected them.
        coefficients: (B, k) least-squares coefficients of those atoms (target ~ coefficients @ A[indices]).
        residual_norms: (B,) norm of target - reconstruction.
        target_norms: (B,) norm of each target.
    """

    indices: Tensor
    coefficients: Tensor
    residual_norms: Tensor
    target_norms: Tensor

    def __len__(self) -> int:
        return self.indices.shape[0]

    def sorted(self) -> "SparseCodes":
        """The same codes with each row ordered by decreasing |coefficient|."""
        order = self.coefficients.abs().argsort(dim=1, descending=True)
        return SparseCodes(self.indices.gather(1, order), self.coefficients.gather(1, order),
                           self.residual_norms, self.target_norms)

    def dense(self, num_atoms: int) -> Tensor:
        """Coefficients as a dense (B, num_atoms) matrix."""
        out = torch.zeros(len(self), num_atoms, dtype=self.coefficients.dtype, device=self.coefficients.device)
        return out.scatter_(1, self.indices, self.coefficients)

    def reconstruct(self, dictionary: Tensor) -> Tensor:
        """(B, D) reconstructions sum_j coefficients[:, j] * dictionary[indices[:, j]]."""
        atoms = dictionary.to(self.coefficients.device, self.coefficients.dtype)[self.indices]   # (B, k, D)
        return torch.einsum("bk,bkd->bd", self.coefficients, atoms)

    def words(self, vocabulary: Sequence[str], row: int) -> list[tuple[str, float]]:
        """[(word, coefficient), ...] of one target, in the stored order (call :meth:`sorted` first)."""
        return [(vocabulary[int(i)], float(c)) for i, c in zip(self.indices[row], self.coefficients[row])]


def prepare_dictionary(embeddings: Tensor, normalization: str = "text", center: bool = True) -> Tensor:
    """Turn text embeddings (N, D) into an OMP dictionary (N, D).

    Args:
        embeddings: (N, D) text embeddings, one row per text.
        normalization: ``"text"`` (default): after centring, scale every row to unit norm, so the atoms are
            unit-norm as OMP assumes. ``"legacy_axis0"``: the reference implementation's choice: after
            centring, scale every embedding *dimension* (column) to unit norm over the texts; the atoms
            are then not unit-norm (kept only to reproduce the reference). ``"none"``: no scaling.
        center: subtract the mean over texts first (removes what all words share, e.g. "a photo of").
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D); got shape {tuple(embeddings.shape)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))}; got {normalization!r}")
    if center and embeddings.shape[0] < 2:
        raise ValueError("centring needs at least 2 texts; pass center=False for a single text")
    x = embeddings - embeddings.mean(dim=0, keepdim=True) if center else embeddings
    if normalization == "text":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    elif normalization == "legacy_axis0":
        x = x / x.norm(dim=0, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return x


def _omp_chunk(Y: Tensor, A: Tensor, k: int, atom_sq: Tensor, screen: Optional[int] = None,
               A_low: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """OMP on one chunk: Y (B, D), A (N, D), atom_sq (N,) squared atom norms -> indices, coefficients (B, k).

    With ``screen`` = m, the correlations are first computed with ``A_low`` (a bfloat16 copy of A), the m
    largest per target are recomputed exactly, and the best of those is selected."""
    B, D = Y.shape
    dev, dt = Y.device, Y.dtype
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    sel = torch.zeros(B, k, D, dtype=dt, device=dev)           # the selected atoms, A[idx]
    L = torch.zeros(B, k, k, dtype=dt, device=dev)
    alpha = torch.zeros(B, k, dtype=dt, device=dev)             # A[idx] . y
    R = Y
    gamma = alpha[:, :0]
    eps = torch.finfo(dt).eps
    dependence_tol = eps ** 0.5
    for j in range(k):
        if screen is None:
            corr = torch.mm(R, A.T).abs_()
            corr.scatter_(1, idx[:, :j], -1.0)                  # never pick an atom twice
            new = corr.argmax(dim=1)
        else:
            corr = torch.mm(R.to(A_low.dtype), A_low.T).abs_()
            corr.scatter_(1, idx[:, :j], -1.0)
            cand = corr.topk(screen, dim=1).indices             # (B, m)
            exact = torch.einsum("bmd,bd->bm", A[cand], R).abs_()
            exact.masked_fill_((cand[:, :, None] == idx[:, None, :j]).any(dim=2), -1.0)
            new = cand.gather(1, exact.argmax(dim=1, keepdim=True))[:, 0]
        del corr
        idx[:, j] = new
        a_new = A[new]                                           # (B, D)
        sel[:, j] = a_new
        alpha[:, j] = (a_new * Y).sum(dim=1)
        if j == 0:
            L[:, 0, 0] = atom_sq[new].sqrt()
        else:
            v = torch.bmm(sel[:, :j], a_new[:, :, None])                               # (B, j, 1)
            w = torch.linalg.solve_triangular(L[:, :j, :j], v, upper=False)[..., 0]
            diag = atom_sq[new] - (w * w).sum(dim=1)
            # An atom (numerically) inside the span of those already chosen would make the Cholesky factor
            # singular and the coefficients explode (scikit-learn stops early there). Keep it in the support
            # with coefficient 0 instead: its row is decoupled from the others and its right-hand side is 0.
            dependent = ~(diag > dependence_tol * atom_sq[new])
            L[:, j, :j] = w.masked_fill(dependent[:, None], 0.0)
            L[:, j, j] = torch.where(dependent, torch.ones_like(diag), diag.clamp_min(eps).sqrt())
            alpha[:, j] = alpha[:, j].masked_fill(dependent, 0.0)
        gamma = torch.cholesky_solve(alpha[:, :j + 1, None], L[:, :j + 1, :j + 1], upper=False)   # (B, j+1, 1)
        R = Y - torch.bmm(gamma.transpose(1, 2), sel[:, :j + 1])[:, 0]
        gamma = gamma[..., 0]
    return idx, gamma


def sparse_decompose(targets: Tensor, dictionary: Tensor, k: int = 64, *, chunk_size: Optional[int] = None,
                     device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                     progress: bool = False, sort: bool = True, screen: Optional[int] = None) -> SparseCodes:
    """Batched OMP: each target ~ a combination of exactly ``k`` distinct dictionary atoms.

    Matches ``sklearn.linear_model.orthogonal_mp(dictionary.T, targets.T, n_nonzero_coefs=k)`` (same
    supports, same coefficients to float tolerance) when the atoms are unit-norm (see
    :func:`prepare_dictionary`), except that scikit-learn stops early on a target it already fits exactly,
    or whose next atom is numerically dependent on the selected ones (its part orthogonal to their span below
    sqrt(eps) of its squared norm), where this always returns ``k`` distinct atoms: the extra coefficients are
    ~0, and a dependent atom's coefficient is exactly 0 (so k above the dictionary's rank cannot blow up).

    Args:
        targets: (B, D) or (D,) directions to describe (e.g. pair directions u[h, n]).
        dictionary: (N, D) atoms, one row per text (k <= min(N, D) for a well-posed problem).
        k: non-zeros per target.
        chunk_size: targets per chunk; bounds memory at about chunk_size * (N + k * D) floats. Default:
            chosen so that the (chunk, N) correlation matrix stays under ~256 MB.
        device: where to compute ("cpu", "cuda"); default: the targets' device.
        dtype: computation dtype (default: float32, or float64 if the targets are float64).
        progress: show a tqdm bar over chunks.
        sort: order each row's atoms by decreasing |coefficient| (otherwise: selection order).
        screen: ``None`` (default) computes every correlation in ``dtype``: exact OMP. An integer m computes
            them in bfloat16 first, recomputes the m largest per target exactly and selects among those:
            2-3x faster on CPUs with bf16 matrix units, and the same atom unless bf16 rounding pushes the
            best atom out of the top m (rare for m >= 8; the benchmark reports how often supports differ).

    Returns:
        :class:`SparseCodes` with indices (B, k), coefficients (B, k), residual_norms (B,), target_norms (B,)
        on ``device``.
    """
    single = targets.dim() == 1
    if single:
        targets = targets[None]
    if targets.dim() != 2 or dictionary.dim() != 2:
        raise ValueError(f"expected targets (B, D) and dictionary (N, D); got {tuple(targets.shape)} and "
                         f"{tuple(dictionary.shape)}")
    if targets.shape[1] != dictionary.shape[1]:
        raise ValueError(f"targets have D={targets.shape[1]} but the dictionary atoms have D={dictionary.shape[1]}; "
                         "embed the texts with the same model as the directions")
    N, D = dictionary.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be between 1 and the number of atoms ({N}); got {k}: "
                         "use a smaller k or a larger word pool")
    if k > D:
        raise ValueError(f"k={k} exceeds the embedding width D={D}: more than D atoms are linearly dependent")
    device = torch.device(device) if device is not None else targets.device
    if dtype is None:
        dtype = torch.float64 if targets.dtype == torch.float64 else torch.float32
    A = dictionary.to(device=device, dtype=dtype)
    A_low = None
    if screen is not None:
        if not 1 <= screen <= N:
            raise ValueError(f"screen must be between 1 and the number of atoms ({N}); got {screen}")
        A_low = A.to(torch.bfloat16)
    atom_sq = (A * A).sum(dim=1)
    if bool((atom_sq <= torch.finfo(dtype).tiny).any()):
        raise ValueError("the dictionary has a zero atom (a duplicate text after centring, or a single text); "
                         "remove duplicates from the pool")
    B = targets.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(B, (64 * 2 ** 20) // max(N, 1)))
    idx_out, coef_out, res_out, norm_out = [], [], [], []
    starts = range(0, B, chunk_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"OMP k={k} over {N} atoms", unit="chunk")
    with torch.no_grad():
        for s in starts:
            Y = targets[s:s + chunk_size].to(device=device, dtype=dtype)
            idx, coef = _omp_chunk(Y, A, k, atom_sq, screen, A_low)
            recon = torch.einsum("bj,bjd->bd", coef, A[idx])
            idx_out.append(idx)
            coef_out.append(coef)
            res_out.append((Y - recon).norm(dim=1))
            norm_out.append(Y.norm(dim=1))
    codes = SparseCodes(torch.cat(idx_out), torch.cat(coef_out), torch.cat(res_out), torch.cat(norm_out))
    return codes.sorted() if sort else codes
