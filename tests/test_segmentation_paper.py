"""The segmentor's ``preset="paper"`` against the NAD paper's crop logits computed here by a dense loop from the
formulas (per token, per head, per pair; PC0 by the paper's SVD rule), on a tiny model with an attention sink and
one without; and the segmentor's sink handling (keep / interpolate / drop) on the model with a sink."""
import pytest
import torch
import torch.nn.functional as F

from nha_plugin.adapters import get_spec
from nha_plugin.applications import segmentation as S
from nha_plugin.applications.shift import pc0_signs
from nha_plugin.models import decompose
from nha_plugin.stats import collect

from conftest import (images_for, layer4_features, make_sink_model, make_tiny, paper_crop_logits_dense,
                      paper_pcs_dense, pool_tokens_and_attention, scaled_tol)

P, K_PAIRS, TOP = 3, 40, 9          # classes, pairs per class, images per PC0 (odd: no sign tie)


def _layer4(model, x):
    return layer4_features(model, x)


def _tokens_and_attention(model, x):
    """Layer4 features, tokens z (B, T, C) and the class token's attention (B, H, T) from torch's own attention."""
    f = layer4_features(model, x)
    return (f, *pool_tokens_and_attention(model.visual.attnpool, f))


def _paper_pcs(model, images):
    """PC0 of every pair by the paper's SVD rule over ``images`` (conftest.paper_pcs_dense), (H, C, D)."""
    return paper_pcs_dense(model.visual.attnpool, layer4_features(model, images), TOP)


def _paper_logits(model, crops, text, pcs, k):
    """The paper's crop logits (B, P, h, w) by the dense loop of conftest.paper_crop_logits_dense."""
    return paper_crop_logits_dense(model.visual.attnpool, layer4_features(model, crops), text, pcs, k), None


@pytest.fixture(scope="module", params=["sink", "no-sink"])
def case(request):
    model = make_sink_model(torch.float64, seed=2) if request.param == "sink" else make_tiny(torch.float64, seed=3)
    g = torch.Generator().manual_seed(5)
    text = S.centre_texts(torch.randn(P, model.visual.attnpool.c_proj.out_features, generator=g, dtype=torch.float64))
    with torch.no_grad():
        data = images_for(model, batch=24, seed=11)
        pcs = _paper_pcs(model, data)
        signs = pc0_signs(decompose(model, data).pair_coefficients, top=TOP)
        crops = images_for(model, batch=2, seed=12)
    return request.param, model, text, data, pcs, signs, crops


def test_the_model_with_a_sink_has_one_and_the_other_does_not(case):
    name, model, _, data, *_ = case
    with torch.no_grad():
        a = _tokens_and_attention(model, data)[2]
    last = a[:, :, -1]
    if name == "sink":
        assert last.min() > 0.5, "every head of every image should attend mostly to the last token"
    else:
        assert last.mean() < 3 / a.shape[-1]


def test_pc0_signs_follow_the_papers_svd_rule(case):
    _, model, _, data, pcs, signs, _ = case
    spec = get_spec(model)
    from nha_plugin.pool import pair_directions
    orientation = torch.einsum("hnD,hnD->hn", pcs, pair_directions(spec)).sign()
    assert torch.equal(signs, orientation)
    assert (signs == -1).any() and (signs == 1).any()
    with torch.no_grad():
        assert torch.equal(collect(model, [data[:10], data[10:]], k=TOP, progress=False).pc0_sign.to(signs), signs)


def test_paper_preset_reproduces_the_papers_crop_logits(case):
    name, model, text, _, pcs, signs, crops = case
    with torch.no_grad():
        ref, _ = _paper_logits(model, crops, text, pcs, K_PAIRS)
        seg = S.Segmentor(model, text, ["nad"], k=K_PAIRS, preset="paper", pair_signs=signs)
        feats = _layer4(model, crops)
        grid = S.crop_logits(seg.spec, feats, text, ["nad"], seg.mask, seg.k, seg.sink, seg.bias_share,
                             seg.sink_space)["nad"]
        full = seg.crop_logits(crops)["nad"]
    for p in range(P):
        want = set((pcs.reshape(-1, pcs.shape[-1]) @ text[p]).topk(K_PAIRS).indices.tolist())
        assert set(seg.mask[p].flatten().nonzero()[:, 0].tolist()) == want
    assert (seg.crop_size, seg.stride, seg.short_side) == (128, 64, 128)
    torch.testing.assert_close(grid, ref, rtol=0, atol=1e-10 * max(1.0, float(ref.abs().max())))
    up = F.interpolate(ref, size=crops.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, up, rtol=0, atol=1e-10 * max(1.0, float(ref.abs().max())))


def test_nha_maps_differ_from_the_papers_at_the_sink_cell_only_with_the_uniform_share(case):
    name, model, text, _, pcs, signs, crops = case
    with torch.no_grad():
        ref, _ = _paper_logits(model, crops, text, pcs, K_PAIRS)
        uniform = S.Segmentor(model, text, ["nad"], k=K_PAIRS, pair_signs=signs, bias_share="uniform")
        default = S.Segmentor(model, text, ["nad"], k=K_PAIRS, pair_signs=signs)
        feats = _layer4(model, crops)
        got = {s.bias_share: S.crop_logits(s.spec, feats, text, ["nad"], s.mask, s.k, s.sink, s.bias_share,
                                           s.sink_space)["nad"] for s in (uniform, default)}
    tol = scaled_tol(ref, 1e-10)
    other = torch.ones_like(ref, dtype=torch.bool)
    other[..., -1, -1] = False
    assert (got["uniform"] - ref)[other].abs().max() <= tol
    assert (got["uniform"] - ref)[..., -1, -1].abs().min() > 1e3 * tol          # the sink cell differs
    assert (got["attention"] - ref)[other].abs().max() > 1e3 * tol               # the attention share differs anyway


@pytest.fixture(scope="module")
def sink_model():
    model = make_sink_model(torch.float64, seed=2)
    text = S.centre_texts(torch.randn(P, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    return model, text, images_for(model, batch=2, seed=12)


def test_sink_modes_on_a_model_with_a_sink(sink_model):
    model, text, crops = sink_model
    with torch.no_grad():
        feats = _layer4(model, crops)
        out = {}
        for sink in ("keep", "interpolate", "drop"):
            seg = S.Segmentor(model, text, ["nad", "heads", "neurons"], k=K_PAIRS, sink=sink, bias_share="uniform")
            out[sink] = S.crop_logits(seg.spec, feats, text, seg.methods, seg.mask, seg.k, seg.sink, seg.bias_share)
        mask = seg.mask
        _, z, a = _tokens_and_attention(model, crops)
    keep, inter, drop = out["keep"], out["interpolate"], out["drop"]
    for m in ("nad", "heads", "neurons"):                       # only the sink cell changes
        for other in (inter, drop):
            assert torch.equal(other[m][..., :-1, :], keep[m][..., :-1, :])
            assert torch.equal(other[m][..., -1, :-1], keep[m][..., -1, :-1])
        assert (drop[m][..., -1, -1] == 0).all()
    # neurons-only is linear in Z, so its interpolated sink cell is the mean of its neighbours' logits
    g = keep["neurons"]
    torch.testing.assert_close(inter["neurons"][..., -1, -1], (g[..., -1, -2] + g[..., -2, -1] + g[..., -2, -2]) / 3,
                               rtol=0, atol=scaled_tol(g))
    # kept, the sink cell's neuron logit is its own activations summed over the class's pairs
    ref = torch.einsum("bn,pn->bp", feats[..., -1, -1], mask.sum(1)) / K_PAIRS
    torch.testing.assert_close(keep["neurons"][..., -1, -1], ref, rtol=0, atol=scaled_tol(ref))
    # with the uniform share, the sink token carries nearly all of each head's output: kept, its head maps are the
    # cosines of the heads' outputs with the texts, which the interpolation replaces by its neighbours'
    pool = model.visual.attnpool
    H, d = pool.num_heads, pool.v_proj.in_features // pool.num_heads
    v = pool.v_proj(z)
    with torch.no_grad():
        L_keep = S.contribution_head_maps(get_spec(model), feats, text, sink="keep")[..., -1, -1]   # (B, P, H)
        for h in range(H):
            head_out = torch.einsum("bt,btj->bj", a[:, h], v[..., h * d:(h + 1) * d]) @ pool.c_proj.weight[:, h * d:(h + 1) * d].T
            cos = F.normalize(head_out, dim=-1) @ text.T
            assert (L_keep[:, :, h] - cos).abs().max() < 1e-3, "the sink cell should speak for the whole head"


def test_paper_preset_refuses_what_the_paper_does_not_do(sink_model):
    model, text, _ = sink_model
    signs = torch.ones(8, 512, dtype=torch.float64)
    with pytest.raises(ValueError, match="PC0 signs from data"):
        S.Segmentor(model, text, ["nad"], k=10, preset="paper")
    with pytest.raises(ValueError, match="use preset='nha' to vary them"):
        S.Segmentor(model, text, ["nad"], k=10, preset="paper", pair_signs=signs, sink="keep")
    with pytest.raises(ValueError, match="use preset='nha' to vary them"):
        S.Segmentor(model, text, ["nad"], k=10, preset="paper", pair_signs=signs, bias_share="attention")
    with pytest.raises(ValueError, match="paper's window"):
        S.Segmentor(model, text, ["nad"], k=10, preset="paper", pair_signs=signs, stride=32)
    with pytest.raises(ValueError, match="preset must be one of"):
        S.Segmentor(model, text, ["nad"], k=10, preset="papers")
    paper = S.Segmentor(model, text, ["nad"], k=10, preset="paper", pair_signs=signs, sink="interpolate")
    nha = S.Segmentor(model, text, ["nad"], k=10, pair_signs=signs, bias_share="uniform")
    assert (paper.sink, paper.bias_share, paper.sink_space) == ("interpolate", "uniform", "contributions")
    assert paper.identity() != nha.identity() and paper.identity()["preset"] == "paper"
    with pytest.raises(ValueError, match="sink_space must be one of"):
        S.crop_logits(paper.spec, torch.zeros(1, 512, 4, 4, dtype=torch.float64), text, ["nad"], paper.mask,
                      sink_space="vectors")
