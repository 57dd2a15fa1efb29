"""timm CLIP ResNets (``resnet50_clip.openai`` and friends): ByobNet with an ``AttentionPool2d`` head."""
from __future__ import annotations

from torch import nn

from nha_plugin.spec import AttentionPoolSpec, pool_weights_from_module

from ._resnet import eval_only_trunk


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a timm network with a CLIP ``AttentionPool2d`` head."""
    head = getattr(model, "head", None)
    return (hasattr(model, "forward_features") and head is not None and hasattr(head, "pos_embed")
            and (getattr(head, "qkv", None) is not None or getattr(head, "q", None) is not None))


def spec_from_model(model: nn.Module) -> AttentionPoolSpec:
    """The spec of a timm CLIP-ResNet; its trunk (``forward_features``) refuses training mode.

    Args:
        model: the timm model (its ``head`` is the attention pool).

    Returns:
        An :class:`~nha_plugin.spec.AttentionPoolSpec`.
    """
    head = model.head
    if getattr(head, "pool_type", "token") != "token":
        raise ValueError("timm attention pool must use pool_type='token' (the CLIP class-token read-out)")
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, None, None))[-1]
    stages = getattr(model, "stages", None)
    layer4 = model.final_conv if not isinstance(getattr(model, "final_conv", None), nn.Identity) else (
        stages[-1] if stages is not None else None)
    trunk = eval_only_trunk(model.forward_features, model, head)
    return AttentionPoolSpec(**pool_weights_from_module(head), trunk=trunk, pool=head, image_size=size,
                             trunk_module=model, layer4=layer4, source="timm", pool_resizes=True)
