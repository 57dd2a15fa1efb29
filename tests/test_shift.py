"""Distribution-shift monitor: concept units and scores against dense references, statistics against scipy /
scikit-learn / brute force, two-sample tests under no shift and a planted shift, and ``nha shift`` end to end."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin.adapters import get_spec
from nha_plugin.applications import shift as S
from nha_plugin.cli.shift import main as shift_main
from nha_plugin.pool import pair_directions
from conftest import assert_topk_selection, images_for

stats = pytest.importorskip("scipy.stats")


# ---- units and scores --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_case():
    from conftest import make_tiny
    model = make_tiny(torch.float64)
    images = images_for(model, batch=6, dtype=torch.float64, seed=3)
    return model, get_spec(model).detached(), nha.decompose(model, images), images


def test_select_units_ranks_pairs_by_signed_pc0_alignment(tiny_case):
    _, spec, _, _ = tiny_case
    H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    signs = torch.where(torch.rand(H, C, generator=g) < 0.5, -1.0, 1.0).double()
    u = pair_directions(spec)                                               # dense (H, C, D) reference
    dense = (signs[..., None] * u / u.norm(dim=-1, keepdim=True)) @ t
    assert torch.allclose(S.pair_alignment(spec, t, signs), dense, atol=1e-12)
    units = S.select_units(spec, t, k=7, pair_signs=signs)
    assert units.pairs.shape == (7, 2)
    assert_topk_selection(dense.flatten(), units.pairs[:, 0] * C + units.pairs[:, 1])
    assert torch.allclose(units.pair_vectors, u[units.pairs[:, 0], units.pairs[:, 1]], atol=1e-12)
    unsigned = S.select_units(spec, t, k=7)                                # None means +1 everywhere
    assert_topk_selection(((u / u.norm(dim=-1, keepdim=True)) @ t).flatten(),
                          unsigned.pairs[:, 0] * C + unsigned.pairs[:, 1])
    with pytest.raises(ValueError, match=r"pair_signs must be \(H, C\)"):
        S.pair_alignment(spec, t, torch.ones(C, H))


def test_concept_scores_equal_dense_contributions(tiny_case):
    model, spec, contrib, images = tiny_case
    g = torch.Generator().manual_seed(2)
    coeffs = contrib.pair_coefficients
    dirs = S.unit_directions(spec, coeffs)
    t = F.normalize(torch.randn(spec.output_dim, generator=g, dtype=torch.float64), dim=0)
    units = S.select_units(spec, t, dirs, k=4, k_neurons=3, k_heads=2)
    got = S.concept_scores(contrib, units)
    dense = contrib.pair_contributions()                                   # (B, H, C, D)
    y = model.encode_image(images)
    assert (contrib.embedding - y).abs().max() < 1e-10                    # exact completeness in float64
    pairs = dense[:, units.pairs[:, 0], units.pairs[:, 1]].sum(dim=1)
    neurons = dense[:, :, units.neurons].sum(dim=(1, 2))
    heads = dense[:, units.heads].sum(dim=(1, 2))
    ny = y.norm(dim=-1)
    assert torch.allclose(got["nad_pairs"], pairs.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["neurons"], neurons.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["heads"], heads.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["cosine"], F.cosine_similarity(y, t[None], dim=-1), atol=1e-12)


def test_neuron_and_head_directions_are_their_contributions_pc0(tiny_case):
    _, spec, contrib, _ = tiny_case
    coeffs = contrib.pair_coefficients
    dirs = S.unit_directions(spec, coeffs)
    dense = contrib.pair_contributions()
    for kind, idx, x in (("neuron", 5, dense[:, :, 5].sum(dim=1)), ("neuron", 300, dense[:, :, 300].sum(dim=1)),
                         ("head", 2, dense[:, 2].sum(dim=1))):
        xc = x - x.mean(dim=0)
        v = torch.linalg.svd(xc, full_matrices=False).Vh[0]
        if ((xc @ v) > 0).sum() * 2 <= len(xc):                             # the paper: flip unless more than half
            v = -v
        got = dirs.neurons[idx] if kind == "neuron" else dirs.heads[idx]
        assert torch.allclose(got, v, atol=1e-8), (kind, idx)
    assert torch.equal(dirs.pair_signs, S.pc0_signs(coeffs))


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
    w, b = S._fit_logistic(torch.tensor(x), torch.tensor(y), l2)
    ref = lm.LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x, y)
    assert np.allclose(w.numpy(), ref.coef_[0], atol=1e-5) and abs(float(b) - ref.intercept_[0]) < 1e-5


# ---- end to end on scenes-rn ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes_rn():
    return nha.load_clip("scenes-rn")


def test_run_monitor_on_planted_years(scenes_rn):
    from nha_plugin.scenes import years
    model, preprocess, tokenizer = scenes_rn
    sampler = years(("colour", "yellow"), shares=(0.0, 0.25, 0.75), n_per_group=12, seed=4)
    data = S.ShiftData.from_sampler(sampler, "yellow")
    truth = [sampler.scene(y, i).meta["has_concept"] for y in sampler.years for i in range(12)]
    assert data.presence["yellow"].tolist() == truth
    res = S.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"}, k=3, n_permutations=20,
                        batch_size=16, progress=False)
    c = res["concepts"]["yellow"]
    assert [g["share"] for g in c["groups"]] == [sampler.true_share(y) for y in sampler.years] == [0.0, 0.25, 0.75]
    assert [g["n"] for g in c["groups"]] == [12, 12, 12] and len(c["units"]["pairs"]) == 3
    assert "ks" not in c["groups"][0] and set(c["groups"][1]["ks"]) == set(S.METHODS)
    assert [set(g) >= {"mmd", "classifier"} for g in res["groups"][1:]] == [True, True]
    # the planted colour is what scenes-rn's text tower knows best: cos(y, t) must track it
    assert c["per_image_r"]["cosine"] > 0.5 and c["group_mean_r"]["cosine"] > 0.9
    assert res["protocol"]["pair_signs"].startswith("paper's PC0 sign on 12 images of reference group 2018")


def test_cli_scenes_writes_reports_and_resumes(tmp_path):
    args = ["shift", "--concept", "shape:star", "--shares", "0.1,0.6", "--n-per-group", "10", "--permutations",
            "20", "--fit-images", "16", "--k", "3", "--out", str(tmp_path), "--name", "t", "--quiet"]
    assert shift_main(args) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    run = report["runs"][0]
    assert run["concepts"]["shape:star"]["text"] == "star" and run["protocol"]["groups"] == [2018, 2019]
    assert (tmp_path / "t.png").stat().st_size > 0 and "| 2019 | 10 | 0.600 |" in (tmp_path / "t.md").read_text()
    part = next((tmp_path / "t.parts").glob("*.json"))
    cached = json.loads(part.read_text())
    cached["protocol"]["data"] = "FROM THE PART FILE"
    part.write_text(json.dumps(cached))
    assert shift_main(args) == 0
    assert "FROM THE PART FILE" in (tmp_path / "t.md").read_text()


def test_cli_stanford_cars_fake_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    rows = []
    for cls, year in (("Acura RL Sedan 2011", 2011), ("Audi TT Coupe 2012", 2012)):
        for i in range(8):
            yellow = i < (2 if year == 2011 else 6)
            rgb = (240, 220, 30) if yellow else tuple(int(v) for v in rng.integers(0, 120, 3))
            path = tmp_path / "cars" / "train" / cls / f"{year}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 60, 3), rgb, np.uint8)).save(path)
            rows.append([path.name, "yellow" if yellow else "black", int(i % 2 == 0)])
    with open(tmp_path / "colours.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "colour", "even"]] + rows)
    args = ["shift", "--dataset", "stanford-cars", "--root", str(tmp_path / "cars"), "--colours",
            str(tmp_path / "colours.csv"), "--concept", "yellow", "--concept", "even", "--presence", "even=even",
            "--min-group-size", "4", "--permutations", "10", "--out", str(tmp_path / "o"), "--quiet"]
    assert shift_main(args) == 0
    run = json.loads((tmp_path / "o" / "shift.json").read_text())["runs"][0]
    assert run["protocol"]["groups"] == [2011, 2012]
    assert [g["share"] for g in run["concepts"]["yellow"]["groups"]] == [0.25, 0.75]
    assert [g["share"] for g in run["concepts"]["even"]["groups"]] == [0.5, 0.5]
    assert "reference group 2011" in run["protocol"]["pair_signs"]
    with pytest.raises(SystemExit, match="CONCEPT=COLUMN"):
        shift_main(["shift", "--dataset", "stanford-cars", "--root", str(tmp_path / "cars"), "--colours",
                    str(tmp_path / "colours.csv"), "--concept", "even", "--presence", "nope", "--quiet"])
