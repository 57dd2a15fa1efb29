"""Method registry: every method through one interface, checked against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin import harness as HM
from nha_plugin.harness.captum_methods import CaptumSettings, gradient_shap
from nha_plugin.harness.randomise import STAGES, randomised_copy
from nha_plugin.harness.runner import DEFAULT_METHODS
from nha_plugin.readout import LinearReadout

from conftest import images_for


@pytest.fixture(scope="module")
def head32(tiny32):
    g = torch.Generator().manual_seed(3)
    return LinearReadout(tiny32, F.normalize(torch.randn(64, 5, generator=g), dim=0), logit_scale=100.0)


@pytest.fixture(scope="module")
def head64(tiny64):
    g = torch.Generator().manual_seed(3)
    return LinearReadout(tiny64, F.normalize(torch.randn(64, 5, generator=g, dtype=torch.float64), dim=0),
                         logit_scale=100.0)


CHEAP = CaptumSettings(ig_steps=4, gradshap_samples=2, occlusion_window=64)


def test_every_method_same_contract(head32):
    x = images_for(128, batch=1, dtype=torch.float32)
    target = torch.tensor([1])
    names = HM.available_methods()
    assert set(DEFAULT_METHODS) <= set(names)
    expensive = {"integrated_gradients", "layer_integrated_gradients", "occlusion", "gradient_shap", "lrp_zennit"}
    resnet_methods = [n for n in names if HM.get_method(n).family != "vit"]   # ViT methods refuse a ResNet
    assert len(resnet_methods) < len(names)
    for name in resnet_methods:
        ex = HM.explain(name, head32, x, target, captum=CHEAP)
        assert ex.maps.shape == (1, 128, 128) and ex.maps.dtype == torch.float32, name
        assert torch.isfinite(ex.maps).all(), name
        assert ex.seconds > 0
        assert (ex.completeness_error is not None) == HM.get_method(name).claims_completeness, name
        if HM.get_method(name).target_dependent and name not in expensive and ex.maps.abs().sum() > 0:
            other = HM.explain(name, head32, x, torch.tensor([0]), captum=CHEAP).maps
            assert not torch.allclose(other, ex.maps), f"{name} ignores the target"


def test_batched_targets_equal_one_by_one(head32):
    x = images_for(128, batch=2, dtype=torch.float32, seed=5)
    for name in ("nad_spatial", "maskclip", "gradcam"):
        both = HM.explain(name, head32, x, torch.tensor([1, 3])).maps
        one = torch.cat([HM.explain(name, head32, x[i:i + 1], t).maps for i, t in ((0, 1), (1, 3))])
        torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-5)


def test_nad_completeness_and_sink(head32):
    x = images_for(128, batch=2, dtype=torch.float32)
    for name in ("nad_spatial", "nad_spatial_interp"):
        ex = HM.explain(name, head32, x, torch.tensor([2, 4]))
        assert ex.completeness_error.max() < 1e-4
    keep = HM.explain("nad_spatial", head32, x, 2).raw
    interp = HM.explain("nad_spatial_interp", head32, x, 2).raw
    assert torch.allclose(keep[..., :-1], interp[..., :-1])
    assert torch.allclose(interp[..., -1, -1], (keep[..., -1, -2] + keep[..., -2, -1] + keep[..., -2, -2]) / 3)


def _dense_pool(model, x):
    """The attention pool computed densely from the model's own modules, independently of nha_plugin.pool:
    torch's multi-head attention for the per-head class attention a (B, H, T) and the output y (B, D), and per
    head the value path W_o^h W_v^h of any (B, T, C) tokens as a (B, H, T, D) table."""
    pool = model.visual.attnpool
    with torch.no_grad():
        feats = nha.adapters.get_spec(model).trunk(x)                        # (B, C, h, w)
        flat = feats.flatten(2).permute(2, 0, 1)                              # (hw, B, C)
        t = torch.cat([flat.mean(0, keepdim=True), flat]) + pool.positional_embedding[:, None]
        y, a = F.multi_head_attention_forward(
            t[:1], t, t, t.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            average_attn_weights=False)
    H = pool.num_heads
    d = pool.v_proj.weight.shape[0] // H

    def value_path(tokens, bias=False):
        out = []
        for h in range(H):
            hs = slice(h * d, (h + 1) * d)
            v = tokens @ pool.v_proj.weight[hs].T + (pool.v_proj.bias[hs] if bias else 0)
            out.append(v @ pool.c_proj.weight[:, hs].T)
        return torch.stack(out, dim=1)

    return feats, t.permute(1, 0, 2), a[:, :, 0], y[0], value_path


def test_nad_maps_against_dense_attention_pool(head64, tiny64):
    """nad_spatial, nad_heads and nad_neurons against their definitions (docs/methods.md §1) computed densely
    from the model's modules and torch's attention, and nad_spatial's completeness against the model's logit."""
    x = images_for(tiny64, batch=2)
    t = torch.tensor([0, 3])
    feats, z, a, y, value_path = _dense_pool(tiny64, x)
    B, C, h, w = feats.shape
    e = head64.readout[:, t].T                                               # (B, D)
    f = 100.0 / y.norm(dim=-1)                                               # cosine read-out, logit scale 100
    with torch.no_grad():
        F_t = feats.flatten(2).transpose(1, 2)                               # (B, hw, C)
        per_cell = torch.einsum("bhtd,bd->bht", value_path(F_t), e)          # e . W_o^h W_v^h F_t
        # spatial: each cell's own term plus 1/hw of the mean token's spatial part, per head
        spatial = ((a[:, :, 1:] + a[:, :, :1] / (h * w)) * per_cell).sum(1) * f[:, None]
        heads = (a * torch.einsum("bhtd,bd->bht", value_path(z, bias=True), e)).sum(1)[:, 1:]   # tokens 1..hw
        neurons = (a[:, :, 1:].mean(-1, keepdim=True) * per_cell).sum(1) * f[:, None]
        logit = head64(x).gather(1, t[:, None])[:, 0]
        pos = (a * torch.einsum("bhtd,bd->bht", value_path(tiny64.visual.attnpool.positional_embedding[None]
                                                           .expand(B, -1, -1)), e)).sum((1, 2))
        bias = torch.einsum("bhd,bd->b", value_path(torch.zeros(B, 1, C, dtype=x.dtype), bias=True)[:, :, 0], e)
        bias = bias + e @ tiny64.visual.attnpool.c_proj.bias
    got = HM.explain("nad_spatial", head64, x, t)
    torch.testing.assert_close(got.raw.reshape(B, -1), spatial, rtol=1e-9, atol=1e-10)
    # the map plus the positional and bias terms is the model's own logit
    torch.testing.assert_close(got.raw.reshape(B, -1).sum(1) + (pos + bias) * f, logit, rtol=1e-9, atol=1e-9)
    assert got.completeness_error.max() < 1e-9
    # heads and neurons maps: the sink cell (the last) is interpolated, the others are the definition
    got_heads = HM.explain("nad_heads", head64, x, t).raw.reshape(B, -1)
    torch.testing.assert_close(got_heads[:, :-1], (heads * f[:, None])[:, :-1], rtol=1e-9, atol=1e-10)
    got_neurons = HM.explain("nad_neurons", head64, x, t).raw.reshape(B, -1)
    torch.testing.assert_close(got_neurons[:, :-1], neurons[:, :-1], rtol=1e-9, atol=1e-10)
    for got_map in (got_heads, got_neurons):                                 # W, N, NW neighbours of the sink
        grid = got_map.view(B, h, w)
        torch.testing.assert_close(grid[:, -1, -1], (grid[:, -1, -2] + grid[:, -2, -1] + grid[:, -2, -2]) / 3)


def test_maskclip_as_1x1_convolutions(head64, tiny64):
    """MaskCLIP's own implementation: v_proj and c_proj as 1x1 convolutions on the layer4 map, cosine with text."""
    x = images_for(tiny64, batch=2)
    pool = tiny64.visual.attnpool
    with torch.no_grad():
        feats = nha.adapters.get_spec(tiny64).trunk(x)
        v = F.conv2d(feats, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
        o = F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
        e = head64.readout[:, [2, 2]].T
        expected = (F.normalize(o, dim=1) * F.normalize(e, dim=1)[:, :, None, None]).sum(1)
    assert torch.allclose(HM.explain("maskclip", head64, x, 2).raw, expected, atol=1e-12)


def test_self_self_with_sdpa(head64, tiny64):
    x = images_for(tiny64, batch=1)
    spec = nha.adapters.get_spec(tiny64).detached()
    with torch.no_grad():
        feats = spec.trunk(x)
        flat = feats.flatten(2).transpose(1, 2)
        z = torch.cat([flat.mean(1, keepdim=True), flat], 1) + spec.positional_embedding
        H = spec.num_heads

        def split(w, b):
            return (z @ w.T + b).view(1, -1, H, spec.head_dim).transpose(1, 2)

        q, k, v = split(spec.q_weight, spec.q_bias), split(spec.k_weight, spec.k_bias), split(spec.v_weight, spec.v_bias)
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        y = out.transpose(1, 2).reshape(1, -1, spec.num_neurons) @ spec.c_weight.T + spec.c_bias
        expected = F.cosine_similarity(y[0, 1:], head64.readout[:, 4][None], dim=-1).view(feats.shape[-2:])
    assert torch.allclose(HM.explain("self_self", head64, x, 4).raw[0], expected, atol=1e-10)


def test_class_attention_matches_torch_mha(head64, tiny64):
    x = images_for(tiny64, batch=2)
    feats, _, a, _, _ = _dense_pool(tiny64, x)                             # a: (B, H, T), torch's attention
    expected = a.mean(1)[:, 1:].view(2, *feats.shape[-2:])                  # averaged over heads, cells only
    assert torch.allclose(HM.explain("class_attention", head64, x, 0).raw, expected, atol=1e-12)


def test_floors():
    x = images_for(64, batch=2, dtype=torch.float32, seed=1)
    c = HM.explain("centre", None, x, 0).maps
    assert c.shape == (2, 64, 64) and torch.equal(c[0], c[1])
    r, col = divmod(int(c[0].argmax()), 64)
    assert {r, col} <= {31, 32}
    a, b = HM.explain("random", None, x, 0).maps, HM.explain("random", None, x, 0).maps
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])


def test_register_a_method_in_a_few_lines(head32):
    @HM.register_method("test_grad_norm", description="L2 norm of the input gradient")
    def grad_norm(forward, images, target):
        x = images.clone().requires_grad_(True)
        forward(x).gather(1, target[:, None]).sum().backward()
        return x.grad.norm(dim=1)

    try:
        x = images_for(128, batch=1, dtype=torch.float32)
        ex = HM.explain("test_grad_norm", head32, x, 1)
        sal = HM.explain("saliency", head32, x, 1)
        assert ex.maps.shape == sal.maps.shape and (ex.maps <= sal.maps + 1e-6).all()   # ||g||_2 <= ||g||_1
        with pytest.raises(ValueError, match="already registered"):
            HM.register_method("test_grad_norm")(grad_norm)
    finally:
        HM.registry.METHODS.pop("test_grad_norm", None)
    with pytest.raises(KeyError, match="unknown method"):
        HM.get_method("test_grad_norm")


def test_randomised_copy_is_cascading(head32):
    orig = head32.model.visual
    one = randomised_copy(head32, 1).model.visual
    assert not torch.equal(one.attnpool.q_proj.weight, orig.attnpool.q_proj.weight)
    assert torch.equal(one.layer4[0].conv1.weight, orig.layer4[0].conv1.weight)
    allr = randomised_copy(head32, len(STAGES)).model.visual
    assert not torch.equal(allr.conv1.weight, orig.conv1.weight)
    assert not torch.equal(allr.layer1[0].conv1.weight, orig.layer1[0].conv1.weight)
    w = allr.layer3[0].conv2.weight
    assert math.isclose(float(w.std()), float(orig.layer3[0].conv2.weight.std()), rel_tol=0.2)


def test_gradient_shap_is_seeded_whatever_the_global_state_and_restores_it(head32):
    """Captum's GradientShap samples with numpy's and torch's global generators; the harness seeds both per
    image and gives the caller both states back."""
    import numpy as np
    x = images_for(128, batch=2, dtype=torch.float32)
    np.random.seed(7)
    torch.manual_seed(7)
    np_before, torch_before = np.random.get_state(), torch.get_rng_state()
    a = gradient_shap(head32, x, torch.tensor([0, 1]), captum=CHEAP)
    np_after = np.random.get_state()
    same = np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1]) and np_after[2:] == np_before[2:]
    assert same, "the caller's numpy state must be restored"
    assert torch.equal(torch.get_rng_state(), torch_before), "the caller's torch state must be restored"
    np.random.rand(123)
    torch.rand(77)
    b = gradient_shap(head32, x, torch.tensor([0, 1]), captum=CHEAP)
    assert torch.equal(a, b)
    # through explain with per-image seeds: image b depends only on its seed, not on its batch mates
    both = HM.explain("gradient_shap", head32, x, torch.tensor([0, 1]), captum=CHEAP, seeds=[11, 12]).raw
    second = HM.explain("gradient_shap", head32, x[1:], torch.tensor([1]), captum=CHEAP, seeds=[12]).raw
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)
    other = HM.explain("gradient_shap", head32, x[1:], torch.tensor([1]), captum=CHEAP, seeds=[13]).raw
    assert not torch.allclose(other, second)


def test_lrp_without_zennit_is_unavailable_and_says_what_to_install(monkeypatch):
    """The package imports the LRP family through a guard: with zennit missing, lrp_zennit is not registered and
    asking for it names the extra to install; any other import failure would propagate."""
    import sys
    from nha_plugin.harness import registry as HR
    monkeypatch.setitem(sys.modules, "zennit", None)                      # import zennit -> ImportError
    for name in ("nha_plugin.harness.lrp", "nha_plugin.adapters.zennit"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delitem(HR.METHODS, "lrp_zennit", raising=False)
    monkeypatch.setattr(HR, "UNAVAILABLE", {})
    assert not HR.import_family("nha_plugin.harness.lrp", ("lrp_zennit",), needs="zennit", extra="zennit")
    assert "lrp_zennit" not in HM.available_methods()
    with pytest.raises(HM.MethodUnavailableError, match=r"lrp_zennit.*pip install 'nha-plugin\[zennit\]'"):
        HM.explain("lrp_zennit", None, torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ModuleNotFoundError):                              # not a missing extra: propagates
        HR.import_family("nha_plugin.harness.no_such_family", ("x",), needs="numpy", extra="x")
