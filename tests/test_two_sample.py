"""Two-sample statistics and correlations against scipy / scikit-learn / brute force, and the tests' level
under no shift and power under a planted shift."""
import numpy as np
import pytest
import torch

from nha_plugin.applications import two_sample as S

stats = pytest.importorskip("scipy.stats")


# ---- statistics ----------------------------------------------------------------------------------------------
def test_point_biserial_matches_scipy():
    rng = np.random.default_rng(0)
    present = rng.random(80) < 0.3
    scores = rng.normal(size=80) + 1.5 * present
    assert S.point_biserial(scores, present) == pytest.approx(stats.pointbiserialr(present, scores)[0], abs=1e-12)
    assert np.isnan(S.point_biserial(scores, np.zeros(80, bool)))
    assert np.isnan(S.point_biserial(np.ones(80), present))


def test_group_summary_means_shares_and_correlation():
    rng = np.random.default_rng(1)
    groups = np.repeat([2019, 2018, 2020], 30)
    present = rng.random(90) < np.repeat([0.2, 0.1, 0.6], 30)
    scores = rng.normal(size=90) + present
    out = S.group_summary(scores, present, groups)
    assert [r["group"] for r in out["groups"]] == [2018, 2019, 2020]
    means = [scores[groups == y].mean() for y in (2018, 2019, 2020)]
    shares = [present[groups == y].mean() for y in (2018, 2019, 2020)]
    assert [r["mean"] for r in out["groups"]] == pytest.approx(means, abs=1e-12)
    assert [r["share"] for r in out["groups"]] == pytest.approx(shares, abs=1e-12)
    assert out["r"] == pytest.approx(np.corrcoef(means, shares)[0, 1], abs=1e-12)


def test_mmd_equals_brute_force():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(12, 3)) + 0.5
    z = np.concatenate([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    sigma = float(np.median(dists))
    assert S.median_bandwidth(x, y) == pytest.approx(sigma, rel=1e-12)
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma ** 2))   # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert S.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert S.mmd_test(x, y, n_permutations=50, seed=0)["statistic"] == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def _null_and_shift(seed, n=40, dim=4, shift=0.0):
    """Two samples from the same generator with two seeds; ``shift`` moves the second one's mean."""
    a = np.random.default_rng((seed, 0)).normal(size=(n, dim))
    b = np.random.default_rng((seed, 1)).normal(size=(n, dim)) + shift
    return a, b


def test_two_sample_tests_hold_level_under_no_shift_and_detect_a_planted_shift():
    p_mmd, p_ks, p_c2 = [], [], []
    for seed in range(30):
        a, b = _null_and_shift(seed)
        p_mmd.append(S.mmd_test(a, b, n_permutations=99, seed=seed)["p_value"])
        p_ks.append(S.ks_test(a[:, 0], b[:, 0])["p_value"])
        p_c2.append(S.classifier_test(a, b, seed=seed)["p_value"])
    for name, ps in (("mmd", p_mmd), ("ks", p_ks), ("c2st", p_c2)):
        ps = np.asarray(ps)
        assert 0.3 < ps.mean() < 0.75, (name, ps.mean())
        assert (ps < 0.05).mean() <= 0.2, (name, ps)
    a, b = _null_and_shift(99, n=60, shift=0.8)
    assert S.mmd_test(a, b, n_permutations=199, seed=0)["p_value"] < 0.01
    assert S.ks_test(a[:, 0], b[:, 0])["p_value"] < 0.01
    assert S.classifier_test(a, b, seed=0)["p_value"] < 0.01
    assert S.mmd_test(a, b, n_permutations=99, seed=5) == S.mmd_test(a, b, n_permutations=99, seed=5)


@pytest.mark.parametrize("m,n,shift", [(7, 5, 0.0), (30, 30, 0.6), (40, 73, 0.2), (120, 90, 0.4)])
def test_ks_matches_scipy_exact(m, n, shift):
    rng = np.random.default_rng(m * n)
    a, b = rng.normal(size=m), rng.normal(size=n) + shift
    ref = stats.ks_2samp(a, b, method="exact")
    got = S.ks_test(a, b)
    assert got["statistic"] == pytest.approx(ref.statistic, abs=1e-15)
    assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-14)
    tied = np.round(a, 1), np.round(b, 1)
    assert S.ks_statistic(*tied) == pytest.approx(stats.ks_2samp(*tied).statistic, abs=1e-15)


@pytest.mark.parametrize("k,n", [(0, 10), (6, 10), (31, 50), (70, 100), (100, 100)])
def test_binomial_sf_matches_scipy(k, n):
    assert S.binomial_sf(k, n) == pytest.approx(stats.binomtest(k, n, 0.5, alternative="greater").pvalue, rel=1e-10)


def test_logistic_fit_matches_scikit_learn():
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 4))
    y = (x[:, 0] - 0.5 * x[:, 2] + rng.normal(size=80) > 0).astype(float)
    l2 = 0.05
    w, b = S.fit_logistic(torch.tensor(x), torch.tensor(y), l2)
    ref = lm.LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x, y)
    assert np.allclose(w.numpy(), ref.coef_[0], atol=1e-5) and abs(float(b) - ref.intercept_[0]) < 1e-5
