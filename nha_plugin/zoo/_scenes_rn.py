"""Build and load the bundled planted-concept CLIP-ResNet ``scenes-rn`` (config + safetensors in this folder).

The model is a plain ``open_clip.model.CLIP`` built from ``scenes-rn.json``, so every open_clip / CLIP-ResNet
code path applies to it unchanged. The machinery shared with ``scenes-vit`` lives in :mod:`._zoo`.

Example:
    >>> from nha_plugin.zoo._scenes_rn import load_scenes_rn
    >>> model, preprocess, tokenizer = load_scenes_rn()
    >>> model.visual.attnpool.num_heads
    8
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ._zoo import (
    ZOO_DIR,
    build_model,
    images_to_tensor,
    load_state_dict_file,
    load_zoo_model,
    preprocess_mean_std,
    zoo_config,
)

# images_to_tensor, load_state_dict_file, preprocess_mean_std: shared with scenes-vit, re-exported for old imports
__all__ = ["ZOO_DIR", "CONFIG_PATH", "scenes_rn_config", "build_scenes_rn", "load_scenes_rn", "images_to_tensor",
           "load_state_dict_file", "preprocess_mean_std"]

CONFIG_PATH = ZOO_DIR / "scenes-rn.json"


def scenes_rn_config(path: Union[str, Path, None] = None) -> dict:
    """The open_clip model config dict (with the extra top-level ``"nha"`` key)."""
    return zoo_config(path or "scenes-rn")


def build_scenes_rn(config: Optional[dict] = None) -> torch.nn.Module:
    """A randomly initialised ``open_clip.model.CLIP`` with the ``scenes-rn`` architecture."""
    return build_model(config or scenes_rn_config())


def load_scenes_rn(device: Union[str, torch.device] = "cpu", weights: Union[str, Path, None] = None):
    """Returns ``(model, preprocess, tokenizer)`` for the bundled ``scenes-rn`` model, offline.

    Args:
        device: where to put the model.
        weights: a safetensors file to load instead of the bundled one.

    Returns:
        model: ``open_clip.model.CLIP`` in eval mode, float32.
        preprocess: PIL image -> (3, 224, 224) tensor (``open_clip.transform.image_transform``).
        tokenizer: ``open_clip.tokenizer.SimpleTokenizer`` with the model's context length.
    """
    return load_zoo_model("scenes-rn", device, weights)
