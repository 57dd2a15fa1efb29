"""Shared fixtures: small random CLIP-ResNets with meaningful BatchNorm, built offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "NHA_CACHE_DIR" not in os.environ:  # keep the tests' text-embedding cache out of the user's home
    import tempfile
    os.environ["NHA_CACHE_DIR"] = tempfile.mkdtemp(prefix="nha-test-cache-")

import open_clip
import pytest
import torch
from torch import nn

TINY_CFG = dict(
    embed_dim=64,
    vision_cfg=dict(layers=[1, 1, 1, 1], width=16, head_width=64, image_size=128),   # C=512, H=8, 4x4 grid
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)


def rerandomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """open_clip zero-initialises every bn3.weight, silencing residual branches; give BN real statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model


def randomise_pool_biases(model: nn.Module, seed: int = 1) -> nn.Module:
    """open_clip initialises attention-pool biases to zero; non-zero biases exercise the constant terms."""
    g = torch.Generator().manual_seed(seed)
    pool = getattr(model, "visual", model).attnpool
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return model


def make_tiny(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG)
    return randomise_pool_biases(rerandomise_batchnorm(model, seed), seed + 1).eval().to(dtype)


@pytest.fixture(scope="session")
def tiny64():
    return make_tiny(torch.float64)


@pytest.fixture(scope="session")
def tiny32():
    return make_tiny(torch.float32)


@pytest.fixture(scope="session")
def rn50_64():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50")
    return randomise_pool_biases(rerandomise_batchnorm(model)).eval().double()


def images_for(model_or_size, batch=2, dtype=torch.float64, seed=0):
    size = model_or_size if isinstance(model_or_size, int) else model_or_size.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype)


@pytest.fixture(scope="session")
def timm_rn50(rn50_64):
    """timm's resnet50_clip holding the same weights as ``rn50_64`` (converted by timm's own filter)."""
    timm = pytest.importorskip("timm")
    from timm.models.byobnet import checkpoint_filter_fn
    model = timm.create_model("resnet50_clip", pretrained=False, num_classes=1024)
    model.load_state_dict(checkpoint_filter_fn(rn50_64.state_dict(), model))
    return model.eval().double()
