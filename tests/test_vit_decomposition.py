"""The CLIP-ViT spec, trace and exact decomposition, checked against open_clip's own modules."""
import copy

import open_clip
import pytest
import torch
from torch import nn

from nha_plugin import vit
from nha_plugin.vit.decomposition import LEVELS

from conftest import TINY_VIT_CFG, images_for, make_tiny, make_tiny_vit, randomise_vit

BLOCK_TYPES = ("default", "custom")


@pytest.fixture(scope="module", params=BLOCK_TYPES)
def model(request, tiny_vit64, tiny_vit64_custom):
    return tiny_vit64 if request.param == "default" else tiny_vit64_custom


@pytest.fixture(scope="module")
def x():
    return images_for(64, batch=3)


def _capture(visual, images):
    """Inputs/outputs of the real modules, recorded by forward hooks (removed afterwards)."""
    rec = {"ln_1": [], "attn": [], "mlp": []}
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: rec.__setitem__("ln_pre", o)),
             visual.ln_post.register_forward_pre_hook(lambda m, i: rec.__setitem__("ln_post_in", i[0]))]
    for blk in visual.transformer.resblocks:
        hooks.append(blk.ln_1.register_forward_hook(lambda m, i, o: rec["ln_1"].append(o)))
        hooks.append(blk.attn.register_forward_hook(
            lambda m, i, o: rec["attn"].append(o[0] if isinstance(o, tuple) else o)))
        hooks.append(blk.mlp.register_forward_hook(lambda m, i, o: rec["mlp"].append(o)))
    try:
        with torch.no_grad():
            rec["output"] = visual(images)
    finally:
        for h in hooks:
            h.remove()
    return rec


def _attention_module_output(attn, inputs):
    """An attention module (torch's or open_clip's) on LayerNorm-1 outputs (B, N, W)."""
    if isinstance(attn, nn.MultiheadAttention):
        return attn(inputs, inputs, inputs, need_weights=False)[0]
    return attn(inputs)


def _frozen_ln_map(visual, stream, share, mu, sigma):
    """Independent statement of the METHODS.md B convention: (gamma (c - share mu)/sigma + share beta) P."""
    ln = visual.ln_post
    return (ln.weight * (stream - share * mu[:, None]) / sigma[:, None] + share * ln.bias) @ visual.proj


def _post_stats(rec):
    cls = rec["ln_post_in"][:, 0]
    return cls.mean(-1), torch.sqrt(cls.var(-1, unbiased=False) + 1e-5)


# ---- spec and trace ------------------------------------------------------------------------------------
def test_trace_equals_encode_image_and_real_intermediates(model, x):
    tr = vit.trace(model, x)
    rec = _capture(model.visual, x)
    assert (tr.output - model.encode_image(x)).abs().max() <= 1e-10
    assert torch.allclose(tr.embedding, rec["ln_pre"], atol=1e-12)
    spec = vit.vit_spec(model)
    L, N, W, M = spec.layers, spec.tokens, spec.width, spec.mlp_width
    assert (L, spec.heads, N, W, spec.output_dim, spec.grid) == (3, 4, 17, 64, 32, (4, 4))
    for l in range(L):
        block = spec.blocks[l]
        normed = block.ln_1.normalize(tr.x_in[l], tr.ln1_mean[l], tr.ln1_std[l])
        assert torch.allclose(normed, rec["ln_1"][l], atol=1e-12)
        assert tr.mlp_hidden[l].shape == (3, N, M)
        assert torch.allclose(tr.x_mid[l] - tr.x_in[l], rec["attn"][l], atol=1e-12)  # ls_1 is Identity here
        nxt = tr.x_in[l + 1] if l + 1 < L else tr.x_out
        assert torch.allclose(nxt - tr.x_mid[l], rec["mlp"][l], atol=1e-12)
    mu, sigma = _post_stats(rec)
    assert torch.allclose(tr.post_mean, mu, atol=1e-12) and torch.allclose(tr.post_std, sigma, atol=1e-12)


def _torch_attention_probs(block, inputs):
    """Per-head probabilities (B, H, N, N) from torch's nn.MultiheadAttention holding the block's weights."""
    mha = block.attn
    if not isinstance(mha, nn.MultiheadAttention):   # open_clip Attention: same weights in torch's module
        mha = nn.MultiheadAttention(64, block.attn.num_heads, batch_first=True).double()
        mha.load_state_dict({"in_proj_weight": block.attn.in_proj_weight, "in_proj_bias": block.attn.in_proj_bias,
                             "out_proj.weight": block.attn.out_proj.weight, "out_proj.bias": block.attn.out_proj.bias})
    with torch.no_grad():
        return mha(inputs, inputs, inputs, need_weights=True, average_attn_weights=False)[1]


def test_attention_probabilities_match_torch_multihead_attention(model, x):
    tr = vit.trace(model, x)
    rec = _capture(model.visual, x)
    for l, block in enumerate(model.visual.transformer.resblocks):
        probs = _torch_attention_probs(block, rec["ln_1"][l])
        assert probs.shape == tr.attn[l].shape == (3, 4, 17, 17)
        assert (probs - tr.attn[l]).abs().max() <= 1e-12


def _variant(seed=0, **vision):
    torch.manual_seed(seed)
    cfg = dict(TINY_VIT_CFG, vision_cfg=dict(TINY_VIT_CFG["vision_cfg"], **vision))
    model = randomise_vit(open_clip.model.CLIP(**cfg), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():   # open_clip initialises these to ones / constants; random values test the folding
        for name, p in model.visual.named_parameters():
            if name.endswith("head_scale") or name.endswith("ls_1.gamma") or name.endswith("ls_2.gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval().double()


@pytest.mark.parametrize("options", [dict(qk_norm=True, scale_heads=True), dict(ls_init_value=0.3),
                                     dict(no_ln_pre=True, final_ln_after_pool=True)])
def test_supported_options_are_exact(options, x):
    model = _variant(**options)
    c = vit.decompose(model, x)
    assert (vit.trace(model, x).output - model.encode_image(x)).abs().max() <= 1e-10
    assert c.completeness_error().max() <= 1e-10
    assert c.completeness_error(torch.randn(32, dtype=torch.float64), level="spatial").max() <= 1e-10


def test_without_output_projection(x):
    visual = copy.deepcopy(make_tiny_vit(torch.float64).visual)
    visual.proj = None                                          # what prune_intermediate_layers leaves
    c = vit.decompose(visual, x)
    assert c.embedding.shape == (3, 64) and (c.embedding - visual(x)).abs().max() <= 1e-10
    assert c.completeness_error(torch.randn(64, dtype=torch.float64), level="token").max() <= 1e-10


def test_scaled_cosine_attention_pattern(x):
    """open_clip 3.3.0's scaled-cosine forward calls bmm on 4-D tensors and fails, so the pattern is checked
    against the formula it implements, evaluated per (image, head) with torch's layer_norm and bmm."""
    model = _variant(scaled_cosine_attn=True)
    visual = model.visual
    with torch.no_grad():
        model.visual.transformer.resblocks[0].attn.logit_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 5.0]).view(4, 1, 1))
        tr = vit.trace(model, x)
        block = visual.transformer.resblocks[0]
        stream = visual.ln_pre(torch.cat([visual.class_embedding.expand(3, 1, -1),
                                          visual.conv1(x).flatten(2).transpose(1, 2)], 1) + visual.positional_embedding)
        q, k, _ = nn.functional.linear(block.ln_1(stream), block.attn.in_proj_weight,
                                       block.attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(3, 17, 4, 16).transpose(1, 2).reshape(12, 17, 16) for t in (q, k))
        logits = torch.bmm(nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1).transpose(1, 2))
        scale = torch.clamp(block.attn.logit_scale, max=block.attn.logit_scale_max).exp().repeat(3, 1, 1)
        ref = (logits * scale).softmax(-1).view(3, 4, 17, 17)
    assert (tr.attn[0] - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("options, match", [
    (dict(pool_type="avg"), "pool_type='avg'"),
    (dict(attentional_pool=True), "attentional pooling"),
    (dict(scale_attn_inner=True), "ln_inner"),
    (dict(scale_attn=True), "ln_attn"),
    (dict(scale_fc=True), "scale_fc"),
])
def test_unsupported_options_refused(options, match):
    with pytest.raises(vit.UnsupportedModelError, match=match):
        vit.vit_spec(_variant(**options))


def test_refusals_say_what_to_do(x):
    with pytest.raises(vit.UnsupportedModelError, match="nha_plugin.decompose"):
        vit.vit_spec(make_tiny(torch.float64))
    with pytest.raises(vit.UnsupportedModelError, match="VisionTransformer"):
        vit.vit_spec(nn.Linear(2, 2))
    dropping = _variant(patch_dropout=0.5).train()
    with pytest.raises(vit.UnsupportedModelError, match="eval"):
        vit.vit_spec(dropping)
    model = make_tiny_vit(torch.float64)
    with pytest.raises(ValueError, match="64x64"):
        vit.decompose(model, images_for(96, 1))
    with pytest.raises(TypeError, match="float64"):
        vit.decompose(model, x.float())
    with pytest.raises(ValueError, match="unsqueeze"):
        vit.trace(model, x[0])


# ---- exact decomposition -------------------------------------------------------------------------------
TARGETS = {"single": (32,), "set": (32, 5), "per_image": (3, 32)}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_completeness_every_level_and_target_form(dtype, tol):
    g = torch.Generator().manual_seed(3)
    for block_type in BLOCK_TYPES:
        model = make_tiny_vit(dtype, block_type=block_type)
        c = vit.decompose(model, images_for(64, batch=3, dtype=dtype))
        assert (c.embedding - model.encode_image(images_for(64, batch=3, dtype=dtype))).abs().max() <= tol
        for level in LEVELS:
            assert c.completeness_error(level=level).max() <= tol, (block_type, level)
            for kind, shape in TARGETS.items():
                t = torch.randn(*shape, generator=g).to(dtype)
                assert c.completeness_error(t, level=level).max() <= tol, (block_type, level, kind)


def test_scores_agree_with_dense_components(model, x):
    c = vit.decompose(model, x)
    E = torch.randn(32, 5, dtype=torch.float64)
    tokens = c.token_contributions()                                  # (B, L, H, N, D)
    heads = c.head_contributions()                                    # (B, L, H, D)
    assert tokens.shape == (3, 3, 4, 17, 32) and heads.shape == (3, 3, 4, 32)
    assert torch.allclose(tokens.sum(dim=3), heads, atol=1e-13)
    assert torch.allclose(c.scores(E, level="token"), torch.einsum("blhnD,Dk->bklhn", tokens, E), atol=1e-12)
    assert torch.allclose(c.scores(E, level="head"), torch.einsum("blhD,Dk->bklh", heads, E), atol=1e-12)
    comps = torch.stack([c.embedding_term, *[t for l in range(3) for t in (heads[:, l].sum(1), c.mlp[:, l])]], 1)
    assert torch.allclose(c.scores(E, level="layer"), torch.einsum("bcD,Dk->bkc", comps, E), atol=1e-12)
    spatial = torch.einsum("blhnD,Dk->bkn", tokens[..., 1:, :], E).view(3, 5, 4, 4)
    assert torch.allclose(c.scores(E, level="spatial"), spatial, atol=1e-12)
    cos = c.scores(E[:, 0], level="spatial", normalize=True).flatten(1).sum(1) + \
        c.rest_score(E[:, 0], level="spatial", normalize=True)
    assert torch.allclose(cos, torch.cosine_similarity(c.model_embedding, E[:, 0][None], dim=-1), atol=1e-12)


def test_components_match_the_real_modules_through_frozen_ln(model, x):
    """LN-share convention: the embedding, each MLP and each attention layer (= the sum of its token x head
    entries) equal the model's own branch outputs (captured by hooks) mapped through the frozen LN_post."""
    c = vit.decompose(model, x)
    rec = _capture(model.visual, x)
    mu, sigma = _post_stats(rec)
    K = 2 * 3 + 1
    assert torch.allclose(c.embedding_term, _frozen_ln_map(model.visual, rec["ln_pre"][:, 0], 1 / K, mu, sigma),
                          atol=1e-12)
    tokens = c.token_contributions()
    for l in range(3):
        attn_layer = _frozen_ln_map(model.visual, rec["attn"][l][:, 0], 1 / K, mu, sigma)
        assert torch.allclose(tokens[:, l].sum(dim=(1, 2)), attn_layer, atol=1e-12)
        assert torch.allclose(c.mlp[:, l], _frozen_ln_map(model.visual, rec["mlp"][l][:, 0], 1 / K, mu, sigma),
                              atol=1e-12)


def _zero_head_values(block, h, d):
    """A copy of the block's attention module whose head h has zero value weights and bias."""
    attn = copy.deepcopy(block.attn)
    W = attn.in_proj_weight.shape[1]
    with torch.no_grad():
        attn.in_proj_weight[2 * W + h * d: 2 * W + (h + 1) * d] = 0
        attn.in_proj_bias[2 * W + h * d: 2 * W + (h + 1) * d] = 0
    return attn


def test_head_contributions_match_value_ablation_of_the_real_module(model, x):
    """Independent dense reference: zeroing one head's value rows in a copy of the block's own attention module
    removes exactly that head's output; mapped through the frozen LN (with the head's b_o and LN shares) it is
    the head's contribution."""
    c = vit.decompose(model, x)
    rec = _capture(model.visual, x)
    mu, sigma = _post_stats(rec)
    heads = c.head_contributions()
    H, d, K = 4, 16, 7
    for l, block in enumerate(model.visual.transformer.resblocks):
        inp = rec["ln_1"][l]
        with torch.no_grad():
            full = _attention_module_output(block.attn, inp)[:, 0]
            for h in range(H):
                removed = full - _attention_module_output(_zero_head_values(block, h, d), inp)[:, 0]
                stream = removed + block.attn.out_proj.bias / H
                ref = _frozen_ln_map(model.visual, stream, 1 / (K * H), mu, sigma)
                assert (heads[:, l, h] - ref).abs().max() <= 1e-12, (l, h)


def test_token_entries_match_a_dense_loop_over_torch_attention(model, x):
    """Per-token entries from torch's attention weights and the module's value/out weights, in plain loops."""
    c = vit.decompose(model, x)
    rec = _capture(model.visual, x)
    mu, sigma = _post_stats(rec)
    tokens = c.token_contributions(layers=[2])
    block = model.visual.transformer.resblocks[2]
    w_in, b_in, w_out = block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.out_proj.weight
    inp = rec["ln_1"][2]
    probs = _torch_attention_probs(block, inp)
    N, H, d, K = 17, 4, 16, 7
    for h in range(H):
        rows = slice(128 + h * d, 128 + (h + 1) * d)
        for i in (0, 5, 16):
            v = inp[:, i] @ w_in[rows].T + b_in[rows]                                 # (B, d)
            stream = probs[:, h, 0, i, None] * (v @ w_out[:, h * d:(h + 1) * d].T) + block.attn.out_proj.bias / (N * H)
            ref = _frozen_ln_map(model.visual, stream, 1 / (K * N * H), mu, sigma)
            assert (tokens[:, 0, h, i] - ref).abs().max() <= 1e-12


def test_token_layer_subset(model, x):
    c = vit.decompose(model, x, token_layers=[1, -1])
    assert c.token_layers == (1, 2)
    t = torch.randn(32, dtype=torch.float64)
    assert c.scores(t, level="token").shape == (3, 2, 4, 17)
    for level in ("token", "spatial"):
        assert c.completeness_error(t, level=level).max() <= 1e-10
        assert c.completeness_error(level=level).max() <= 1e-10
    full = vit.decompose(model, x)
    assert torch.allclose(c.scores(t, level="token"), full.scores(t, level="token", layers=[1, 2]), atol=1e-13)
    with pytest.raises(ValueError, match="token_layers"):
        c.token_contributions(layers=[0])
    with pytest.raises(ValueError, match="out of range"):
        full.scores(t, level="token", layers=[3])
    none = vit.decompose(model, x, token_layers=None)
    assert none.completeness_error(t, level="head").max() <= 1e-10


def test_target_errors(model, x):
    c = vit.decompose(model, x)
    with pytest.raises(ValueError, match="D=32"):
        c.scores(torch.randn(31, dtype=torch.float64))
    with pytest.raises(ValueError, match="level"):
        c.scores(torch.randn(32, dtype=torch.float64), level="pair")
    with pytest.raises(TypeError, match="torch.Tensor"):
        c.scores([0.0] * 32)


# ---- mean ablation -------------------------------------------------------------------------------------
def test_mean_ablated_matches_direct_computation(model, x):
    c = vit.decompose(model, x)
    heads, mlp = c.head_contributions(), c.mlp
    assert torch.equal(c.mean_ablated(), c.embedding)
    keep_all = torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(c.mean_ablated(keep_all, None, torch.ones(3, dtype=torch.bool)), c.embedding)
    assert (c.mean_ablated() - model.encode_image(x)).abs().max() <= 1e-10
    head_means, mlp_means = heads.mean(0), mlp.mean(0)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 4, generator=g) > 0.5
    mlp_keep = torch.tensor([True, False, True])
    direct = c.embedding_term.clone()
    for l in range(3):
        for h in range(4):
            direct = direct + (heads[:, l, h] if keep[l, h] else head_means[l, h])
        direct = direct + (mlp[:, l] if mlp_keep[l] else mlp_means[l])
    got = c.mean_ablated(keep, head_means, mlp_keep, mlp_means)
    assert (got - direct).abs().max() <= 1e-10
    assert (got - c.embedding).abs().max() > 1e-3             # something was dropped
    one = vit.decompose(model, x[:1])                          # the mean over one image is that image
    dropped = one.mean_ablated(torch.zeros(3, 4, dtype=torch.bool), one.head_contributions()[0],
                               torch.zeros(3, dtype=torch.bool), one.mlp[0])
    assert (dropped - one.embedding).abs().max() <= 1e-12
    with pytest.raises(ValueError, match=r"head_means must be given as \(3, 4, 32\)"):
        c.mean_ablated(keep)
    with pytest.raises(ValueError, match=r"head_mask must be a bool tensor of shape \(3, 4\)"):
        c.mean_ablated(torch.ones(4, dtype=torch.bool))


def test_speed_benchmark_smoke_run(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vit_decomposition_speed.py"
    loader = importlib.util.spec_from_file_location("vit_decomposition_speed", path)
    bench = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(bench)
    assert bench.main(["--quick", "--repeats", "1", "--device", "cpu"]) == 0
    assert "tiny" in capsys.readouterr().out
    row = bench.bench_model("tiny", "cpu", torch.float64, batch=2, repeats=1)
    assert row["max_completeness_error"] <= 1e-10
    assert row["bytes_per_image_dense"] == 3 * 4 * 17 * 32 * 8
