"""Intervals and paired comparisons of the benchmark (harness.confidence) against scipy's own bootstrap, the
results.json fields, escaping of user strings in results.md, and strict JSON."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from nha_plugin.harness import confidence as CI
from nha_plugin.harness import registry as HR
from nha_plugin.harness import report
from nha_plugin.harness.runner import BenchmarkConfig


def _close_interval(ours, theirs, values_scale):
    """Percentile endpoints of two bootstraps with different generators agree to Monte-Carlo error: a few
    percent of the interval's width (10,000 resamples each)."""
    width = theirs[1] - theirs[0]
    assert width > 0
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 0.05 * width + 1e-12 * values_scale, (ours, theirs)


def test_mean_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 1.5, size=32)                        # skewed, as per-image scores often are
    rows = [{"index": i, "mass_in_mask": float(v)} for i, v in enumerate(values)]
    scored = CI.statistics_of(rows, ["mass_in_mask"])["mass_in_mask"]
    entry = CI.summary_entry(scored, seed=3)
    ref = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(1)).confidence_interval
    _close_interval(entry["ci95"], (ref.low, ref.high), values.mean())
    assert entry["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert entry["sem"] == pytest.approx(stats.sem(values), rel=1e-12) and entry["n"] == 32
    # seeded: the same seed gives the same interval, another seed a slightly different one
    assert CI.summary_entry(scored, seed=3)["ci95"] == entry["ci95"]
    assert CI.summary_entry(scored, seed=4)["ci95"] != entry["ci95"]


def test_dataset_level_interval_resamples_images_not_pixels():
    """pixAcc = total correct / total labelled over the resampled images: scipy's bootstrap of the same ratio
    of sums over paired per-image counts."""
    rng = np.random.default_rng(2)
    labelled = rng.integers(500, 5000, size=24).astype(float)
    correct = np.floor(labelled * rng.uniform(0.5, 0.99, size=24))
    rows = [{"index": i, "segmentation": {"correct": c, "labelled": n, "inter0": c / 2, "union0": n, "inter1": c / 3,
                                          "union1": n, "ap": 0.5}} for i, (c, n) in enumerate(zip(correct, labelled))]
    scored = CI.statistics_of(rows, [])["pixacc"]
    entry = CI.summary_entry(scored, seed=0)
    assert entry["mean"] == pytest.approx(correct.sum() / labelled.sum(), rel=1e-12) and entry["sem"] is None
    ref = stats.bootstrap((correct, labelled), lambda c, n, axis=-1: c.sum(axis) / n.sum(axis), paired=True,
                          vectorized=True, n_resamples=10_000, method="percentile",
                          random_state=np.random.default_rng(5)).confidence_interval
    _close_interval(entry["ci95"], (ref.low, ref.high), 1.0)


def test_paired_comparison_agrees_with_scipy_and_uses_only_common_images():
    rng = np.random.default_rng(4)
    ref_vals = rng.normal(0.5, 0.2, size=30)
    method_vals = ref_vals + rng.normal(0.05, 0.05, size=30)     # better on most images, correlated with the ref
    # the method was scored on images 0..29 in another order; the reference on 0..29 plus two extra images
    order = rng.permutation(30)
    method_rows = [{"index": int(i), "pointing_game": float(method_vals[i])} for i in order]
    ref_rows = [{"index": i, "pointing_game": float(v)} for i, v in enumerate(ref_vals)]
    ref_rows += [{"index": 30, "pointing_game": 100.0}, {"index": 31, "pointing_game": -100.0}]
    m = CI.statistics_of(method_rows, ["pointing_game"])["pointing_game"]
    r = CI.statistics_of(ref_rows, ["pointing_game"])["pointing_game"]
    cmp = CI.paired_comparison(m, r, seed=0, higher_is_better=True)
    diff = method_vals - ref_vals
    assert cmp["n_pairs"] == 30 and cmp["difference"] == pytest.approx(diff.mean(), rel=1e-12)
    ref = stats.bootstrap((method_vals, ref_vals), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), paired=True,
                          vectorized=True, n_resamples=10_000, method="percentile",
                          random_state=np.random.default_rng(9)).confidence_interval
    _close_interval(cmp["ci95"], (ref.low, ref.high), 1.0)
    assert cmp["ci95"][0] > 0 and cmp["verdict"] == "better"
    # the same difference on a lower-is-better metric is worse; a method against itself is no clear difference
    assert CI.paired_comparison(m, r, seed=0, higher_is_better=False)["verdict"] == "worse"
    same = CI.paired_comparison(r, r, seed=0, higher_is_better=True)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "no clear difference"
    # an unpaired bootstrap would be far wider: the pairing removes the images' shared variation
    unpaired = stats.bootstrap((method_vals,), np.mean, n_resamples=2000, method="percentile",
                               random_state=np.random.default_rng(0)).confidence_interval
    assert cmp["ci95"][1] - cmp["ci95"][0] < 0.5 * (unpaired.high - unpaired.low)


@pytest.fixture
def odd_method():
    name = "odd | <b>name</b>\nx"
    HR.register_method(name, family="user", description="a | pipe and <script>alert(1)</script>")(
        lambda forward, images, target: images.mean(1))
    yield name
    HR.METHODS.pop(name, None)


def _records(n, scale):
    rng = np.random.default_rng(int(scale * 10))
    return [{"index": i, "pointing_game": float(rng.random() < 0.3 + 0.4 * scale), "mass_in_mask": rng.random() * scale,
             "seconds_per_image": 0.01, "segmentation": {"correct": 90.0, "labelled": 100.0, "inter0": 40.0,
                                                         "union0": 60.0, "inter1": 30.0, "union1": 50.0,
                                                         "ap": math.nan if i == 0 else 0.5 * scale}}
            for i in range(n)]


def test_results_fields_escaping_and_strict_json(odd_method):
    cfg = BenchmarkConfig(seed=7)
    classes = ["cat | dog", "<img src=x onerror=alert(1)>"]
    records = {"nad_spatial": _records(12, 1.0), odd_method: _records(12, 0.2), "centre": _records(12, 0.5)}
    results = report.summarise(cfg, records, "scenes in /tmp/a|b", 0.5, classes)
    text = json.dumps(results, allow_nan=False)                   # strict JSON: no NaN anywhere
    assert json.loads(text)["format"] == report.FORMAT
    assert results["protocol"]["statistics"]["reference"] == "nad_spatial"
    assert results["metrics"]["deletion_auc"]["direction"] == "lower"
    nad = results["methods"]["nad_spatial"]
    assert "vs_reference" not in nad
    for key in ("pointing_game", "mass_in_mask", "pixacc", "miou", "map"):
        e = nad[key]
        assert e["ci95"][0] <= e["mean"] <= e["ci95"][1] and e["n"] == 12, key
    assert nad["map"]["mean"] == pytest.approx(0.5) and nad["pixacc"]["sem"] is None   # image 0 (AP NaN) left out
    vs = results["methods"][odd_method]["vs_reference"]
    assert vs["reference"] == "nad_spatial" and vs["metrics"]["mass_in_mask"]["verdict"] == "worse"
    assert vs["metrics"]["mass_in_mask"]["n_pairs"] == 12
    md = report.markdown(results)
    assert "<script>" not in md and "<b>" not in md and "<img" not in md
    # every table row of results.md has as many cells as its header (no cell split by a user's pipe)
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            cells = {len([c for c in _split_cells(ln)]) for ln in rows}
            assert len(cells) == 1, block
    assert "odd \\| &lt;b&gt;name&lt;/b&gt; x" in md and "cat \\| dog" in md


def _split_cells(line):
    """Cells of a Markdown table row: split on pipes not escaped with a backslash."""
    out, cur, prev = [], "", ""
    for ch in line.strip().strip("|"):
        if ch == "|" and prev != "\\":
            out.append(cur)
            cur = ""
        else:
            cur += ch
        prev = ch
    return out + [cur]
