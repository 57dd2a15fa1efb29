"""Adapters: read a CLIP-ResNet from open_clip, OpenAI ``clip`` or timm into an :class:`AttentionPoolSpec`.

Installed as ``nha_plugin.adapters``. :func:`get_spec` picks the adapter from the model's structure.
The TransformerLens and zennit adapters need their extras and are imported on demand.
"""
from __future__ import annotations

from torch import nn

from nha_plugin.spec import AttentionPoolSpec, UnsupportedModelError

from . import open_clip as open_clip_adapter
from . import openai_clip as openai_clip_adapter
from . import timm as timm_adapter

__all__ = ["get_spec", "detect", "ADAPTERS", "UnsupportedModelError", "require_extra"]

ADAPTERS = {
    "open_clip": open_clip_adapter,
    "openai_clip": openai_clip_adapter,
    "timm": timm_adapter,
}

SUPPORTED = ("open_clip CLIP / ModifiedResNet (RN50, RN101, RN50x4, RN50x16, RN50x64, scenes-rn), "
             "OpenAI clip ModifiedResNet, timm resnet*_clip (AttentionPool2d head)")


def _looks_like_vit(model: nn.Module) -> bool:
    """A class embedding or token plus a transformer: a ViT, which gets a pointer to nha_plugin.vit."""
    inner = getattr(model, "visual", model)
    return (hasattr(inner, "class_embedding") or hasattr(inner, "cls_token")) and (
        hasattr(inner, "transformer") or hasattr(inner, "blocks"))


def detect(model: nn.Module) -> str:
    """Name of the adapter that handles ``model``.

    Args:
        model: a whole CLIP model or its image tower.

    Returns:
        A key of :data:`ADAPTERS`.

    Raises:
        UnsupportedModelError: no adapter matches (a ViT is pointed to ``nha_plugin.vit``).
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a CLIP-ResNet nn.Module (open_clip, OpenAI clip or timm); got {type(model).__name__}")
    for name, adapter in ADAPTERS.items():
        if adapter.matches(model):
            return name
    if _looks_like_vit(model):
        tower = type(getattr(model, "visual", model)).__name__
        raise UnsupportedModelError(
            f"expected a CLIP-ResNet (AttentionPool2d); got a vision transformer ({tower}): use nha_plugin.vit "
            "for CLIP-ViTs")
    raise UnsupportedModelError(
        f"expected a CLIP-ResNet with an attention pool; got {type(model).__name__}. Supported: {SUPPORTED}")


def get_spec(model: nn.Module) -> AttentionPoolSpec:
    """The :class:`AttentionPoolSpec` of any supported CLIP-ResNet.

    Args:
        model: a whole CLIP model or its image tower (open_clip, OpenAI clip or timm).

    Returns:
        Its spec; the spec's trunk refuses to run while the model is in training mode
        (:class:`nha_plugin.spec.TrainingModeError`).
    """
    return ADAPTERS[detect(model)].spec_from_model(model)


def require_extra(module: str, extra: str):
    """Import an optional dependency or say which extra installs it.

    Args:
        module: the module to import.
        extra: the ``nha-plugin[...]`` extra that installs it, named in the ImportError.

    Returns:
        The imported module.
    """
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this feature needs the '{module}' package: pip install 'nha-plugin[{extra}]'") from err
