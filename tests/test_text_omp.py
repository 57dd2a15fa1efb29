"""Batched OMP against scikit-learn's orthogonal_mp, and the dictionary preprocessing."""
import numpy as np
import pytest
import torch

from nha_plugin.text import prepare_dictionary, sparse_decompose

sklearn_omp = pytest.importorskip("sklearn.linear_model").orthogonal_mp


def _problem(N, D, B, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = prepare_dictionary(torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
    Y = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    return A, Y


@pytest.mark.parametrize("N,D,B,k,chunk,seed", [
    (300, 32, 17, 8, 5, 0),       # chunked: 17 targets in chunks of 5
    (1000, 64, 12, 30, None, 1),
    (80, 40, 6, 36, None, 2),      # k close to D
    (2000, 16, 9, 1, 4, 3),
])
def test_matches_sklearn_float64(N, D, B, k, chunk, seed):
    A, Y = _problem(N, D, B, seed)
    codes = sparse_decompose(Y, A, k=k, chunk_size=chunk, sort=False)
    ref = sklearn_omp(A.T.numpy(), Y.T.numpy(), n_nonzero_coefs=k).T          # (B, N)
    assert codes.indices.shape == (B, k) and codes.coefficients.shape == (B, k)
    for b in range(B):
        assert set(np.flatnonzero(ref[b])) == set(codes.indices[b].tolist()), f"support differs for target {b}"
    np.testing.assert_allclose(codes.dense(N).numpy(), ref, atol=1e-9, rtol=1e-9)
    resid = np.linalg.norm(Y.numpy() - ref @ A.numpy(), axis=1)
    np.testing.assert_allclose(codes.residual_norms.numpy(), resid, atol=1e-9)


def test_matches_sklearn_float32():
    A, Y = _problem(3000, 96, 20, 4, torch.float32)
    codes = sparse_decompose(Y, A, k=24, chunk_size=8)
    ref = sklearn_omp(A.T.numpy().astype(np.float64), Y.T.numpy().astype(np.float64), n_nonzero_coefs=24).T
    for b in range(20):
        assert set(np.flatnonzero(ref[b])) == set(codes.indices[b].tolist())
    np.testing.assert_allclose(codes.dense(3000).numpy(), ref, atol=2e-4)


def test_sorted_and_selection_order_are_the_same_code():
    A, Y = _problem(400, 24, 6, 5)
    a = sparse_decompose(Y, A, k=10, sort=False)
    b = sparse_decompose(Y, A, k=10, sort=True)
    torch.testing.assert_close(a.dense(400), b.dense(400))
    assert (b.coefficients.abs().diff(dim=1) <= 0).all()
    torch.testing.assert_close(b.reconstruct(A), Y - (Y - b.reconstruct(A)))
    torch.testing.assert_close((Y - b.reconstruct(A)).norm(dim=1), b.residual_norms)


def test_exactly_k_atoms_and_exact_recovery_of_a_sparse_target():
    A, _ = _problem(500, 64, 1, 6)
    y = 2.0 * A[7] - 0.5 * A[123] + 1.5 * A[400]
    codes = sparse_decompose(y, A, k=6, sort=True)
    assert len(set(codes.indices[0].tolist())) == 6              # scikit-learn would stop at 3
    assert codes.indices[0, :3].tolist() == [7, 400, 123]
    torch.testing.assert_close(codes.coefficients[0, :3], torch.tensor([2.0, 1.5, -0.5], dtype=torch.float64))
    assert codes.residual_norms[0] < 1e-10


def test_screened_omp_matches_exact_omp():
    A, Y = _problem(5000, 64, 16, 7, torch.float32)
    exact = sparse_decompose(Y, A, k=16)
    fast = sparse_decompose(Y, A, k=16, screen=8)
    # float32: a support may differ only where two atoms tie within rounding, and then the fit is as good
    same = (exact.indices.sort(dim=1).values == fast.indices.sort(dim=1).values).all(dim=1)
    assert int(same.sum()) >= len(same) - 1, f"supports differ for {int((~same).sum())} of {len(same)} targets"
    torch.testing.assert_close(exact.residual_norms, fast.residual_norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact.dense(5000)[same], fast.dense(5000)[same], atol=1e-4, rtol=1e-4)


def test_prepare_dictionary_modes():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(40, 8, generator=g, dtype=torch.float64) + 3.0
    text = prepare_dictionary(E)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(40, dtype=torch.float64))
    centred = E - E.mean(dim=0)
    torch.testing.assert_close(text * centred.norm(dim=1, keepdim=True), centred)
    legacy = prepare_dictionary(E, "legacy_axis0")
    torch.testing.assert_close(legacy.norm(dim=0), torch.ones(8, dtype=torch.float64))
    assert not torch.allclose(legacy.norm(dim=1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(prepare_dictionary(E, "none", center=False), E)


def test_bad_inputs_say_what_to_do():
    A, Y = _problem(100, 16, 3, 8)
    with pytest.raises(ValueError, match="exceeds the embedding width"):
        sparse_decompose(Y, A, k=17)
    with pytest.raises(ValueError, match="D=15"):
        sparse_decompose(Y[:, :15], A, k=3)
    with pytest.raises(ValueError, match="zero atom"):
        sparse_decompose(Y, torch.cat([A, torch.zeros(1, 16, dtype=A.dtype)]), k=3)
    with pytest.raises(ValueError, match="normalization"):
        prepare_dictionary(A, "axis1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linearly_dependent_atoms_get_zero_coefficients_not_blow_up(dtype):
    """k above the dictionary's rank: once the span is exhausted every further atom is dependent. The fit must
    stay the least-squares projection onto the span (lstsq, float64), not diverge (it gave NaN before)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 64, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    Y = torch.randn(40, 64, generator=g, dtype=torch.float64)
    best = (Y - torch.linalg.lstsq(A.T, Y.T).solution.T @ A).norm(dim=1)
    codes = sparse_decompose(Y.to(dtype), A.to(dtype), k=32)
    assert torch.isfinite(codes.coefficients).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (codes.residual_norms.double() - best).abs().max() < tol
    assert ((codes.coefficients != 0).sum(dim=1) == 12).all()          # the rank: the rest are dependent
    assert (codes.indices.sort(dim=1).values.diff(dim=1) > 0).all()     # still k distinct atoms


@pytest.mark.parametrize("gap,block", [(1e-6, None), (1e-9, None), (1e-6, 256)])
def test_near_ties_pick_the_same_atoms_as_sklearn(gap, block, monkeypatch):
    """Pairs of atoms whose correlations with every residual differ by ~gap (a perturbed copy of each atom):
    far above float64 rounding, so the argmax is well defined and must be scikit-learn's, also when the
    correlations are computed a block of atoms at a time (block=256 splits the pairs across blocks)."""
    if block is not None:
        import nha_plugin.text.omp as omp_module
        monkeypatch.setattr(omp_module, "_CPU_BLOCK_BYTES", block * 8 * 24)     # 256 atoms per block, 24 targets
    g = torch.Generator().manual_seed(11)
    base = torch.randn(400, 48, generator=g, dtype=torch.float64)
    twins = base + gap * torch.randn(400, 48, generator=g, dtype=torch.float64)
    A = torch.nn.functional.normalize(torch.cat([base, twins])[torch.randperm(800, generator=g)], dim=1)
    # targets built from atoms, so the first picks are near-tied between an atom and its twin
    W = torch.randn(24, 800, generator=g, dtype=torch.float64) * (torch.rand(24, 800, generator=g) < 0.01)
    Y = W @ A + 1e-3 * torch.randn(24, 48, generator=g, dtype=torch.float64)
    codes = sparse_decompose(Y, A, k=12, sort=False)
    ref = sklearn_omp(A.T.numpy(), Y.T.numpy(), n_nonzero_coefs=12).T
    for b in range(24):
        assert set(np.flatnonzero(ref[b])) == set(codes.indices[b].tolist()), f"support differs for target {b}"
    np.testing.assert_allclose(codes.dense(800).numpy(), ref, atol=1e-9, rtol=1e-9)
