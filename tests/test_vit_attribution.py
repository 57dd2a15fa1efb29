"""ViTAttribution under Captum's contract: targets, shapes, exact deltas, and Captum's own tools."""
import open_clip
import pytest
import torch
from captum.attr import LayerAttribution

import nha_plugin as nha
from nha_plugin import vit
from nha_plugin.harness import TextSimilarity, ZeroShotClassifier
from nha_plugin.vit.attribution import GRANULARITIES

from conftest import assert_noise_tunnel_keeps_exact_deltas, assert_target_forms_agree, images_for, make_tiny

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
