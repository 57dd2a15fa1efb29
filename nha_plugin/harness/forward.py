"""What the method families read off a forward wrapper: its model (ResNet spec or ViT), the target's read-out
column and logit, and the factor that turns ``y . e`` into that logit.

A forward wrapper is a linear read-out (``ZeroShotClassifier``, ``TextSimilarity``, ``LinearReadout``) with
``model``, ``readout`` (D, K), ``logit_scale`` and ``normalize``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapters import get_spec
from ..pool import class_attention, positional_embedding_for, tokens
from ..readout import logit_factor
from ..spec import AttentionPoolSpec

__all__ = ["model_of", "is_vit", "vit_model", "resnet_spec", "pool_inputs", "target_directions", "target_logits",
           "relative_to_logit", "readout_factor"]


def model_of(forward: nn.Module) -> nn.Module:
    """The CLIP model behind a linear read-out; TypeError naming what is expected otherwise."""
    model = getattr(forward, "model", None)
    if model is None:
        raise TypeError(f"expected a linear read-out (ZeroShotClassifier, TextSimilarity, LinearReadout) with a "
                        f"`model` attribute; got {type(forward).__name__}")
    return model


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` (a CLIP model or its image tower) is an open_clip VisionTransformer."""
    visual = getattr(model, "visual", model)
    return hasattr(visual, "transformer") and hasattr(visual, "conv1") and hasattr(visual, "class_embedding")


def vit_model(forward: nn.Module) -> nn.Module:
    """The open_clip CLIP-ViT behind ``forward``; TypeError when it is another model (e.g. a ResNet)."""
    model = getattr(forward, "model", None)
    if model is None or not is_vit(model):
        raise TypeError(f"ViT methods need a linear read-out (ZeroShotClassifier, TextSimilarity, LinearReadout) "
                        f"over an open_clip CLIP-ViT; got {type(forward).__name__} over "
                        f"{type(model).__name__ if model is not None else 'no model'}")
    return model


def resnet_spec(forward: nn.Module) -> AttentionPoolSpec:
    """The detached :class:`AttentionPoolSpec` of the CLIP-ResNet behind ``forward``."""
    return get_spec(model_of(forward)).detached()


def pool_inputs(spec: AttentionPoolSpec, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """layer4 features F (B, C, h, w), tokens z (B, T, C) with the positional embedding for F's grid, and the
    class attention a (B, H, T) of the attention pool, for images (B, 3, S, S)."""
    feats = spec.trunk(images)
    z = tokens(feats, positional_embedding_for(spec, feats.shape[-2:]))
    return feats, z, class_attention(spec, z)


def target_directions(forward: nn.Module, target: Tensor) -> Tensor:
    """The read-out column of each image's target, (B, D)."""
    return forward.readout[:, target].T


def target_logits(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """``forward(images)[b, target[b]]``, (B,), without autograd."""
    with torch.no_grad():
        return forward(images).gather(1, target[:, None])[:, 0]


def relative_to_logit(delta: Tensor, forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """A completeness residual (B,) divided by the target logit's magnitude: the registry's relative error."""
    return delta / target_logits(forward, images, target).abs().clamp_min(1e-12)


def readout_factor(forward: nn.Module, embedding: Tensor) -> Tensor:
    """Per-image factor (B,) turning ``y . e`` into the read-out's logit for embeddings y (B, D)
    (:func:`nha_plugin.readout.logit_factor` with the wrapper's scale and normalisation)."""
    return logit_factor(embedding, getattr(forward, "logit_scale", 1.0), getattr(forward, "normalize", False))
