"""Exact decompositions of CLIP-ViT image towers (open_clip ``VisionTransformer``).

    from nha_plugin import vit
    spec = vit.vit_spec(model)                 # every weight as plain tensors
    tr = vit.trace(spec, images)               # the forward pass with every intermediate
    c = vit.decompose(model, images)           # ViTContributions: layers, heads, tokens, MLPs; exact
    attr = vit.ViTAttribution(readout).attribute(images, target=3, granularity="spatial")
"""
from .spec import LayerNormSpec, UnsupportedModelError, ViTLayerSpec, ViTSpec, vit_spec
from .trace import ViTTrace, trace
from .decomposition import ViTContributions, decompose
from .attribution import ViTAttribution

__all__ = ["vit_spec", "ViTSpec", "ViTLayerSpec", "LayerNormSpec", "UnsupportedModelError", "trace", "ViTTrace",
           "decompose", "ViTContributions", "ViTAttribution"]
