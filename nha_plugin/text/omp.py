"""Batched orthogonal matching pursuit (OMP) and dictionary preprocessing.

:func:`sparse_decompose` writes each of B targets as a combination of exactly ``k`` dictionary atoms,
all targets at once. Per step it computes the correlations ``R @ A^T`` for the whole chunk of targets (one
matrix product, no N x N Gram matrix), picks each target's best unused atom, extends a per-target Cholesky
factor of the selected atoms' Gram matrix by one row, and re-solves the least-squares coefficients. This
is scikit-learn's ``orthogonal_mp(X, y, n_nonzero_coefs=k)`` (its Cholesky variant) with ``X = A^T``,
batched over targets; ``tests/test_text_omp.py`` checks supports and coefficients against it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
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


# ---- picking each residual's next atom ----------------------------------------------------------------------
# On a CPU the correlations are computed a block of atoms at a time into a reused buffer that stays in the
# last-level cache: the |.|, the maximum and the merge then read cache, not memory, and no (B, N) matrix is
# allocated (and page-faulted) at every step. A GPU takes all atoms in one block.
_CPU_BLOCK_BYTES = 8 * 2 ** 20


def _atom_block(device: torch.device, targets: int, atoms: int, itemsize: int) -> int:
    """Atoms per correlation block: all of them on a GPU, about 8 MiB of correlations on a CPU."""
    if device.type != "cpu":
        return atoms
    return max(256, min(atoms, _CPU_BLOCK_BYTES // (itemsize * max(targets, 1))))


class _Buffers:
    """Reused output buffers of the block products, one per (rows, columns, dtype)."""

    def __init__(self):
        self.store = {}

    def get(self, rows: int, cols: int, like: Tensor) -> Tensor:
        key = (rows, cols, like.dtype)
        if key not in self.store:
            self.store[key] = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
        return self.store[key]


def _merge_best(best: Optional[tuple[Tensor, Tensor]], values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The running (value, index) maximum per row; a tie keeps the earlier block (first index, as argmax)."""
    if best is None:
        return values, indices
    better = values > best[0]
    return torch.where(better, values, best[0]), torch.where(better, indices, best[1])


def _exact_best(R: Tensor, A: Tensor, taken: Tensor, block: int, buffers: _Buffers) -> Tensor:
    """(B,) index of each row of R's atom with the largest |correlation| (first on ties), never one in ``taken``.

    Args:
        R: (B, D) residuals. A: (N, D) atoms. taken: (B, j) atoms already selected (j may be 0).
        block: atoms per block product. buffers: reused block outputs.
    """
    best = None
    for n0 in range(0, A.shape[0], block):
        atoms = A[n0:n0 + block]
        corr = torch.mm(R, atoms.T, out=buffers.get(R.shape[0], atoms.shape[0], R)).abs_()
        values, indices = corr.max(dim=1)
        best = _merge_best(best, values, indices + n0)
    pick = best[1]
    # A selected atom has correlation ~0 (the residual is orthogonal to it), so it wins only when every
    # correlation is at rounding level (a target already fitted exactly, or k above the rank): redo those rows
    # over all atoms with the selected ones masked, as the one-shot product would.
    clash = (taken == pick[:, None]).any(dim=1)
    if bool(clash.any()):
        corr = torch.mm(R[clash], A.T).abs_()
        corr.scatter_(1, taken[clash], -1.0)
        pick[clash] = corr.argmax(dim=1)
    return pick


class _Screen:
    """Low-precision copies of the atoms for ``screen``: int8 (fbgemm, per-atom scales) on CPUs that have it,
    else bfloat16; correlations of unit-norm residuals, as blocks of atoms."""

    def __init__(self, A: Tensor, block: int):
        self.block, self.atoms, self.int8 = block, A.shape[0], None
        if A.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # the quantized tensor API warns that it is deprecated
                try:
                    self.int8 = [self._pack(A[n0:n0 + block].float()) for n0 in range(0, A.shape[0], block)]
                except (RuntimeError, AttributeError):
                    self.int8 = None
        self.low = None if self.int8 is not None else A.to(torch.bfloat16)

    @staticmethod
    def _pack(atoms: Tensor):
        """fbgemm weights: symmetric int8 per atom (scale max|a| / 127, zero point 0)."""
        scales = (atoms.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
        q = torch.quantize_per_channel(atoms, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)

    def top(self, R: Tensor, m: int) -> Tensor:
        """(B, m) indices of the m atoms with the largest approximate |correlation| with each row of R."""
        unit = F.normalize(R.float(), dim=1)             # one activation scale fits every row (argmax is scale-free)
        found = None
        for b, n0 in enumerate(range(0, self.atoms, self.block)):
            if self.int8 is not None:
                # reduce_range: 7-bit activations, so AVX2's pairwise int16 sums cannot saturate
                corr = torch.ops.quantized.linear_dynamic(unit, self.int8[b], True)
            else:
                corr = torch.mm(unit.to(torch.bfloat16), self.low[n0:n0 + self.block].T)
            values, indices = corr.abs_().topk(min(m, corr.shape[1]), dim=1)
            values, indices = values.float(), indices + n0
            if found is not None:
                values, indices = torch.cat([found[0], values], 1), torch.cat([found[1], indices], 1)
                keep = values.topk(min(m, values.shape[1]), dim=1).indices
                values, indices = values.gather(1, keep), indices.gather(1, keep)
            found = values, indices
        return found[1]


def _screened_best(R: Tensor, A: Tensor, taken: Tensor, screen: _Screen, m: int, block: int,
                   buffers: _Buffers) -> Tensor:
    """As :func:`_exact_best`, choosing among each row's m best atoms by the low-precision correlations, whose
    correlations are then recomputed in R's precision."""
    cand = screen.top(R, m)                                                       # (B, m)
    exact = torch.einsum("bmd,bd->bm", A[cand], R).abs_()
    exact.masked_fill_((cand[:, :, None] == taken[:, None, :]).any(dim=2), -1.0)
    best = exact.max(dim=1)
    pick = cand.gather(1, best.indices[:, None])[:, 0]
    lost = best.values < 0                  # every candidate already selected: a residual at rounding level
    if bool(lost.any()):
        pick[lost] = _exact_best(R[lost], A, taken[lost], block, buffers)
    return pick


def _omp_chunk(Y: Tensor, A: Tensor, k: int, atom_sq: Tensor, pick) -> tuple[Tensor, Tensor]:
    """OMP on one chunk: Y (B, D), A (N, D), atom_sq (N,) squared atom norms -> indices, coefficients (B, k).

    ``pick(R, taken)`` returns each residual's next atom. The selected atoms are kept as an orthonormal basis
    Q (Gram-Schmidt, applied twice so Q stays orthonormal to working precision) with A_S = L Q, L lower
    triangular (the Cholesky factor of the atoms' Gram matrix, as scikit-learn's): each step appends one row
    to L, one basis vector q and one coordinate z = q . r, and the residual loses its component along q. No
    triangular solve runs inside the loop; the coefficients solve L^T x = z once at the end."""
    B, D = Y.shape
    dev, dt = Y.device, Y.dtype
    idx = torch.zeros(B, k, dtype=torch.long, device=dev)
    Q = torch.zeros(B, k, D, dtype=dt, device=dev)
    L = torch.zeros(B, k, k, dtype=dt, device=dev)
    z = torch.zeros(B, k, dtype=dt, device=dev)
    R = Y.clone()
    dependence_tol = torch.finfo(dt).eps ** 0.5
    for j in range(k):
        new = pick(R, idx[:, :j])
        idx[:, j] = new
        u = A[new]                                                                 # (B, D)
        w = torch.zeros(B, j, dtype=dt, device=dev)
        for _ in range(2 if j else 0):                                             # "twice is enough"
            c = torch.einsum("bjd,bd->bj", Q[:, :j], u)
            u = u - torch.einsum("bj,bjd->bd", c, Q[:, :j])
            w += c
        d2 = (u * u).sum(dim=1)
        # An atom (numerically) inside the span of those already chosen would make L singular and the
        # coefficients explode (scikit-learn stops early there). Keep it in the support with coefficient 0
        # instead: its row of L is (0, ..., 0, 1), its basis vector and coordinate are 0.
        dependent = ~(d2 > dependence_tol * atom_sq[new])
        d = torch.where(dependent, torch.ones_like(d2), d2.sqrt())
        q = (u / d[:, None]).masked_fill_(dependent[:, None], 0.0)
        Q[:, j] = q
        L[:, j, :j] = w.masked_fill_(dependent[:, None], 0.0)
        L[:, j, j] = d
        z[:, j] = (q * R).sum(dim=1)                                               # modified Gram-Schmidt
        R -= z[:, j, None] * q
    coef = torch.linalg.solve_triangular(L.transpose(1, 2), z[:, :, None], upper=True)[..., 0]
    return idx, coef


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
    if screen is not None and not 1 <= screen <= N:
        raise ValueError(f"screen must be between 1 and the number of atoms ({N}); got {screen}")
    atom_sq = (A * A).sum(dim=1)
    if bool((atom_sq <= torch.finfo(dtype).tiny).any()):
        raise ValueError("the dictionary has a zero atom (a duplicate text after centring, or a single text); "
                         "remove duplicates from the pool")
    B = targets.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(B, (64 * 2 ** 20) // max(N, 1)))
    block = _atom_block(device, min(chunk_size, B), N, A.element_size())
    buffers = _Buffers()
    if screen is None:
        def pick(R, taken):
            return _exact_best(R, A, taken, block, buffers)
    else:
        low = _Screen(A, block)

        def pick(R, taken):
            return _screened_best(R, A, taken, low, screen, block, buffers)
    idx_out, coef_out, res_out, norm_out = [], [], [], []
    starts = range(0, B, chunk_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"OMP k={k} over {N} atoms", unit="chunk")
    with torch.no_grad():
        for s in starts:
            Y = targets[s:s + chunk_size].to(device=device, dtype=dtype)
            idx, coef = _omp_chunk(Y, A, k, atom_sq, pick)
            recon = torch.einsum("bj,bjd->bd", coef, A[idx])
            idx_out.append(idx)
            coef_out.append(coef)
            res_out.append((Y - recon).norm(dim=1))
            norm_out.append(Y.norm(dim=1))
    codes = SparseCodes(torch.cat(idx_out), torch.cat(coef_out), torch.cat(res_out), torch.cat(norm_out))
    return codes.sorted() if sort else codes
