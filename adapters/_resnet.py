"""The trunk shared by open_clip's and OpenAI's ModifiedResNet: 3-conv stem, avgpool, layer1..4; and the guard
every adapter's trunk runs first (:func:`eval_only_trunk`)."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from nha_plugin.spec import TrainingModeError

__all__ = ["stem_activation", "resnet_trunk", "is_clip_resnet", "spec_from_resnet", "modules_in_training",
           "eval_only_trunk"]


def stem_activation(visual: nn.Module, i: int) -> nn.Module:
    """open_clip names the stem ReLUs act1..3, OpenAI's clip relu1..3."""
    return getattr(visual, f"act{i}", None) or getattr(visual, f"relu{i}")


def modules_in_training(root: nn.Module, pool: nn.Module | None) -> list[str]:
    """Names of the modules of ``root`` in training mode, the attention pool ``pool`` and its children left out.

    Args:
        root: the image tower (open_clip / OpenAI ``visual``, or a timm model).
        pool: its attention pool (not part of the trunk; None if there is none to leave out).

    Returns:
        The qualified names (``""`` for ``root`` itself), in module order.
    """
    skip = {id(m) for m in pool.modules()} if pool is not None else set()
    return [name for name, m in root.named_modules() if m.training and id(m) not in skip]


def eval_only_trunk(trunk: Callable[[Tensor], Tensor], root: nn.Module, pool: nn.Module | None
                    ) -> Callable[[Tensor], Tensor]:
    """``trunk`` behind a check that the trunk's modules are in eval mode.

    In training mode BatchNorm normalises with the batch's own statistics and overwrites its running
    statistics: the decomposition would explain another function than the model's eval output and change the
    caller's buffers. The check runs before anything else, so a refused call leaves the model as it was.

    Args:
        trunk: images -> layer4 output.
        root, pool: as :func:`modules_in_training`.

    Returns:
        A callable with ``trunk``'s signature that raises :class:`TrainingModeError` (naming the modules and
        saying to call ``model.eval()``) when any module of the trunk is training.
    """

    def checked(x: Tensor) -> Tensor:
        training = modules_in_training(root, pool)
        if training:
            shown = ", ".join(n or type(root).__name__ for n in training[:3])
            more = f" and {len(training) - 3} more" if len(training) > 3 else ""
            raise TrainingModeError(
                f"the image tower is in training mode ({len(training)} modules, e.g. {shown}{more}): its BatchNorm "
                "layers would normalise with this batch's statistics and overwrite their running statistics, so "
                "the decomposition would not explain the model's output. Call model.eval() first (and "
                "model.train() afterwards if you are training)")
        return trunk(x)

    return checked


def resnet_trunk(visual: nn.Module) -> Callable[[Tensor], Tensor]:
    """Callable images -> layer4 output (B, C, h, w) for a CLIP ModifiedResNet in eval mode (refuses training
    mode: :func:`eval_only_trunk`)."""

    def trunk(x: Tensor) -> Tensor:
        x = x.to(visual.conv1.weight.dtype)
        for i in (1, 2, 3):
            x = stem_activation(visual, i)(getattr(visual, f"bn{i}")(getattr(visual, f"conv{i}")(x)))
        x = visual.avgpool(x)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    return eval_only_trunk(trunk, visual, getattr(visual, "attnpool", None))


def is_clip_resnet(visual: nn.Module) -> bool:
    """Whether ``visual`` has the ModifiedResNet layout (3-conv stem, avgpool, layer4, attnpool)."""
    return all(hasattr(visual, n) for n in ("conv1", "conv2", "conv3", "avgpool", "layer4", "attnpool"))


def spec_from_resnet(model: nn.Module, image_size: int | Sequence[int] | None, source: str):
    """The spec of a CLIP ModifiedResNet given as a whole CLIP model (``.visual``) or the tower itself.

    Args:
        model: the CLIP model or its image tower.
        image_size: the native input size (an int or a (size, size) pair; None if unknown).
        source: the adapter's name, recorded in the spec.

    Returns:
        An :class:`~nha_plugin.spec.AttentionPoolSpec` whose trunk refuses training mode.
    """
    from nha_plugin.spec import AttentionPoolSpec, pool_weights_from_module
    v = getattr(model, "visual", model)
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]
    return AttentionPoolSpec(**pool_weights_from_module(v.attnpool), trunk=resnet_trunk(v), pool=v.attnpool,
                             image_size=image_size, trunk_module=v, layer4=v.layer4, source=source)
