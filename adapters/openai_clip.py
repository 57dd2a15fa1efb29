"""OpenAI ``clip`` package CLIP-ResNets (``clip.model.ModifiedResNet``: relu1..3, ``input_resolution``)."""
from __future__ import annotations

from torch import nn

from nha_plugin.spec import AttentionPoolSpec

from ._resnet import is_clip_resnet, spec_from_resnet


def matches(model: nn.Module) -> bool:
    """Whether ``model`` (or its ``.visual``) is a ModifiedResNet with relu1..3 stem activations."""
    v = getattr(model, "visual", model)
    return is_clip_resnet(v) and hasattr(v, "relu1")


def spec_from_model(model: nn.Module) -> AttentionPoolSpec:
    """The spec of the model (:func:`._resnet.spec_from_resnet`; its trunk refuses training mode)."""
    return spec_from_resnet(model, getattr(getattr(model, "visual", model), "input_resolution", None), "openai_clip")
