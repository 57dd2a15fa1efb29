"""nha_plugin: the exact neuron x head decomposition of CLIP-ResNet for Captum, zennit, TransformerLens and
open_clip users.

    import nha_plugin as nha
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    contrib = nha.decompose(model, images)               # nha.Contributions
    nad = nha.NeuronHeadAttribution(nha.harness.ZeroShotClassifier(model, tokenizer, classes))
    stats = nha.stats.collect(model, dataset, batch_size=32)   # streaming, torchrun-aware dataset statistics
    parts = nha.vit.decompose(vit_model, images)          # CLIP-ViT: layers x heads x tokens, MLPs (exact)
"""
from . import adapters, applications, harness, stats, text, vit
from .attribution import NeuronHeadAttribution, lift_to_input
from .decomposition import Contributions, decompose_features
from .pool import pair_directions
from .models import PretrainedUnavailableError, decompose, load_clip
from .spec import AttentionPoolSpec, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "load_clip", "decompose", "decompose_features", "Contributions", "NeuronHeadAttribution", "lift_to_input",
    "AttentionPoolSpec", "UnsupportedModelError", "PretrainedUnavailableError", "pair_directions",
    "adapters", "applications", "harness", "stats", "text", "vit",
]
