"""The CLIP-ViT decompositions on transformers and timm models: exact against each library's own forward in
float64, the same numbers as open_clip for the same weights, every refusal by name, and the train-mode door."""
import pytest
import torch
from torch import nn

from conftest import (TINY_TIMM_ARGS, images_for, make_tiny_timm, make_tiny_vit, scaled_tol, tiny_vit_as_timm,
                      tiny_vit_as_transformers)
from nha_plugin import vit
from nha_plugin.vit import second_order as so
from nha_plugin.vit.decomposition import LEVELS
from nha_plugin.vit.textspan_heads import collect_head_statistics

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-10
TARGETS = {"single": (32,), "set": (32, 5), "per_image": (3, 32)}


def library_embedding(model, images, projection=None):
    """The image embedding as the library computes it (its public forward; no nha_plugin code)."""
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            out = model.get_image_features(pixel_values=images)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if isinstance(model, transformers.CLIPVisionModelWithProjection):
            return model(pixel_values=images).image_embeds
        if isinstance(model, transformers.CLIPVisionModel):
            pooled = model(pixel_values=images).pooler_output
            return pooled if projection is None else (projection(pooled) if isinstance(projection, nn.Module)
                                                      else pooled @ projection)
        return model(images)                                                  # timm


def assert_exact(model, x, projection=None):
    """Embedding = the library's own; every level's dense and targeted completeness <= TOL (relative)."""
    ref = library_embedding(model, x, projection)
    c = vit.decompose(vit.vit_spec(model, projection) if projection is not None else model, x)
    torch.testing.assert_close(c.embedding, ref, rtol=0, atol=TOL * float(ref.abs().max()))
    torch.testing.assert_close(c.model_embedding, ref, rtol=0, atol=scaled_tol(ref))  # the library's forward
    g = torch.Generator().manual_seed(5)
    for level in LEVELS:
        assert c.completeness_error(level=level).max() <= TOL, level
        for kind, shape in TARGETS.items():
            t = torch.randn(*shape[:-1], ref.shape[1], generator=g, dtype=torch.float64) if kind == "per_image" else \
                torch.randn(ref.shape[1], *shape[1:], generator=g, dtype=torch.float64)
            assert c.completeness_error(t, level=level).max() <= TOL, (level, kind)
    return c


@pytest.fixture(scope="module")
def clip64():
    return make_tiny_vit(torch.float64)


@pytest.fixture(scope="module")
def x():
    return images_for(64, batch=3)


LIBRARIES = {"CLIPModel": lambda m: tiny_vit_as_transformers(m, "CLIPModel"),
             "CLIPVisionModelWithProjection": lambda m: tiny_vit_as_transformers(m, "CLIPVisionModelWithProjection"),
             "timm": tiny_vit_as_timm}


@pytest.fixture(scope="module", params=list(LIBRARIES))
def same(request, clip64):
    """The tiny open_clip ViT's weights in another library's model."""
    return LIBRARIES[request.param](clip64)


# ---- the same CLIP in three libraries ----------------------------------------------------------------------
def test_same_weights_same_decomposition(same, clip64, x):
    ref = clip64.encode_image(x)
    torch.testing.assert_close(library_embedding(same, x), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    c, oc = assert_exact(same, x), vit.decompose(clip64, x)
    for name in ("embedding_term", "mlp"):
        torch.testing.assert_close(getattr(c, name), getattr(oc, name), rtol=0, atol=scaled_tol(getattr(oc, name)))
    heads = oc.head_contributions()
    torch.testing.assert_close(c.head_contributions(), heads, rtol=0, atol=scaled_tol(heads))
    tokens = oc.token_contributions()
    torch.testing.assert_close(c.token_contributions(), tokens, rtol=0, atol=scaled_tol(tokens))
    torch.testing.assert_close(c.attention, oc.attention, rtol=0, atol=1e-12)


def _library_hidden_states(model, x):
    """The residual stream entering each block and after the last one, as the library reports it
    (transformers: output_hidden_states; timm: forward hooks on its blocks, removed afterwards)."""
    if not hasattr(model, "blocks"):
        tower = getattr(model, "vision_model", model)
        with torch.no_grad():
            return list(tower(pixel_values=x, output_hidden_states=True).hidden_states)
    states = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, i: states.append(i[0]))]
    hooks += [b.register_forward_hook(lambda m, i, o: states.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return states


def test_trace_equals_the_library_stream(same, x):
    tr = vit.trace(same, x)
    states = _library_hidden_states(same, x)
    assert len(states) == tr.layers + 1
    for l, ours in enumerate(tr.x_in + [tr.x_out]):
        torch.testing.assert_close(ours, states[l], rtol=0, atol=scaled_tol(states[l]))


def test_textspan_statistics_and_second_order_match_open_clip(same, clip64, x):
    stats, ref = collect_head_statistics(same, x, layers=2, progress=False), \
        collect_head_statistics(clip64, x, layers=2, progress=False)
    assert stats.layers == ref.layers == [1, 2] and stats.num_layers == 3
    for name in ("contributions", "layer_heads", "embedding", "head_means"):
        theirs = getattr(ref, name)
        torch.testing.assert_close(getattr(stats, name), theirs, rtol=0, atol=scaled_tol(theirs))
    spec, oc_spec = vit.vit_spec(same), vit.vit_spec(clip64)
    for layer in (0, 1):
        U, U_ref = so.second_order_directions(spec, layer), so.second_order_directions(oc_spec, layer)
        phi = so.second_order_effects(vit.trace(spec, x), U, layer)
        phi_ref = so.second_order_effects(vit.trace(oc_spec, x), U_ref, layer)
        assert float(phi_ref.abs().max()) > 1e-3
        torch.testing.assert_close(phi, phi_ref, rtol=0, atol=scaled_tol(phi_ref, 1e-10))


def test_captum_attribution_on_the_library_model(same, clip64, x):
    g = torch.Generator().manual_seed(2)
    readout = torch.randn(32, 4, generator=g, dtype=torch.float64)

    def logits(images):
        return 10.0 * library_embedding(same, images) @ readout

    attr = vit.ViTAttribution(logits, readout=readout, model=same, logit_scale=10.0)
    assert attr.layer is vit.vit_spec(same).block_modules[-1]               # the library's own last block
    ref = vit.ViTAttribution(lambda im: 10.0 * clip64.encode_image(im) @ readout, readout=readout, model=clip64,
                             logit_scale=10.0)
    for granularity in ("spatial", "head", "layer"):
        a, delta = attr.attribute(x, target=[0, 3, 1], granularity=granularity, return_convergence_delta=True)
        a_ref = ref.attribute(x, target=[0, 3, 1], granularity=granularity)
        assert delta.abs().max() <= 1e-9 * float(logits(x).abs().max())
        torch.testing.assert_close(a, a_ref, rtol=0, atol=scaled_tol(a_ref, 1e-10))


# ---- options beyond open_clip's layout ----------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(),                                                              # CLIP: pre-norm, no patch bias, head bias
    dict(no_embed_class=True, init_values=0.5, qk_norm=True, act_layer="quick_gelu", pre_norm=False),
    dict(fc_norm=True),                                                  # the final norm after pooling
    dict(num_classes=0),                                                 # no head: D = W
])
def test_timm_options_are_exact(options, x):
    model = make_tiny_timm(**options)
    assert options.get("num_classes") == 0 or float(model.head.bias.abs().max()) > 0   # a bias to fold
    spec = vit.vit_spec(model)
    assert spec.library == "timm" and spec.image_size == (64, 64)
    assert_exact(model, x)


def test_transformers_towers_and_projections_are_exact(clip64, x):
    for act in ("quick_gelu", "gelu"):
        assert_exact(tiny_vit_as_transformers(make_tiny_vit(torch.float64, seed=3), "CLIPVisionModelWithProjection",
                                              hidden_act=act), x)
    tower = tiny_vit_as_transformers(clip64, "CLIPVisionModel")
    assert vit.vit_spec(tower).output_dim == 64                                # the pooled output, D = W
    assert_exact(tower, x)
    g = torch.Generator().manual_seed(9)
    linear = nn.Linear(64, 32).double()
    with torch.no_grad():
        linear.bias.copy_(torch.randn(32, generator=g, dtype=torch.float64))  # folded into LN_post's shift
    assert_exact(tower, x, projection=linear)
    assert_exact(tower, x, projection=clip64.visual.proj)                     # a (W, D) matrix
    with pytest.raises(vit.UnsupportedModelError, match="own visual_projection"):
        vit.vit_spec(tiny_vit_as_transformers(clip64, "CLIPModel"), projection=linear)
    with pytest.raises(vit.UnsupportedModelError, match="CLIPVisionModel"):
        vit.vit_spec(clip64, projection=linear)


# ---- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(reg_tokens=2), "register tokens"),
    (dict(global_pool="avg"), "global_pool='avg'"),
    (dict(global_pool="map"), "attention-pool head"),
    (dict(class_token=False, global_pool="avg"), "no class token"),
    (dict(final_norm=False), "no final norm"),
    (dict(num_classes=100), "head.bias is non-zero"),                       # 64 -> 100: not a shift before P
    (dict(scale_attn_norm=True), "scale_attn_norm"),
    (dict(scale_mlp_norm=True), "scale_mlp_norm"),
    (dict(class_token=True, pos_embed="none"), "no learned position embedding"),
])
def test_timm_variants_refused_by_name(options, match):
    with pytest.raises(vit.UnsupportedModelError, match=match):
        vit.vit_spec(make_tiny_timm(**options))


def test_timm_block_classes_refused_by_name():
    from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock
    from timm.layers import SwiGLUPacked
    for options, match in ((dict(block_fn=ResPostBlock), "ResPostBlock"),
                           (dict(block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
                           (dict(mlp_layer=SwiGLUPacked), "GluMlp")):
        with pytest.raises(vit.UnsupportedModelError, match=match):
            vit.vit_spec(make_tiny_timm(**options))
    with pytest.raises(vit.UnsupportedModelError, match="CLIP-ResNet"):
        vit.vit_spec(timm.create_model("resnet50_clip", pretrained=False))


def test_siglip_attention_pool_head_refused():
    cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=64, patch_size=16)
    with pytest.raises(vit.UnsupportedModelError, match="attention-pool head"):
        vit.vit_spec(transformers.SiglipVisionModel(cfg))


# ---- train mode ------------------------------------------------------------------------------------------------
def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_training_mode_with_dropout_is_refused_and_modes_kept(clip64, x):
    hf = tiny_vit_as_transformers(clip64, "CLIPVisionModelWithProjection")
    hf.config.attention_dropout = 0.1
    for layer in hf.vision_model.encoder.layers:
        layer.self_attn.dropout = 0.1
    for model, where in ((hf.train(), "self_attn"), (make_tiny_timm(drop_path_rate=0.2).train(), "drop_path"),
                         (make_tiny_timm(proj_drop_rate=0.1).train(), "proj_drop")):
        before = _modes(model)
        for door in (vit.vit_spec, lambda m: vit.decompose(m, x), lambda m: vit.ViTAttribution(
                lambda im: im.flatten(1)[:, :4], readout=torch.eye(32, 4, dtype=torch.float64), model=m)):
            with pytest.raises(vit.UnsupportedModelError, match=rf"model\.eval\(\).*") as info:
                door(model)
            assert where in str(info.value)
        assert _modes(model) == before                                         # nothing switched to eval


def test_dropout_switched_on_after_reading_is_refused_where_the_model_runs(x):
    model = make_tiny_timm(drop_path_rate=0.2)
    c = vit.decompose(model, x)                                               # read in eval mode
    model.train()
    try:
        with pytest.raises(vit.UnsupportedModelError, match="drop_path"):
            c.completeness_error()                                            # runs the library's forward
    finally:
        model.eval()


def test_training_mode_without_dropout_is_exact(clip64, x):
    """train() alone changes nothing in a CLIP tower without dropout: accepted, and exact."""
    hf = tiny_vit_as_transformers(clip64, "CLIPVisionModelWithProjection").train()
    assert_exact(hf, x)
    assert hf.training


def test_timm_args_match_the_open_clip_tower(clip64):
    spec = vit.vit_spec(tiny_vit_as_timm(clip64))
    assert (spec.layers, spec.heads, spec.width, spec.output_dim, spec.grid) == (3, 4, 64, 32, (4, 4))
    assert TINY_TIMM_ARGS["embed_dim"] == spec.width
