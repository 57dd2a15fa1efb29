"""Exact decompositions of CLIP-ViT image towers: open_clip ``VisionTransformer``, transformers ``CLIPModel`` /
``CLIPVisionModel(WithProjection)`` and timm ``VisionTransformer`` CLIP towers (``vit.spec`` reads each).

    from nha_plugin import vit
    spec = vit.vit_spec(model)                 # every weight as plain tensors
    tr = vit.trace(spec, images)               # the forward pass with every intermediate
    c = vit.decompose(model, images)           # ViTContributions: layers, heads, tokens, MLPs; exact
    attr = vit.ViTAttribution(readout).attribute(images, target=3, granularity="spatial")
    phi = vit.second_order_effects(tr, vit.second_order_directions(spec, layer=1), layer=1)   # (B, M, D)
"""
from .spec import LayerNormSpec, UnsupportedModelError, ViTLayerSpec, ViTSpec, vit_spec
from .trace import ViTTrace, trace
from .decomposition import ViTContributions, decompose
from .attribution import ViTAttribution
from . import second_order, textspan_heads
from .second_order import (SecondOrderStats, collect_second_order, second_order_coefficients,
                           second_order_directions, second_order_effects)

__all__ = ["vit_spec", "ViTSpec", "ViTLayerSpec", "LayerNormSpec", "UnsupportedModelError", "trace", "ViTTrace",
           "decompose", "ViTContributions", "ViTAttribution", "second_order", "textspan_heads", "SecondOrderStats",
           "collect_second_order", "second_order_coefficients", "second_order_directions", "second_order_effects"]
