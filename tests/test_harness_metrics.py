"""Every metric on a case with a known answer; deletion cross-checked against Quantus, AP against scikit-learn."""
import numpy as np
import pytest
import torch
from torch import nn

from nha_plugin.harness import metrics as M


def test_metric_table_has_directions():
    for name in ("pointing_game", "mass_in_mask", "pixacc", "miou", "map", "insertion_auc"):
        assert M.METRICS[name].higher_is_better
    for name in ("deletion_auc", "infidelity", "max_sensitivity", "randomisation_spearman", "completeness_error",
                 "seconds_per_image"):
        assert not M.METRICS[name].higher_is_better


def test_pointing_game():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    heat = np.zeros((10, 10))
    heat[3, 3] = 1.0
    assert M.pointing_game(heat, mask) == 1.0
    heat[8, 8] = 2.0
    assert M.pointing_game(heat, mask) == 0.0
    assert M.pointing_game(heat, mask, tolerance=6) == 0.0          # distance from (8,8) to (3,3) is 5*sqrt2 > 6
    assert M.pointing_game(heat, mask, tolerance=8) == 1.0


def test_mass_in_mask_hand_computed():
    heat = np.array([[1.0, 2.0], [-5.0, 3.0]])
    mask = np.array([[True, False], [True, True]])
    assert M.mass_in_mask(heat, mask) == pytest.approx(4.0 / 6.0)    # negatives clipped: (1 + 0 + 3) / (1 + 2 + 3)
    assert M.mass_in_mask(-np.ones((2, 2)), mask) == 0.0


def test_segmentation_protocol_hand_computed():
    # soft map after clip + min-max: [[0, .5], [1, .25]] with mean .4375 -> prediction [[0, 1], [1, 0]]
    heat = np.array([[-1.0, 2.0], [4.0, 1.0]])
    gt = np.array([[False, True], [False, False]])
    c = M.segmentation_counts(heat, gt)
    assert c["correct"] == 3 and c["labelled"] == 4
    assert (c["inter1"], c["union1"], c["inter0"], c["union0"]) == (1, 2, 2, 3)
    # AP of soft scores [0, .5, 1, .25] for labels [0, 1, 0, 0]: ranks 1.0 (neg), .5 (pos) -> precision 1/2
    assert c["ap"] == pytest.approx(0.5)
    c2 = M.segmentation_counts(np.array([[0.0, 1.0], [0.0, 0.0]]), gt)     # perfect
    s = M.segmentation_summary([c, c2])
    assert s["pixacc"] == pytest.approx(7 / 8)
    assert s["miou"] == pytest.approx(((2 + 3) / (3 + 3) + (1 + 1) / (2 + 1)) / 2)    # dataset totals per class
    assert s["map"] == pytest.approx((0.5 + 1.0) / 2)


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.random(300) < 0.3
        scores = np.round(rng.random(300) + labels * 0.3, 2)               # with ties
        assert M.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_auc_and_deletion_known_curve():
    assert M.auc([1.0, 1.0, 0.0]) == pytest.approx(0.75)
    # score = mean of the 4 "object" pixels; the map ranks them first -> deletion removes them in the first half
    image = torch.zeros(1, 3, 4, 4)
    image[..., :2, :2] = 1.0
    heat = torch.zeros(4, 4)
    heat[:2, :2] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])

    def score(imgs):
        return imgs[:, 0, :2, :2].mean(dim=(1, 2))

    curve = M.perturbation_curve(score, image, heat, image, torch.zeros_like(image), steps=4)
    np.testing.assert_allclose(curve, [1.0, 0.0, 0.0, 0.0, 0.0])            # 4 of 16 pixels per step
    curve = M.perturbation_curve(score, image, heat, image, torch.zeros_like(image), steps=8)
    np.testing.assert_allclose(curve, [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    ins = M.perturbation_curve(score, image, heat, torch.zeros_like(image), image, steps=8)
    np.testing.assert_allclose(ins, [0.0, 0.5, 1.0, 1, 1, 1, 1, 1, 1])


def test_deletion_insertion_on_a_model():
    """p(target) from a 2-class model that reads only the top-left quadrant."""
    class Quadrant(nn.Module):
        def forward(self, x):
            s = (x[:, :, :4, :4].mean(dim=(1, 2, 3)) - 0.5) * 20
            return torch.stack([s, -s], dim=1)

    image = torch.zeros(3, 8, 8)
    image[:, :4, :4] = 1.0
    good = torch.zeros(8, 8)
    good[:4, :4] = 1.0 + torch.arange(16.0).view(4, 4) / 100
    bad = 2.0 - good                                            # the quadrant ranked last
    r_good = M.deletion_insertion(Quadrant(), image, 0, good, steps=4)
    r_bad = M.deletion_insertion(Quadrant(), image, 0, bad, steps=4)
    # good map: the quadrant (1/4 of the pixels) is gone after step 1 -> p = [1, 0, 0, 0, 0] up to sigmoid(20) tails
    assert r_good["deletion_auc"] == pytest.approx(0.5 / 4, abs=1e-6)
    # bad map: the quadrant goes last -> p = [1, 1, 1, 1, 0]
    assert r_bad["deletion_auc"] == pytest.approx(3.5 / 4, abs=1e-6)
    # insertion from the blurred image (quadrant mean < .5): good map restores it at step 1
    assert r_good["insertion_auc"] == pytest.approx(3.5 / 4, abs=1e-2)
    assert r_bad["insertion_auc"] == pytest.approx(0.5 / 4, abs=1e-2)


def test_deletion_curve_agrees_with_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    y = np.array([0, 2])
    a = torch.randn(2, 1, 8, 8)
    metric = quantus.PixelFlipping(features_in_step=8, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)
    theirs = np.array(metric(model=net, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), softmax=False, device="cpu"))
    for j in range(2):
        ours = M.perturbation_curve(lambda im: net(im)[:, y[j]], x[j:j + 1], a[j, 0], x[j:j + 1],
                                    torch.zeros_like(x[j:j + 1]), steps=8)
        np.testing.assert_allclose(ours[1:], theirs[j], rtol=1e-5, atol=1e-6)


def test_infidelity_zero_for_exact_linear_attribution_and_hand_value():
    torch.manual_seed(1)
    w = torch.randn(6, 6, dtype=torch.float64)

    def f(x):                                                  # linear, same weight for every channel
        s = (x * w).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], 1)

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 0])
    exact = (3 * w).expand(2, 6, 6)                            # per-pixel sum over channels of the gradient
    assert M.infidelity(f, x, target, exact, normalize=False).abs().max() < 1e-20
    wrong = torch.ones(2, 6, 6, dtype=torch.float64)
    got = M.infidelity(f, x, target, wrong, normalize=False, n_perturb_samples=4)
    # by hand: the same seeded noise, E[(I . a - (f(x) - f(x - I)))^2] per example (Captum repeats each example)
    g = torch.Generator().manual_seed(M.INFIDELITY_SETTINGS["seed"])
    noise = torch.randn((8, 3, 6, 6), generator=g, dtype=torch.float64) * M.INFIDELITY_SETTINGS["noise_std"]
    a = wrong[0].expand(3, 6, 6) / 3
    err = ((noise * a).sum(dim=(1, 2, 3)) - (noise * w).sum(dim=(1, 2, 3))) ** 2
    expected = torch.stack([err[:4].mean(), err[4:].mean()])
    torch.testing.assert_close(got, expected)


def test_max_sensitivity_known_answers():
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64) + 1
    const = M.max_sensitivity(lambda z, target: torch.ones(z.shape[0], 5, 5, dtype=z.dtype), x,
                              target=torch.tensor([0, 1]))
    assert torch.equal(const, torch.zeros(2, dtype=const.dtype))
    ident = M.max_sensitivity(lambda z, target: z, x, target=torch.tensor([0, 1]), perturb_radius=0.1,
                              n_perturb_samples=3)
    g = torch.Generator().manual_seed(M.SENSITIVITY_SETTINGS["seed"])
    delta = (torch.rand((6, 3, 5, 5), generator=g, dtype=torch.float64) * 2 - 1) * 0.1
    ratio = delta.flatten(1).norm(dim=1).view(2, 3) / x.flatten(1).norm(dim=1)[:, None]
    torch.testing.assert_close(ident, ratio.max(dim=1).values.to(ident.dtype))


def test_map_similarity_and_randomisation():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16))
    s = M.map_similarity(a, a)
    assert s["spearman"] == pytest.approx(1) and s["spearman_abs"] == pytest.approx(1) and s["ssim"] == pytest.approx(1)
    assert M.map_similarity(a, -a)["spearman"] == pytest.approx(-1)
    assert M.map_similarity(a, -a)["spearman_abs"] == pytest.approx(1)
    assert M.map_similarity(a, np.ones_like(a))["spearman"] == 0.0
    r = M.randomisation_similarity(a, [a, rng.random((16, 16))])
    assert r["curves"]["spearman"][0] == pytest.approx(1)
    assert abs(r["curves"]["spearman"][1]) < 0.2
    assert r["randomisation_spearman"] == pytest.approx(np.mean(r["curves"]["spearman"]))


def test_per_image_seeds_make_random_metrics_independent_of_the_batch():
    """With ``seeds`` an image's perturbations come from its own generator: by hand for infidelity (the noise of
    a generator seeded with the image's seed), and a batch scores each image as it scores alone."""
    torch.manual_seed(2)
    w = torch.randn(6, 6, dtype=torch.float64)

    def f(x):
        s = (x * w).sum(dim=(1, 2, 3))
        return torch.stack([s, -s], 1)

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 0])
    wrong = torch.ones(2, 6, 6, dtype=torch.float64)
    got = M.infidelity(f, x, target, wrong, normalize=False, n_perturb_samples=3, seeds=[21, 5])
    expected = []
    for seed in (21, 5):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((3, 3, 6, 6), generator=g, dtype=torch.float64) * M.INFIDELITY_SETTINGS["noise_std"]
        expected.append((((noise / 3).sum(dim=(1, 2, 3)) - (noise * w).sum(dim=(1, 2, 3))) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(expected))
    alone = M.infidelity(f, x[1:], target[1:], wrong[1:], normalize=False, n_perturb_samples=3, seeds=[5])
    torch.testing.assert_close(got[1:], alone)
    ident = M.max_sensitivity(lambda z, target: z, x, target=target, perturb_radius=0.1, n_perturb_samples=2,
                              seeds=[21, 5])
    g = torch.Generator().manual_seed(5)
    delta = (torch.rand((2, 3, 6, 6), generator=g, dtype=torch.float64) * 2 - 1) * 0.1
    expected = (delta.flatten(1).norm(dim=1) / x[1].norm()).max()
    torch.testing.assert_close(ident[1], expected.to(ident.dtype))
    with pytest.raises(ValueError, match=r"one seed per image \(2\); got 3"):
        M.infidelity(f, x, target, wrong, n_perturb_samples=2, seeds=[1, 2, 3])
