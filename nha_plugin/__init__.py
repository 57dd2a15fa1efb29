"""nha_plugin: the exact neuron x head decomposition of CLIP-ResNet for Captum, zennit, TransformerLens and
open_clip users.

    import nha_plugin as nha
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    contrib = nha.decompose(model, images)               # nha.Contributions
    nad = nha.NeuronHeadAttribution(nha.harness.ZeroShotClassifier(model, tokenizer, classes))
    stats = nha.stats.collect(model, dataset, batch_size=32)   # streaming, torchrun-aware dataset statistics
    parts = nha.vit.decompose(vit_model, images)          # CLIP-ViT: layers x heads x tokens, MLPs (exact)

Names and subpackages load on first use (PEP 562), so ``import nha_plugin`` and ``nha --help`` do not pay for
torch, Captum or open_clip until something needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> module that defines it (relative to this package)
_ATTRIBUTES = {
    "load_clip": ".models", "decompose": ".models", "PretrainedUnavailableError": ".models",
    "decompose_features": ".decomposition", "Contributions": ".decomposition",
    "NeuronHeadAttribution": ".attribution", "lift_to_input": ".attribution",
    "AttentionPoolSpec": ".spec", "UnsupportedModelError": ".spec",
    "pair_directions": ".pool",
}
_SUBPACKAGES = ("adapters", "applications", "cli", "datasets", "decomposition", "files", "harness", "hooks", "models",
                "pool", "pool_maps", "readout", "readout_attribution", "runs", "scenes", "spec", "stats", "text", "version", "vit", "zoo")

__all__ = sorted(_ATTRIBUTES) + ["adapters", "applications", "harness", "stats", "text", "vit", "__version__"]


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'nha_plugin' has no attribute {name!r}")
    globals()[name] = value                      # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_ATTRIBUTES) | set(_SUBPACKAGES))


if TYPE_CHECKING:                                # static analysers and IDEs see the eager imports
    from . import adapters, applications, harness, stats, text, vit  # noqa: F401
    from .attribution import NeuronHeadAttribution, lift_to_input  # noqa: F401
    from .decomposition import Contributions, decompose_features  # noqa: F401
    from .models import PretrainedUnavailableError, decompose, load_clip  # noqa: F401
    from .pool import pair_directions  # noqa: F401
    from .spec import AttentionPoolSpec, UnsupportedModelError  # noqa: F401
