"""NeuronHeadAttribution under Captum's contract: targets, shapes, exact deltas, and Captum's own tools."""
import pytest
import torch
from captum.attr import LayerAttribution
from captum.metrics import infidelity, sensitivity_max

import nha_plugin as nha
from nha_plugin.harness import TextSimilarity, ZeroShotClassifier
from nha_plugin.attribution import GRANULARITIES

from conftest import assert_noise_tunnel_keeps_exact_deltas, assert_target_forms_agree, images_for

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture(scope="module")
def classifier(tiny64):
    import open_clip
    tok = open_clip.tokenizer.SimpleTokenizer()
    return ZeroShotClassifier(tiny64, tok, CLASSES, templates=["a photo of a {}.", "a {}."])


@pytest.fixture(scope="module")
def x(tiny64):
    return images_for(tiny64, batch=3)


SHAPES = {"spatial": (3, 1, 4, 4), "pair": (3, 8, 512), "head": (3, 8), "neuron": (3, 512), "token": (3, 17)}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_shapes_and_exact_delta(classifier, x, granularity):
    nad = nha.NeuronHeadAttribution(classifier)
    attr, delta = nad.attribute(x, target=2, granularity=granularity, return_convergence_delta=True)
    assert attr.shape == SHAPES[granularity]
    assert delta.shape == (3,)
    logits = classifier(x)
    assert delta.abs().max() <= 1e-10 * logits.abs().max()
    assert nad.has_convergence_delta()


@pytest.mark.parametrize("sink", ["interpolate", "drop"])
def test_delta_exact_with_sink_and_split_bias(classifier, x, sink):
    nad = nha.NeuronHeadAttribution(classifier, sink=sink, bias="split")
    for g in ("spatial", "token", "pair"):
        _, delta = nad.attribute(x, target=1, granularity=g, return_convergence_delta=True)
        assert delta.abs().max() <= 1e-9


def test_target_forms_agree(classifier, x):
    assert_target_forms_agree(nha.NeuronHeadAttribution(classifier, granularity="head"), x)


def test_tuple_in_tuple_out(classifier, x):
    nad = nha.NeuronHeadAttribution(classifier)
    out = nad.attribute((x,), target=0)
    assert isinstance(out, tuple) and out[0].shape == SHAPES["spatial"]


def test_text_similarity_single_output_needs_no_target(tiny64, x):
    import open_clip
    sim = TextSimilarity(tiny64, open_clip.tokenizer.SimpleTokenizer(), ["a red square"])
    nad = nha.NeuronHeadAttribution(sim)
    attr, delta = nad.attribute(x, return_convergence_delta=True)
    contrib = nad.contributions(x)
    e = sim.readout[:, 0]
    rest = (contrib.bias_score(e) + contrib.positional_score(e)) / contrib.embedding.norm(dim=-1)
    assert torch.allclose(attr.flatten(1).sum(1) + rest, sim(x)[:, 0], atol=1e-10)
    assert delta.abs().max() < 1e-10


def test_explicit_readout_with_any_forward(tiny64, x):
    W = torch.randn(64, 2, dtype=torch.float64)
    forward = lambda imgs: tiny64.encode_image(imgs) @ W  # noqa: E731  (raw dot-product read-out)
    nad = nha.NeuronHeadAttribution(forward, readout=W, model=tiny64, normalize=False)
    attr, delta = nad.attribute(x, target=1, granularity="neuron", return_convergence_delta=True)
    assert delta.abs().max() < 1e-10
    assert attr.shape == (3, 512)


def test_noise_tunnel(classifier, x):
    assert_noise_tunnel_keeps_exact_deltas(nha.NeuronHeadAttribution(classifier), x, SHAPES["spatial"])


def test_sensitivity_max_under_no_grad(classifier, x):
    nad = nha.NeuronHeadAttribution(classifier)
    sens = sensitivity_max(nad.attribute, x, target=1, n_perturb_samples=3, perturb_radius=0.01)
    assert sens.shape == (3,) and torch.isfinite(sens).all() and (sens > 0).all()


def test_infidelity_with_lifted_map(classifier, x):
    nad = nha.NeuronHeadAttribution(classifier)
    attr = nad.attribute(x, target=1)
    lifted = nha.lift_to_input(attr, x)
    assert lifted.shape == x.shape
    assert torch.allclose(lifted.flatten(1).sum(1), attr.flatten(1).sum(1), atol=1e-10)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    infid = infidelity(classifier, perturb, x, lifted, target=1, n_perturb_samples=4)
    assert infid.shape == (3,) and torch.isfinite(infid).all()


def test_layer_interpolate(classifier, x):
    attr = nha.NeuronHeadAttribution(classifier).attribute(x, target=0)
    up = LayerAttribution.interpolate(attr, (128, 128), interpolate_mode="bilinear")
    assert up.shape == (3, 1, 128, 128)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hooks_left_and_model_unchanged_after_errors(classifier, tiny64, x):
    nad = nha.NeuronHeadAttribution(classifier)
    before = classifier(x)
    for bad in (dict(target=9), dict(target=[0, 1])):
        with pytest.raises(ValueError, match="out of range|targets for a batch"):
            nad.attribute(x, **bad)
    bad_x = x.clone()
    bad_x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nad.attribute(bad_x, target=0)
    assert _hook_count(tiny64) == 0
    assert torch.equal(classifier(x), before)


def test_bad_inputs_say_what_to_do(classifier, tiny64, x):
    nad = nha.NeuronHeadAttribution(classifier)
    cases = [
        (x[:0], ValueError, "empty batch"),
        (x[:, :1], ValueError, "3 colour channels"),
        (x[0], ValueError, "unsqueeze"),
        (x.float(), TypeError, "float64"),
        (x.to("meta"), ValueError, "images.to"),
        ((x * 255).to(torch.uint8), TypeError, "preprocess"),
        (x[..., :100, :100], ValueError, "multiples of 32"),
    ]
    for images, err, msg in cases:
        with pytest.raises(err, match=msg):
            nad.attribute(images, target=0)
    with pytest.raises(ValueError, match="has 4 outputs"):
        nad.attribute(x)
    with pytest.raises(ValueError, match="granularity"):
        nad.attribute(x, target=0, granularity="layer")


def test_readout_dimension_mismatch_and_missing_readout(tiny64):
    with pytest.raises(ValueError, match="D=64"):
        nha.NeuronHeadAttribution(lambda z: z, readout=torch.randn(63, 2), model=tiny64)
    with pytest.raises(TypeError, match="linear read-out"):
        nha.NeuronHeadAttribution(lambda z: z)
    with pytest.raises(nha.UnsupportedModelError):
        nha.NeuronHeadAttribution(lambda z: z, readout=torch.randn(64, 2), model=torch.nn.Linear(2, 2))


def test_delta_is_measured_against_forward_with_its_extra_args(tiny64, x):
    """additional_forward_args reach forward_func for the delta only: a read-out that adds a shift the
    decomposition cannot see leaves exactly that shift as the delta."""
    W = torch.randn(64, 2, dtype=torch.float64)
    forward = lambda imgs, shift: tiny64.encode_image(imgs) @ W + shift  # noqa: E731
    nad = nha.NeuronHeadAttribution(forward, readout=W, model=tiny64)
    shift = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    attr, delta = nad.attribute(x, target=1, granularity="head", additional_forward_args=(shift,),
                                return_convergence_delta=True)
    torch.testing.assert_close(delta, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-10)
    _, plain = nad.attribute(x, target=1, granularity="head", additional_forward_args=torch.zeros(1, 2,
                             dtype=torch.float64), return_convergence_delta=True)
    assert plain.abs().max() < 1e-10


def test_overrides_and_the_shared_base(classifier, x):
    """logit_scale= rescales every attribution (the logit factor is linear in it); both read-out attributions
    share ReadoutAttribution and refuse layer-input attribution."""
    from nha_plugin.readout_attribution import ReadoutAttribution
    nad = nha.NeuronHeadAttribution(classifier, granularity="neuron")
    unit = nha.NeuronHeadAttribution(classifier, granularity="neuron", logit_scale=1.0)
    a = nad.attribute(x, target=2)
    torch.testing.assert_close(unit.attribute(x, target=2) * 100, a, rtol=1e-12, atol=1e-12 * a.abs().max())
    assert isinstance(nad, ReadoutAttribution) and isinstance(nad, LayerAttribution)
    assert nad.layer is classifier.model.visual.layer4 and not nad.multiplies_by_inputs
    with pytest.raises(ValueError, match="attribute_to_layer_input"):
        nad.attribute(x, target=0, attribute_to_layer_input=True)
