"""Completeness is measured against something the decomposition does not compute itself, at every resolution:
the model's own attention pool where it runs, torch's own multi-head attention from the pool's parameters where
it does not (another grid on open_clip / OpenAI pools, a spec without a pool); for the ViT the model's own image
tower, or torch's own layers from the spec's weights for a spec without a module. Breaking the decomposition's
maths on purpose must show as a large completeness error everywhere."""
import dataclasses
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin import vit
from nha_plugin.adapters import get_spec
from nha_plugin.decomposition import LEVELS
from nha_plugin.pool import positional_embedding_for, reference_pool_output
from nha_plugin.vit.spec import LayerNormSpec

from conftest import images_for, make_tiny_vit

# 128 px is the tiny ResNet's native size (4x4 grid); 160 px gives a 5x5 grid its open_clip pool refuses
SIZES = (128, 160)


def _all_on_first_spatial_token(spec, z):
    """A broken class attention: every head puts all its attention on spatial token 1."""
    a = torch.zeros(z.shape[0], spec.num_heads, z.shape[1], dtype=z.dtype, device=z.device)
    a[..., 1] = 1
    return a


def _decompose_quietly(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # the interpolation warning at 160 px
        return nha.decompose(model, x)


@pytest.fixture(scope="module")
def target():
    return torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("size", SIZES)
def test_reference_agrees_with_a_sound_decomposition(tiny64, size, target):
    x = images_for(size, batch=2)
    contrib = _decompose_quietly(tiny64, x)
    assert contrib.has_model_reference == (size == 128)
    for level in LEVELS:
        assert contrib.completeness_error(target, level=level).max() <= 1e-10, level
    assert contrib.completeness_error().max() <= 1e-10


def test_torch_reference_is_the_models_own_pool_at_the_native_grid(tiny64):
    spec = get_spec(tiny64).detached()
    x = images_for(tiny64, batch=2, seed=3)
    with torch.no_grad():
        feats = spec.trunk(x)
        ref = reference_pool_output(spec, feats, positional_embedding_for(spec, feats.shape[-2:]))
        own = tiny64.visual.attnpool(feats)
    torch.testing.assert_close(ref, own, rtol=0, atol=1e-12 * float(own.abs().max()))


@pytest.mark.parametrize("size", SIZES)
def test_broken_attention_is_caught_at_every_resolution(tiny64, size, target, monkeypatch):
    x = images_for(size, batch=2)
    monkeypatch.setattr("nha_plugin.decomposition.class_attention", _all_on_first_spatial_token)
    contrib = _decompose_quietly(tiny64, x)
    assert contrib.completeness_error().min() > 1e-2
    for level in ("pair", "head", "spatial", "token"):
        assert contrib.completeness_error(target, level=level).min() > 1e-3, level


@pytest.mark.parametrize("size", SIZES)
def test_spec_without_a_pool_is_checked_against_torch(tiny64, size, target, monkeypatch):
    spec = dataclasses.replace(get_spec(tiny64), pool=None)
    x = images_for(size, batch=2)
    sound = _decompose_quietly(spec, x)
    assert not sound.has_model_reference
    assert sound.completeness_error(target, level="spatial").max() <= 1e-10
    with pytest.raises(RuntimeError, match="reference_embedding"):
        sound.model_embedding
    monkeypatch.setattr("nha_plugin.decomposition.class_attention", _all_on_first_spatial_token)
    assert _decompose_quietly(spec, x).completeness_error().min() > 1e-2


def _uniform_attention(layer, normed):
    """A broken ViT attention: every query attends evenly to every token."""
    B, N = normed.shape[:2]
    return torch.full((B, layer.heads, N, N), 1.0 / N, dtype=normed.dtype, device=normed.device)


@pytest.mark.parametrize("block_type", ["default", "custom"])
def test_vit_completeness_against_the_model_or_torch_layers(block_type, monkeypatch):
    model = make_tiny_vit(torch.float64, block_type=block_type)
    x = images_for(64, batch=2)
    e = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bare = dataclasses.replace(vit.vit_spec(model), module=None)
    for source in (model, bare):
        c = vit.decompose(source, x)
        for level in ("layer", "head", "spatial"):
            assert c.completeness_error(e, level=level).max() <= 1e-10
    torch.testing.assert_close(vit.decompose(bare, x).model_embedding, model.encode_image(x).detach(),
                               rtol=0, atol=1e-12)
    # the package's ``vit.trace`` is the function: patch the module through sys.modules
    monkeypatch.setattr(sys.modules["nha_plugin.vit.trace"], "attention_pattern", _uniform_attention)
    for source in (model, bare):
        c = vit.decompose(source, x)
        assert c.completeness_error().min() > 1e-2
        assert c.completeness_error(e, level="spatial").min() > 1e-3


def test_vit_without_any_reference_says_so():
    """Blocks torch's layers cannot express (q/k LayerNorm here) and no module: NaN and a warning, never a
    decomposition compared with itself."""
    model = make_tiny_vit(torch.float64)
    spec = vit.vit_spec(model)
    ones = torch.ones(spec.head_dim, dtype=torch.float64)
    ln = LayerNormSpec(gamma=ones, beta=torch.zeros_like(ones), eps=1e-5)
    bare = dataclasses.replace(spec, module=None,
                               blocks=[dataclasses.replace(b, q_norm=ln, k_norm=ln) for b in spec.blocks])
    c = vit.decompose(bare, images_for(64, batch=2))
    with pytest.warns(UserWarning, match="no independent reference"):
        err = c.completeness_error(torch.randn(32, dtype=torch.float64))
    assert torch.isnan(err).all()


def test_reference_runs_in_the_models_dtype_and_leaves_it_alone():
    """In float32 the reference is torch's attention in float32 on the model's weights; nothing is cast."""
    from conftest import make_tiny
    model = make_tiny(torch.float32)
    spec = dataclasses.replace(get_spec(model), pool=None)
    x = images_for(model, batch=2, dtype=torch.float32)
    contrib = nha.decompose(spec, x)
    assert contrib.reference_embedding.dtype == torch.float32
    with torch.no_grad():
        y = model.encode_image(x)
    assert F.cosine_similarity(contrib.reference_embedding, y).min() > 1 - 1e-6
    assert all(p.dtype == torch.float32 for p in model.parameters())
