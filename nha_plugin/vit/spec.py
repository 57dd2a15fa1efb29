"""What the CLIP-ViT decomposition reads from a model: every weight, as plain tensors.

:func:`vit_spec` is the one door: it reads a CLIP-ViT image tower of any supported library into a
:class:`ViTSpec` (defined in :mod:`nha_plugin.vit.structure`, re-exported here) and refuses a model in training
mode with active dropout. One reader per library, each recognising its model by attributes (no library is
imported here):

- open_clip: a CLIP model with a ``VisionTransformer`` as ``.visual``, or the tower itself
  (:mod:`~nha_plugin.vit.open_clip_reader`);
- Hugging Face transformers: ``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPVisionModel`` (+ an
  optional ``projection=``) (:mod:`~nha_plugin.vit.hf_reader`);
- timm: ``VisionTransformer`` built as a CLIP tower, e.g. ``vit_base_patch32_clip_224.openai``
  (:mod:`~nha_plugin.vit.timm_reader`).

Each reader keeps the options that leave the residual stream a sum of per-head terms and refuses, by name, the
ones that would not (attention-pool heads, pooling other than the class token, register tokens, LayerNorms
that mix heads or neurons, ...).

Shapes: L layers, H heads of width d, W = H*d the residual width, M the MLP width, D the output width,
N = 1 + gh*gw tokens (the class token is token 0).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from . import hf_reader, open_clip_reader, timm_reader
from .structure import LayerNormSpec, UnsupportedModelError, ViTLayerSpec, ViTSpec, check_eval_mode

__all__ = ["ViTSpec", "ViTLayerSpec", "LayerNormSpec", "vit_spec", "select_layers", "UnsupportedModelError"]

SUPPORTED = ("an open_clip VisionTransformer (or a CLIP model whose .visual is one), a transformers CLIPModel / "
             "CLIPVisionModelWithProjection / CLIPVisionModel, or a timm VisionTransformer CLIP tower "
             "(e.g. vit_base_patch32_clip_224)")


def _refuse_resnet(model: nn.Module) -> None:
    visual = getattr(model, "visual", model)
    resnet = (hasattr(visual, "attnpool") or type(visual).__name__ in ("ModifiedResNet", "ResNet", "ByobNet")
              or type(getattr(visual, "head", None)).__name__ == "AttentionPool2d")
    if resnet:
        raise UnsupportedModelError(
            f"expected a CLIP-ViT; got {type(visual).__name__}, a CLIP-ResNet: use nha_plugin.decompose(model, "
            "images) / nha_plugin.NeuronHeadAttribution for CLIP-ResNets")


def vit_spec(model: Union[nn.Module, ViTSpec], projection: Union[nn.Linear, Tensor, None] = None) -> ViTSpec:
    """Read a CLIP-ViT's image tower into a :class:`ViTSpec` (tensors are the model's own parameters or views
    of them; nothing of the model is changed).

    Args:
        model: an open_clip CLIP-ViT (whole model or ``model.visual``), a transformers ``CLIPModel`` /
            ``CLIPVisionModelWithProjection`` / ``CLIPVisionModel``, a timm CLIP ``VisionTransformer``, or a
            ViTSpec (returned unchanged).
        projection: only for a transformers ``CLIPVisionModel`` (which has no projection): the
            ``nn.Linear(W, D)`` (e.g. ``clip_model.visual_projection``) or (W, D) matrix that maps its pooled
            output to the embedding. Then ``spec.module(images)`` is ``projection(pooler_output)``.

    Returns:
        ViTSpec. Its ``module`` computes the library's own image embedding (B, D) (completeness checks use
        it), ``block_modules`` are the model's blocks and ``library`` names the library.

    Raises:
        UnsupportedModelError: for CLIP-ResNets, models of no supported library, a model in training mode with
            active dropout (call ``model.eval()``), and the options each reader refuses (see its module doc).
    """
    if isinstance(model, ViTSpec):
        if projection is not None:
            raise UnsupportedModelError("projection= applies to a model, not to a ViTSpec (which has its own)")
        return model
    _refuse_resnet(model)
    if hf_reader.matches(model):
        spec = hf_reader.read(model, projection)
    elif projection is not None:
        raise UnsupportedModelError(f"projection= is for a transformers CLIPVisionModel (no projection of its "
                                    f"own); {type(model).__name__} has its projection built in")
    elif open_clip_reader.matches(model):
        spec = open_clip_reader.read(model)
    elif timm_reader.matches(model):
        spec = timm_reader.read(model)
    else:
        visual = getattr(model, "visual", model)
        head = getattr(getattr(visual, "vision_model", visual), "head", None)
        if "Pool" in type(head).__name__:          # SigLIP's MAP head, CoCa-style poolers
            raise UnsupportedModelError(f"{type(visual).__name__} pools with an attention-pool head "
                                        f"({type(head).__name__}); the decomposition covers class-token pooling only")
        raise UnsupportedModelError(
            f"expected {SUPPORTED}; got {type(visual).__name__}. Load the model with nha_plugin.load_clip, "
            "open_clip, transformers or timm")
    check_eval_mode(spec.module, type(getattr(model, "visual", model)).__name__)
    if not spec.blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no residual blocks")
    W = spec.width
    if spec.positional_embedding.shape != (spec.tokens, W):
        raise UnsupportedModelError(f"positional embedding is {tuple(spec.positional_embedding.shape)}; expected "
                                    f"{(spec.tokens, W)} for a {spec.grid} grid plus the class token")
    return spec


def select_layers(spec: ViTSpec, layers: Optional[Sequence[int]]) -> tuple[int, ...]:
    """Validate a layer subset (None = all layers) and return it sorted, negative indices resolved."""
    L = spec.layers
    if layers is None:
        return tuple(range(L))
    out = sorted({int(i) + L if int(i) < 0 else int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {list(layers)} out of range: the model has L={L} layers (0..{L - 1})")
    return tuple(out)
