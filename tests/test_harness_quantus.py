"""Quantus without glue (harness.quantus): real Quantus metrics run on the shipped explain_func and the
image-tower-only read-out, checked against the harness's own metric implementations, hand computations and the
unmodified model."""
import numpy as np
import pytest
import quantus
import torch
import torch.nn.functional as F

from nha_plugin.harness import metrics as M
from nha_plugin.harness.quantus import explain_func, image_readout
from nha_plugin.readout import LinearReadout

from conftest import images_for, make_tiny


@pytest.fixture(scope="module")
def tiny_head():
    """A float32 CLIP-ResNet (Quantus feeds float32) with a 5-class cosine read-out over the whole CLIP model."""
    model = make_tiny(torch.float32, seed=4)
    g = torch.Generator().manual_seed(0)
    return LinearReadout(model, F.normalize(torch.randn(64, 5, generator=g), dim=0), logit_scale=100.0)


def _batch(head):
    x = images_for(head.model, batch=3, dtype=torch.float32, seed=2)
    s = np.zeros((3, 1, 128, 128), dtype=np.uint8)
    s[0, :, :, :64] = 1                                           # one region per image, in different places
    s[1, :, 64:, :] = 1
    s[2, :, 30:90, 30:90] = 1
    with torch.no_grad():
        y = head(x).argmax(1).numpy()                           # the predicted class, as a user explains it
    return x.numpy(), y, s


def test_image_readout_same_logits_image_tower_only(tiny_head):
    model = image_readout(tiny_head)
    x = torch.as_tensor(_batch(tiny_head)[0])
    with torch.no_grad():
        ref = tiny_head(x)
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-5 * ref.abs().max().item())
        con = image_readout(tiny_head, "contrastive")(x)
    torch.testing.assert_close(con, ref - ref.mean(1, keepdim=True), rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # its parameters are exactly the image tower's: the text tower is not there for MPRT to randomise
    assert {id(p) for p in model.parameters()} == {id(p) for p in tiny_head.model.visual.parameters()}
    assert not model.training and tiny_head.model.visual.training is False
    tiny_head.model.visual.train()
    try:
        with pytest.raises(ValueError, match="training mode.*model.eval"):
            image_readout(tiny_head)
    finally:
        tiny_head.model.visual.eval()


def test_localisation_metrics_agree_with_harness_and_hand_computation(tiny_head):
    model = image_readout(tiny_head)
    x, y, s = _batch(tiny_head)
    maps = explain_func(model, x, y, method="nad_spatial")
    assert maps.shape == (3, 1, 128, 128) and maps.dtype == np.float32
    kw = dict(model=model, x_batch=x, y_batch=y, s_batch=s, explain_func=explain_func,
              explain_func_kwargs={"method": "nad_spatial"}, device="cpu")
    pg = quantus.PointingGame(disable_warnings=True)(**kw)
    # the harness's pointing game (first arg-max, row-major) on the same maps: a bilinear lift leaves no ties
    assert [bool(v) for v in pg] == [bool(M.pointing_game(m[0], k[0])) for m, k in zip(maps, s)]
    rma = quantus.RelevanceMassAccuracy(disable_warnings=True, abs=False, normalise=False)(**kw)
    hand = [(m * k).sum(dtype=np.float64) / m.sum(dtype=np.float64) for m, k in zip(maps, s)]
    np.testing.assert_allclose(rma, hand, rtol=1e-4)
    # the explanation is the one of the target column: another column gives another map
    other = explain_func(model, x, (y + 1) % 5, method="nad_spatial")
    assert np.abs(other - maps).max() > 1e-3 * np.abs(maps).max()


def test_mprt_randomises_only_the_image_tower_and_leaves_the_model(tiny_head):
    from quantus.helpers.model.pytorch_model import PyTorchModel
    model = image_readout(tiny_head)
    # the layers MPRT randomises: Quantus's own list, against a count on the image tower and on the full model
    layers = [name for name, _ in PyTorchModel(model).get_random_layer_generator()]
    tower = [n for n, m in tiny_head.model.visual.named_modules() if hasattr(m, "reset_parameters")]
    everything = [n for n, m in tiny_head.model.named_modules() if hasattr(m, "reset_parameters")]
    assert len(layers) == len(tower) < len(everything)
    assert not any("transformer" in k or "token" in k for k in layers)
    x, y, s = (a[:1] for a in _batch(tiny_head))
    before = {k: v.clone() for k, v in tiny_head.state_dict().items()}
    # saliency (|gradient|, never all negative): Quantus refuses an all-negative map, which a randomised tower
    # can give NAD's signed maps; skip_layers: one comparison, original vs fully randomised (keeps it quick)
    result = quantus.MPRT(disable_warnings=True, seed=0, skip_layers=True)(
        model=model, x_batch=x, y_batch=y, s_batch=s, explain_func=explain_func,
        explain_func_kwargs={"method": "saliency"}, device="cpu")
    values = np.concatenate([np.ravel(v) for v in result.values()]).astype(float)
    assert values.size and np.isfinite(values).all()
    for k, v in tiny_head.state_dict().items():
        assert torch.equal(v, before[k]), k                    # MPRT worked on a copy


def test_explain_func_refuses_unknown_keywords_and_bad_layout(tiny_head):
    model = image_readout(tiny_head)
    x, y, _ = (a[:1] for a in _batch(tiny_head))
    with pytest.raises(TypeError, match="unknown keyword.*'softmax'.*accepts"):
        explain_func(model, x, y, softmax=True)
    with pytest.raises(ValueError, match="channel first"):
        explain_func(model, x[0], y)
