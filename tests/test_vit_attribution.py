"""ViTAttribution under Captum's contract: targets, shapes, exact deltas, and Captum's own tools."""
import open_clip
import pytest
import torch
from captum.attr import LayerAttribution

import nha_plugin as nha
from nha_plugin import vit
from nha_plugin.harness import TextSimilarity, ZeroShotClassifier
from nha_plugin.vit.attribution import GRANULARITIES

from conftest import (assert_noise_tunnel_keeps_exact_deltas, assert_target_forms_agree, images_for, make_tiny,
                      scaled_tol)

CLASSES = ["cat", "dog", "car", "tree"]
SHAPES = {"spatial": (3, 1, 4, 4), "head": (3, 3, 4), "layer": (3, 7), "token": (3, 3, 4, 17)}


def _classifier(model):
    return ZeroShotClassifier(model, open_clip.tokenizer.SimpleTokenizer(), CLASSES,
                              templates=["a photo of a {}.", "a {}."])


@pytest.fixture(scope="module")
def classifier(tiny_vit64):
    return _classifier(tiny_vit64)


@pytest.fixture(scope="module")
def x():
    return images_for(64, batch=3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_shapes_and_exact_delta(classifier, x, granularity):
    nad = vit.ViTAttribution(classifier)
    attr, delta = nad.attribute(x, target=2, granularity=granularity, return_convergence_delta=True)
    assert attr.shape == SHAPES[granularity]
    assert delta.shape == (3,)
    assert delta.abs().max() <= 1e-10 * classifier(x).abs().max()
    assert nad.has_convergence_delta() and not nad.multiplies_by_inputs


def test_custom_blocks_and_token_layer_subset(tiny_vit64_custom, x):
    nad = vit.ViTAttribution(_classifier(tiny_vit64_custom), token_layers=[2])
    for granularity in GRANULARITIES:
        attr, delta = nad.attribute(x, target=[0, 1, 3], granularity=granularity, return_convergence_delta=True)
        assert delta.abs().max() <= 1e-9
    assert attr.shape == (3, 1, 4, 17)


def test_attributions_are_the_decomposition_scaled(classifier, x):
    """Spatial map = the (layer, head, patch) entries' projections on the class row, times 100 / ||y||."""
    nad = vit.ViTAttribution(classifier)
    attr = nad.attribute(x, target=1)
    c = vit.decompose(classifier.model, x)
    tokens = c.token_contributions()                                       # (B, L, H, N, D)
    row = classifier.readout[:, 1]
    ref = (tokens[..., 1:, :] @ row).sum(dim=(1, 2)) * 100 / c.embedding.norm(dim=-1, keepdim=True)
    assert torch.allclose(attr.flatten(1), ref, atol=1e-10)


def test_target_forms_agree(classifier, x):
    assert_target_forms_agree(vit.ViTAttribution(classifier, granularity="head"), x)


def test_tuple_in_tuple_out(classifier, x):
    out = vit.ViTAttribution(classifier).attribute((x,), target=0)
    assert isinstance(out, tuple) and out[0].shape == SHAPES["spatial"]


def test_text_similarity_single_output_needs_no_target(tiny_vit64, x):
    sim = TextSimilarity(tiny_vit64, open_clip.tokenizer.SimpleTokenizer(), ["a red square"])
    nad = vit.ViTAttribution(sim)
    attr, delta = nad.attribute(x, return_convergence_delta=True)
    c = nad.contributions(x)
    rest = c.rest_score(sim.readout[:, 0], level="spatial") / c.embedding.norm(dim=-1)
    assert torch.allclose(attr.flatten(1).sum(1) + rest, sim(x)[:, 0], atol=1e-10)
    assert delta.abs().max() < 1e-10


def test_explicit_readout_with_any_forward(tiny_vit64, x):
    W = torch.randn(32, 2, dtype=torch.float64)
    forward = lambda imgs: tiny_vit64.encode_image(imgs) @ W  # noqa: E731  (raw dot-product read-out)
    nad = vit.ViTAttribution(forward, readout=W, model=tiny_vit64.visual, normalize=False)
    attr, delta = nad.attribute(x, target=1, granularity="layer", return_convergence_delta=True)
    assert delta.abs().max() < 1e-10
    assert torch.allclose(attr.sum(1), forward(x)[:, 1], atol=1e-10)     # layers sum to the logit, no rest


def test_noise_tunnel(classifier, x):
    assert_noise_tunnel_keeps_exact_deltas(vit.ViTAttribution(classifier), x, SHAPES["spatial"])


def test_layer_interpolate_and_lift(classifier, x):
    attr = vit.ViTAttribution(classifier).attribute(x, target=0)
    up = LayerAttribution.interpolate(attr, (64, 64), interpolate_mode="bilinear")
    assert up.shape == (3, 1, 64, 64)
    lifted = nha.lift_to_input(attr, x)
    assert torch.allclose(lifted.flatten(1).sum(1), attr.flatten(1).sum(1), atol=1e-10)


def test_errors_say_what_to_do(classifier, tiny_vit64, x):
    nad = vit.ViTAttribution(classifier)
    before = classifier(x)
    with pytest.raises(ValueError, match="out of range"):
        nad.attribute(x, target=9)
    with pytest.raises(ValueError, match="targets for a batch"):
        nad.attribute(x, target=[0, 1])
    with pytest.raises(ValueError, match="has 4 outputs"):
        nad.attribute(x)
    with pytest.raises(ValueError, match="granularity"):
        nad.attribute(x, target=0, granularity="pair")
    with pytest.raises(TypeError, match="preprocess"):
        nad.attribute((x * 255).to(torch.uint8), target=0)
    assert torch.equal(classifier(x), before)
    with pytest.raises(ValueError, match="D=32"):
        vit.ViTAttribution(lambda z: z, readout=torch.randn(31, 2), model=tiny_vit64)
    with pytest.raises(TypeError, match="linear read-out"):
        vit.ViTAttribution(lambda z: z)
    with pytest.raises(vit.UnsupportedModelError, match="NeuronHeadAttribution"):
        vit.ViTAttribution(lambda z: z, readout=torch.randn(64, 2), model=make_tiny(torch.float64))


def test_shares_the_readout_base(classifier, x):
    from nha_plugin.readout_attribution import ReadoutAttribution
    nad = vit.ViTAttribution(classifier)
    assert isinstance(nad, ReadoutAttribution) and nad.layer is classifier.model.visual.transformer.resblocks[-1]
    with pytest.raises(ValueError, match="attribute_to_layer_input"):
        nad.attribute(x, target=0, attribute_to_layer_input=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vit_decomposes_in_float32_within_the_stated_bound(dtype):
    """A bf16 / fp16 CLIP-ViT: the decomposition's maths runs in float32, so its components add up to its own
    embedding to float32 rounding; against the model's own low-precision ``encode_image`` the completeness error
    and the delta stay below the documented ``(L + 1) * eps``; the caller's model is left as it was."""
    import torch.nn.functional as F

    from conftest import make_tiny_vit
    from nha_plugin.harness import LinearReadout
    model = make_tiny_vit(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images_for(64, batch=2, dtype=dtype)
    contrib = vit.decompose(model, x)
    L, eps = contrib.spec.layers, torch.finfo(dtype).eps
    assert contrib.embedding.dtype == torch.float32
    e = torch.randn(32, 2, generator=torch.Generator().manual_seed(5))
    # its components add up to its own embedding to float32 rounding (bf16 / fp16 maths could not)
    parts, rest = contrib.scores_and_rest(e, level="component")
    own = contrib.embedding @ e
    torch.testing.assert_close(parts.sum(dim=-1) + rest, own, rtol=0, atol=scaled_tol(own, 1e-5) * e.norm())
    with torch.no_grad():
        y = model.encode_image(x).float()
    assert contrib.completeness_error().max() <= (L + 1) * eps
    assert contrib.completeness_error(e, level="spatial").max() <= (L + 1) * eps
    columns = F.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(6)), dim=0).to(dtype)
    head = LinearReadout(model, columns, logit_scale=100.0, normalize=True)
    _, delta = vit.ViTAttribution(head).attribute(x, target=[0, 2], return_convergence_delta=True)
    assert delta.abs().max() <= (L + 1) * eps * 100.0
    # and it points where the model's own low-precision embedding does, to the same bound
    assert F.cosine_similarity(contrib.embedding, y).min() > 1 - (L + 1) * eps
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
