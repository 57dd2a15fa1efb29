"""Attention-sink handling on a model that has a sink (conftest.make_sink_model: every head puts most of its class
attention on the last spatial token, as trained CLIP-ResNets do), at token and spatial level, under both bias
conventions: keep is exact, interpolate is the mean of the W, N, NW neighbours, drop is 0, sink_score reports
what was removed, every map stays complete with it, and the maps change at the sink and nowhere else."""
import pytest
import torch

import nha_plugin as nha
from nha_plugin.harness import LinearReadout

from conftest import images_for, make_sink_model, scaled_tol


@pytest.fixture(scope="module")
def sink_model():
    return make_sink_model(torch.float64)


@pytest.fixture(scope="module")
def x(sink_model):
    return images_for(sink_model, batch=3, seed=9)


@pytest.fixture(scope="module")
def e():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)


def _grid(contrib, scores, level):
    """Spatial cells of a map as (B, K, h, w): the token map without its mean token, or the spatial map."""
    return scores[..., 1:].unflatten(-1, contrib.grid) if level == "token" else scores


def test_the_fixture_has_a_sink(sink_model, x):
    attention = nha.decompose(sink_model, x).attention                  # (B, H, T)
    assert attention[..., -1].min() > 0.6                               # ground truth of the construction
    assert (attention[..., -1] > attention[..., :-1].max(dim=-1).values).all()


@pytest.mark.parametrize("bias", ["own", "split"])
@pytest.mark.parametrize("level", ["token", "spatial"])
def test_keep_interpolate_drop(sink_model, x, e, bias, level):
    runs = {sink: nha.decompose(sink_model, x, sink=sink, bias=bias) for sink in ("keep", "interpolate", "drop")}
    maps = {sink: _grid(c, c.scores(e, level), level) for sink, c in runs.items()}
    keep, interp, drop = maps["keep"], maps["interpolate"], maps["drop"]
    tol = scaled_tol(keep, 1e-12)
    others = torch.ones(keep.shape[-2:], dtype=torch.bool)
    others[-1, -1] = False
    for edited in (interp, drop):                                       # nothing but the sink cell moves
        torch.testing.assert_close(edited[..., others], keep[..., others], rtol=0, atol=tol)
    neighbours = (keep[..., -1, -2] + keep[..., -2, -1] + keep[..., -2, -2]) / 3
    torch.testing.assert_close(interp[..., -1, -1], neighbours, rtol=0, atol=tol)
    assert (drop[..., -1, -1] == 0).all()
    # the sink dominates its map: handling it changes the map a lot there
    assert (keep[..., -1, -1] - neighbours).abs().min() > 0.1 * keep.abs().amax(dim=(-1, -2)).min()
    # sink_score is exactly what was removed, and every map is complete with it
    torch.testing.assert_close(runs["keep"].sink_score(e, level=level), torch.zeros_like(neighbours))
    torch.testing.assert_close(runs["interpolate"].sink_score(e, level=level), keep[..., -1, -1] - neighbours,
                               rtol=0, atol=tol)
    torch.testing.assert_close(runs["drop"].sink_score(e, level=level), keep[..., -1, -1], rtol=0, atol=tol)
    for contrib in runs.values():
        assert contrib.completeness_error(e, level=level).max() <= 1e-10


@pytest.mark.parametrize("sink", ["interpolate", "drop"])
def test_captum_maps_handle_the_sink_with_exact_deltas(sink_model, x, e, sink):
    head = LinearReadout(sink_model, e, logit_scale=10.0, normalize=True)
    plain = nha.NeuronHeadAttribution(head).attribute(x, target=1)
    attr, delta = nha.NeuronHeadAttribution(head, sink=sink).attribute(x, target=1, return_convergence_delta=True)
    assert delta.abs().max() <= 1e-10 * head(x).abs().max()
    assert not torch.allclose(attr[..., -1, -1], plain[..., -1, -1])
    torch.testing.assert_close(attr[..., :-1, :], plain[..., :-1, :], rtol=0, atol=scaled_tol(plain, 1e-12))
