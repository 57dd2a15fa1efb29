"""The Captum contract both read-out attributions share (nha_plugin.readout_attribution): the one layer each explains,
integer targets only, no baselines, tuples through lift_to_input, plain tensors out, and the contrastive option
(logit_c - mean_k logit_k), exact against the contrastive read-out."""
import numpy as np
import open_clip
import pytest
import torch
from captum.attr import LayerAttribution

import nha_plugin as nha
from nha_plugin import vit
from nha_plugin.readout import LinearReadout, ZeroShotClassifier, contrastive

from conftest import images_for, make_tiny, make_tiny_vit, scaled_tol

CLASSES = ["cat", "dog", "car", "tree"]


def _classifier(model):
    return ZeroShotClassifier(model, open_clip.tokenizer.SimpleTokenizer(), CLASSES,
                              templates=["a photo of a {}.", "a {}."])


@pytest.fixture(scope="module", params=["resnet", "vit"])
def family(request):
    """(attribution class, read-out, images, the spatial map's layer, another layer of the same model)."""
    if request.param == "resnet":
        model = make_tiny(torch.float64)
        visual = model.visual
        return nha.NeuronHeadAttribution, _classifier(model), images_for(model, batch=3), visual.layer4, visual.layer3
    model = make_tiny_vit(torch.float64)
    blocks = model.visual.transformer.resblocks
    return vit.ViTAttribution, _classifier(model), images_for(64, batch=3), blocks[-1], blocks[0]


def test_only_the_explained_layer_is_accepted(family):
    method, head, x, layer, other = family
    assert method(head, layer).layer is layer and method(head).layer is layer
    with pytest.raises(ValueError, match="layer= must be that module or None") as info:
        method(head, other)
    accepted = [n for n, m in head.model.named_modules() if m is layer][0]
    refused = [n for n, m in head.model.named_modules() if m is other][0]
    assert accepted in str(info.value) and refused in str(info.value)


@pytest.mark.parametrize("target", [[1.7, 0.2, 2.0], 1.0, True, [True, False, True], torch.tensor([1.0, 0.0, 2.0]),
                                    torch.tensor([True, False, True]), torch.tensor(2.0)])
def test_float_and_bool_targets_are_refused(family, target):
    method, head, x, _, _ = family
    with pytest.raises(TypeError, match="integer"):
        method(head).attribute(x, target=target)


def test_integer_targets_of_every_kind_agree(family):
    method, head, x, _, _ = family
    nad = method(head, granularity="head")
    ref = nad.attribute(x, target=[1, 3, 0])
    for target in ([np.int64(1), np.int64(3), np.int64(0)], torch.tensor([1, 3, 0], dtype=torch.int32),
                   [torch.tensor(1), 3, 0]):
        # exact: every spelling becomes the same index tensor, so this is the very same computation
        torch.testing.assert_close(nad.attribute(x, target=target), ref, rtol=0, atol=0)


def test_baselines_are_refused_with_the_reason(family):
    method, head, x, _, _ = family
    with pytest.raises(ValueError, match="needs no baselines"):
        method(head).attribute(x, target=0, baselines=torch.zeros_like(x))
    method(head).attribute(x, target=0, baselines=None)


def test_attributions_and_deltas_are_plain_tensors(family):
    method, head, x, _, _ = family
    for granularity in method.granularities:
        attr, delta = method(head).attribute(x, target=1, granularity=granularity, return_convergence_delta=True)
        for t in (attr, delta):
            assert t.grad_fn is None and not t.requires_grad, granularity


def test_lift_to_input_takes_captums_tuples(family):
    method, head, x, _, _ = family
    attr = method(head).attribute((x,), target=2)
    assert isinstance(attr, tuple)
    plain = nha.lift_to_input(attr[0], x)
    for a, i in ((attr, (x,)), (attr, x), (attr[0], (x,))):
        lifted = nha.lift_to_input(a, i)
        assert isinstance(lifted, tuple) and len(lifted) == 1
        torch.testing.assert_close(lifted[0], plain, rtol=0, atol=0)     # same tensor, same call: exact
    torch.testing.assert_close(plain.flatten(1).sum(1), attr[0].flatten(1).sum(1), rtol=0,
                               atol=scaled_tol(attr[0], 1e-12) * plain[0].numel())
    with pytest.raises(ValueError, match="tuple of 2"):
        nha.lift_to_input((attr[0], attr[0]), x)


@pytest.mark.parametrize("granularity", ["spatial", "head"])
def test_contrastive_map_is_class_minus_mean_of_classes(family, granularity):
    method, head, x, _, _ = family
    plain = method(head, granularity=granularity)
    per_class = torch.stack([plain.attribute(x, target=k) for k in range(len(CLASSES))])     # (K, B, ...)
    expected = per_class[2] - per_class.mean(dim=0)
    tol = scaled_tol(per_class, 1e-11)
    by_call, delta = plain.attribute(x, target=2, contrastive=True, return_convergence_delta=True)
    by_default = method(head, granularity=granularity, contrastive=True).attribute(x, target=2)
    through_readout = method(contrastive(head), granularity=granularity).attribute(x, target=2)
    for got in (by_call, by_default, through_readout):
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    with torch.no_grad():
        logits = head(x)
    assert delta.abs().max() <= 1e-10 * logits.abs().max()
    # the delta is measured against the contrastive logit: a read-out that adds a per-class shift the
    # decomposition cannot see leaves exactly that shift minus its mean
    shift = torch.tensor([[0.5, -2.0, 1.0, 3.5]], dtype=torch.float64)
    shifted = method(lambda imgs, s: head(imgs) + s, readout=head.readout, model=head.model, logit_scale=100.0,
                     normalize=True, granularity=granularity)
    _, delta = shifted.attribute(x, target=2, contrastive=True, additional_forward_args=(shift,),
                                 return_convergence_delta=True)
    torch.testing.assert_close(delta, torch.full((3,), -(1.0 - 0.75), dtype=torch.float64), rtol=0, atol=1e-9)


def test_contrastive_needs_two_outputs(family):
    method, head, x, _, _ = family
    single = LinearReadout(head.model, head.readout[:, :1], logit_scale=1.0)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        method(single, contrastive=True)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        method(single).attribute(x, contrastive=True)


def test_nan_and_zero_readout_columns_are_refused(family):
    method, head, x, _, _ = family
    W = head.readout.clone()
    W[:, 1] = 0
    with pytest.raises(ValueError, match="readout column 1 is zero"):
        method(lambda imgs: imgs, readout=W, model=head.model)
    W[:, 1] = float("nan")
    with pytest.raises(ValueError, match="readout column 1 holds NaN"):
        method(lambda imgs: imgs, readout=W, model=head.model)


def test_empty_sink_and_bias_are_refused_not_defaulted():
    model = make_tiny(torch.float64)
    head = _classifier(model)
    x = images_for(model, batch=2)
    for option in ("sink", "bias"):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            nha.NeuronHeadAttribution(head, **{option: ""})
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            nha.NeuronHeadAttribution(head).attribute(x, target=0, **{option: ""})
    assert isinstance(nha.NeuronHeadAttribution(head), LayerAttribution)
