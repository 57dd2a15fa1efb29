"""Benchmark figures (harness.figures): colour limits against numpy's percentiles, signed maps detected, and
figures drawn with user strings that mathtext would choke on."""
import numpy as np
import pytest

from nha_plugin.harness import figures as FIG
from nha_plugin.harness.data import BenchItem


def test_colour_limits_and_signed_detection():
    rng = np.random.default_rng(0)
    heat = rng.standard_cauchy((32, 32))                            # heavy tails: a few extreme pixels
    lo, hi = FIG.colour_limits(heat, signed=True)
    assert hi == pytest.approx(np.percentile(np.abs(heat), 99.5), rel=1e-12) and lo == -hi
    assert hi < np.abs(heat).max()                                  # the extremes do not set the scale
    pos = np.abs(heat)
    assert FIG.colour_limits(pos, signed=False) == pytest.approx((pos.min(), np.percentile(pos, 99.5)), rel=1e-12)
    assert FIG.is_signed([None, heat]) and not FIG.is_signed([pos, None])
    assert not FIG.is_signed([pos - 1e-9 * pos.max()])              # rounding below 0 is not a sign


def test_figures_with_odd_user_strings(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.zeros((16, 16), bool)
    mask[4:10, 4:10] = True
    items = [BenchItem(i, rng.random((16, 16, 3)), mask, label) for i, label in enumerate(["$x^{", "a\\b | <c>"])]
    maps = {"signed $m": rng.standard_normal((16, 16)), "unsigned": rng.random((16, 16))}
    path = FIG.heatmap_grid(items, list(maps) + ["absent"], lambda m, i: maps.get(m), tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {"methods": {
        "a$": {"family": "nad", "completeness_error": {"mean": 1e-12, "ci95": [5e-13, 2e-12]}},
        "b": {"family": "zennit", "completeness_error": {"mean": 0.3, "ci95": [0.2, None]}}}}
    paths = FIG.metric_charts(results, tmp_path)
    assert [p.name for p in paths] == ["metric_completeness_error.png"]
