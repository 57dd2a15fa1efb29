"""Named hook points: swapped in and out with identical outputs, live edits, and the TransformerLens adapter."""
import pytest
import torch

import nha_plugin as nha
from nha_plugin.adapters import get_spec
from nha_plugin.pool import constant_term
from nha_plugin.hooks import HOOK_NAMES, HookedAttentionPool, hooked

from conftest import images_for

SHAPES = {"hook_tokens": (2, 17, 512), "hook_q": (2, 17, 8, 64), "hook_k": (2, 17, 8, 64),
          "hook_v": (2, 17, 8, 64), "hook_attn_scores": (2, 8, 17), "hook_pattern": (2, 8, 17),
          "hook_pair_coeffs": (2, 8, 512), "hook_z": (2, 8, 64), "hook_result": (2, 8, 64), "hook_out": (2, 64)}


def test_hooked_output_equals_original_and_is_restored(tiny64):
    x = images_for(tiny64)
    original = tiny64.visual.attnpool
    with torch.no_grad():
        y = tiny64.encode_image(x)
        seen = {}
        with hooked(tiny64) as pool:
            assert isinstance(tiny64.visual.attnpool, HookedAttentionPool)
            for name in HOOK_NAMES:
                getattr(pool, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
            y_hooked = tiny64.encode_image(x)
    assert tiny64.visual.attnpool is original
    assert torch.allclose(y, y_hooked, atol=1e-12)
    assert {k: tuple(v.shape) for k, v in seen.items()} == SHAPES
    contrib = nha.decompose(tiny64, x)
    assert torch.allclose(seen["hook_pair_coeffs"], contrib.pair_coefficients, atol=1e-12)
    assert torch.allclose(seen["hook_pattern"], contrib.attention, atol=1e-12)


def test_restored_after_exception(tiny64):
    original = tiny64.visual.attnpool
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(tiny64):
            raise RuntimeError("boom")
    assert tiny64.visual.attnpool is original


def test_ablating_pair_coefficients_removes_exactly_those_pairs(tiny64):
    """Zeroing s for head 3 (all neurons) through the hook subtracts head 3's pair contributions."""
    x = images_for(tiny64)
    contrib = nha.decompose(tiny64, x)
    e = torch.randn(64, dtype=torch.float64)
    with torch.no_grad(), hooked(tiny64) as pool:
        def ablate(module, inputs, output):
            output = output.clone()
            output[:, 3] = 0
            return output
        pool.hook_pair_coeffs.register_forward_hook(ablate)
        y_ablated = tiny64.encode_image(x)
    expected = contrib.total_score(e) - contrib.scores(e, "head")[:, 3]
    assert torch.allclose(y_ablated @ e, expected, atol=1e-10)


def test_hook_positions_in_timm_model(timm_rn50):
    tm = timm_rn50
    x = images_for(224, batch=1)
    with torch.no_grad():
        y = tm(x)
        with hooked(tm):
            assert torch.allclose(tm(x), y, atol=1e-10)
    assert not isinstance(tm.head, HookedAttentionPool)


def test_transformer_lens_adapter(tiny64):
    tl_mod = pytest.importorskip("nha_plugin.adapters.transformer_lens")
    from transformer_lens import HookedRootModule
    tl = tl_mod.HookedCLIPResNet(tiny64)
    assert isinstance(tl, HookedRootModule)
    assert "attnpool.hook_pattern" in tl.hook_dict and "hook_layer4" in tl.hook_dict
    x = images_for(tiny64)
    with torch.no_grad():
        y = tiny64.encode_image(x)
        out, cache = tl.run_with_cache(x)
    assert torch.allclose(out, y, atol=1e-12)
    spec = get_spec(tiny64).detached()
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (8, 2, 64) and labels[:2] == ["H0", "H1"]
    assert torch.allclose(heads.sum(0) + spec.c_bias, y, atol=1e-10)
    neurons, nlabels = cache.stack_neuron_results(return_labels=True)
    assert neurons.shape == (512, 2, 64) and nlabels[17] == "N17"
    assert torch.allclose(neurons.sum(0) + constant_term(spec), y, atol=1e-10)
    pairs, plabels = cache.stack_pair_results(heads=[3], neurons=[17, 18], return_labels=True)
    assert plabels == ["H3N17", "H3N18"]
    dense = nha.decompose(tiny64, x).pair_contributions()
    assert torch.allclose(pairs[0], dense[:, 3, 17], atol=1e-12)
    e = torch.randn(64, dtype=torch.float64)
    scores = cache.stack_pair_results(target=e)
    assert torch.allclose(scores.sum(0) + constant_term(spec) @ e, y @ e, atol=1e-10)

    def zero_head(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0
        return pattern
    with torch.no_grad():
        ablated = tl.run_with_hooks(x, fwd_hooks=[("attnpool.hook_pattern", zero_head)])
    assert not torch.allclose(ablated, y)
    # a zero attention row leaves head 0 contributing nothing, bias included
    assert torch.allclose(ablated, y - heads[0], atol=1e-10)
    assert all(len(h._forward_hooks) == 0 for h in tl.hook_dict.values())


def test_hook_values_agree_with_the_decomposition(tiny64):
    """The hooked pool's per-head values (sum_t a v_t through hook_v) equal the decomposition's W_v s_h + b_v^h,
    and its head results the decomposition's head stack plus each head's value bias."""
    x = images_for(tiny64)
    seen = {}
    with torch.no_grad(), hooked(tiny64) as pool:
        for name in ("hook_z", "hook_result", "hook_v"):
            getattr(pool, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
        tiny64.encode_image(x)
    contrib = nha.decompose(tiny64, x)
    spec = get_spec(tiny64).detached()
    H, d = spec.num_heads, spec.head_dim
    wv = spec.v_weight.view(H, d, -1)
    z = torch.einsum("hjn,bhn->bhj", wv, contrib.pair_coefficients) + spec.v_bias.view(H, d)
    assert torch.allclose(seen["hook_z"], z, atol=1e-12)
    value_bias = torch.stack([spec.c_weight[:, i * d:(i + 1) * d] @ spec.v_bias[i * d:(i + 1) * d] for i in range(H)])
    expected = contrib.stack_head_contributions() + value_bias[:, None]
    assert torch.allclose(seen["hook_result"].transpose(0, 1), expected, atol=1e-12)


def test_transformer_lens_cache_agrees_with_contributions(tiny64):
    tl_mod = pytest.importorskip("nha_plugin.adapters.transformer_lens")
    tl = tl_mod.HookedCLIPResNet(tiny64)
    x = images_for(tiny64, batch=3)
    with torch.no_grad():
        _, cache = tl.run_with_cache(x)
    contrib = nha.decompose(tiny64, x)
    cached = cache.contributions()
    for name in ("attention", "pair_coefficients", "features", "positional_embedding"):
        assert torch.allclose(getattr(cached, name), getattr(contrib, name), atol=1e-12), name
    e = torch.randn(64, 4, dtype=torch.float64)
    for target in (None, e):
        neurons, labels = cache.stack_neuron_results(target, neurons=[1, 9], return_labels=True)
        ref, ref_labels = contrib.stack_neuron_contributions(target, neurons=[1, 9], return_labels=True)
        assert labels == ref_labels == ["N1", "N9"] and torch.allclose(neurons, ref, atol=1e-12)
        pairs, labels = cache.stack_pair_results(target, heads=[2], neurons=[5], return_labels=True)
        ref, ref_labels = contrib.stack_pair_contributions(target, heads=[2], neurons=[5], return_labels=True)
        assert labels == ref_labels == ["H2N5"] and torch.allclose(pairs, ref, atol=1e-12)
    heads = cache.stack_head_results(e)
    assert heads.shape == (8, 3, 4)
    assert torch.allclose(heads.sum(0) + get_spec(tiny64).c_bias.detach() @ e, contrib.embedding @ e, atol=1e-10)
    with pytest.raises(KeyError, match="names_filter"):
        tl.run_with_cache(x, names_filter=["attnpool.hook_out"])[1].stack_neuron_results()


def test_transformer_lens_wrapper_never_splits_the_callers_model():
    """Moving the wrapper would move the attention pool it registers but not the trunk: refused before anything
    moves; no-op moves pass; the caller's model keeps running and agreeing; moving the model itself carries the
    wrapper along; train()/eval() leave the model's modules alone."""
    tl_mod = pytest.importorskip("nha_plugin.adapters.transformer_lens")
    from conftest import make_tiny
    model = make_tiny(torch.float64)
    tl = tl_mod.HookedCLIPResNet(model)
    x = images_for(model)
    kinds = [(t.dtype, t.device) for t in [*model.parameters(), *model.buffers()]]
    with torch.no_grad():
        before = model.encode_image(x)
    for move in (lambda m: m.float(), lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.to(torch.float32),
                 lambda m: m.to("meta")):
        with pytest.raises(RuntimeError, match="Move or cast the model itself"):
            move(tl)
    assert [(t.dtype, t.device) for t in [*model.parameters(), *model.buffers()]] == kinds   # nothing moved
    assert tl.double() is tl and tl.to("cpu") is tl and tl.to(torch.float64) is tl       # no-ops pass
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), before, rtol=0, atol=0)   # same call, untouched model
        torch.testing.assert_close(tl(x), before, rtol=0, atol=1e-12 * float(before.abs().max()))
    tl.train()
    assert tl.training and tl.hook_layer4.training and not model.visual.attnpool.training
    tl.eval()
    model.float()                                                       # the caller moves the model: tl follows
    xf = x.float()
    with torch.no_grad():
        y32 = model.encode_image(xf)
        torch.testing.assert_close(tl(xf), y32, rtol=0, atol=1e-5 * float(y32.abs().max()))
        _, cache = tl.run_with_cache(xf)
    assert cache.contributions().completeness_error().max() <= 1e-4
