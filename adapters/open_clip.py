"""open_clip CLIP-ResNets: ``open_clip.CLIP`` with a ModifiedResNet tower, or the tower itself."""
from __future__ import annotations

from torch import nn

from nha_plugin.spec import AttentionPoolSpec, pool_weights_from_module

from ._resnet import is_clip_resnet, resnet_trunk


def _visual(model: nn.Module) -> nn.Module:
    return getattr(model, "visual", model)


def matches(model: nn.Module) -> bool:
    v = _visual(model)
    return is_clip_resnet(v) and hasattr(v, "act1")


def spec_from_model(model: nn.Module) -> AttentionPoolSpec:
    v = _visual(model)
    size = getattr(v, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return AttentionPoolSpec(**pool_weights_from_module(v.attnpool), trunk=resnet_trunk(v), pool=v.attnpool,
                             image_size=size, trunk_module=v, layer4=v.layer4, source="open_clip")
