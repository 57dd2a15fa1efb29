"""The trunk shared by open_clip's and OpenAI's ModifiedResNet: 3-conv stem, avgpool, layer1..4."""
from __future__ import annotations

from torch import Tensor, nn


def stem_activation(visual: nn.Module, i: int) -> nn.Module:
    """open_clip names the stem ReLUs act1..3, OpenAI's clip relu1..3."""
    return getattr(visual, f"act{i}", None) or getattr(visual, f"relu{i}")


def resnet_trunk(visual: nn.Module):
    """Callable images -> layer4 output (B, C, h, w) for a CLIP ModifiedResNet."""

    def trunk(x: Tensor) -> Tensor:
        x = x.to(visual.conv1.weight.dtype)
        for i in (1, 2, 3):
            x = stem_activation(visual, i)(getattr(visual, f"bn{i}")(getattr(visual, f"conv{i}")(x)))
        x = visual.avgpool(x)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    return trunk


def is_clip_resnet(visual: nn.Module) -> bool:
    return all(hasattr(visual, n) for n in ("conv1", "conv2", "conv3", "avgpool", "layer4", "attnpool"))


def spec_from_resnet(model: nn.Module, image_size, source: str):
    """The spec of a CLIP ModifiedResNet given as a whole CLIP model (``.visual``) or the tower itself."""
    from nha_plugin.spec import AttentionPoolSpec, pool_weights_from_module
    v = getattr(model, "visual", model)
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    return AttentionPoolSpec(**pool_weights_from_module(v.attnpool), trunk=resnet_trunk(v), pool=v.attnpool,
                             image_size=image_size, trunk_module=v, layer4=v.layer4, source=source)
