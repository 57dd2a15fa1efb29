"""Floors every method should beat: a random map and a centre-bias map (both ignore the model and the target)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_method

__all__ = ["random_map", "centre_map"]


@register_method("random", family="floor", needs_grad=False, target_dependent=False,
                 description="uniform random 7x7 grid (seeded by the image content), upsampled like layer maps")
def random_map(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """(B, 7, 7) uniform noise, each image's drawn from a seed computed from its pixels (so it is the same for
    the same image in any batch, run or resume)."""
    maps = []
    for x in images:
        seed = int((x.detach().float().abs().sum() * 1000).item()) % (2 ** 31)
        maps.append(torch.rand(7, 7, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(maps).to(images.device)


@register_method("centre", family="floor", needs_grad=False, target_dependent=False,
                 description="centre bias: isotropic Gaussian at the image centre, sigma = S/4")
def centre_map(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """(B, S, S) Gaussian centred on the image, sigma S/4."""
    S = images.shape[-1]
    r = torch.arange(S, dtype=torch.float32, device=images.device) - (S - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (S / 4) ** 2))
    return g.expand(images.shape[0], S, S).clone()
