"""CLIP-ViT attribution methods, registered in the same registry as the ResNet methods.

A ViT runs through the unchanged runner and metrics: the forward wrapper is the same linear read-out
(``ZeroShotClassifier`` over an open_clip CLIP-ViT), and methods return maps on the patch grid, which
:func:`~nha_plugin.harness.registry.to_pixel_map` upsamples like any layer map. Model-agnostic methods
(Captum's integrated gradients, saliency, input x gradient, gradient SHAP, occlusion, and the floors) apply
to a ViT as they are; the ResNet-specific ones (NAD, MaskCLIP/self-self for the attention pool, GradCAM on
layer4) do not.

- ``vit_spatial``: the exact decomposition's spatial map (``nha_plugin.vit.ViTAttribution``, granularity
  "spatial"): per patch, the sum over layers and heads of its token entries' scores against the target's
  read-out column, in logit units; complete (class-token, MLP and embedding terms reported apart).
- ``textspan_vit``: TextSpan's segmentation map (docs/methods.md §2): the same token scores against the target
  column minus the mean of all columns (``heat[:, c] - mean over classes``).
- ``vit_maskclip``: MaskCLIP's ViT map (the last block's value path per token, no q/k, no residual or MLP,
  then ln_post and proj; cosine with the target column), the usual training-free ViT baseline.
- ``vit_class_attention``: the last block's class-token attention over patches, mean over heads (ignores the
  target; the ViT analogue of ``class_attention``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..pool_maps import token_cosines
from .forward import readout_factor, relative_to_logit, target_directions, vit_model
from .registry import register_method

__all__ = ["vit_spatial", "textspan_vit", "vit_class_attention", "vit_maskclip"]


@register_method("vit_spatial", family="vit", completeness=True, needs_grad=False,
                 description="ViT decomposition spatial map: per patch, sum over layers and heads of its token "
                             "entries' scores against the target column, logit units (exact; class-token, MLP and "
                             "embedding terms reported apart)")
def vit_spatial(forward: nn.Module, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Spatial map (B, 1, gh, gw) in logit units and the relative completeness error (B,)."""
    from ..vit import ViTAttribution
    vit_model(forward)
    attr, delta = ViTAttribution(forward).attribute(images, target=target, granularity="spatial",
                                                    return_convergence_delta=True)
    return attr, relative_to_logit(delta, forward, images, target)


@register_method("textspan_vit", family="vit", needs_grad=False,
                 description="TextSpan segmentation map (docs/methods.md §2): token scores summed over layers and heads "
                             "against the target column minus the mean column (heat[:, c] - mean over classes)")
def textspan_vit(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Per-patch scores against (target column - mean column), logit units, (B, gh, gw)."""
    from ..vit import decompose
    c = decompose(vit_model(forward), images)
    R = forward.readout.to(c.embedding.dtype)
    e = R[:, target].T - R.mean(dim=1)                                        # (B, D)
    return c.scores(e, level="spatial", per_image=True) * readout_factor(forward, c.embedding).view(-1, 1, 1)


@register_method("vit_class_attention", family="vit", needs_grad=False, target_dependent=False,
                 description="last ViT block's class-token attention over the patches, mean over heads (ignores "
                             "the target)")
def vit_class_attention(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """The last block's class-token attention to each patch, mean over heads, (B, gh, gw)."""
    from ..vit import decompose
    c = decompose(vit_model(forward), images, token_layers=None)
    a = c.attention[:, -1, :, 1:].mean(dim=1)                                 # (B, N - 1), class token first
    return a.reshape(a.shape[0], *c.spec.grid)


@register_method("vit_maskclip", family="vit", needs_grad=False,
                 description="MaskCLIP for ViT: the last block's value path per token, no q/k attention, no "
                             "residual or MLP: proj(ln_post(W_o (W_v ln_1(x_i) + b_v) + b_o)); cosine of each patch "
                             "with the target column")
def vit_maskclip(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Cosine of each patch's value-path output with the target column, (B, gh, gw)."""
    from ..vit import trace, vit_spec
    spec = vit_spec(vit_model(forward))
    layer = spec.blocks[-1]
    h = layer.ln_1(trace(spec, images).x_in[-1])                             # (B, N, W)
    v = torch.einsum("hdw,bnw->bnhd", layer.W_v, h) + layer.b_v               # (B, N, H, d)
    z = spec.ln_post(v.flatten(2) @ layer.W_o.T + layer.b_o) @ spec.output_projection()
    return token_cosines(z[:, 1:], target_directions(forward, target), spec.grid, per_image=True)
