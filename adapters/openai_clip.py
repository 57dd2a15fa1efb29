"""OpenAI ``clip`` package CLIP-ResNets (``clip.model.ModifiedResNet``: relu1..3, ``input_resolution``)."""
from __future__ import annotations

from torch import nn

from nha_plugin.spec import AttentionPoolSpec, pool_weights_from_module

from ._resnet import is_clip_resnet, resnet_trunk


def _visual(model: nn.Module) -> nn.Module:
    return getattr(model, "visual", model)


def matches(model: nn.Module) -> bool:
    v = _visual(model)
    return is_clip_resnet(v) and hasattr(v, "relu1")


def spec_from_model(model: nn.Module) -> AttentionPoolSpec:
    v = _visual(model)
    return AttentionPoolSpec(**pool_weights_from_module(v.attnpool), trunk=resnet_trunk(v), pool=v.attnpool,
                             image_size=getattr(v, "input_resolution", None), trunk_module=v, layer4=v.layer4,
                             source="openai_clip")
