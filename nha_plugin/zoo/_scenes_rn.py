"""Build and load the bundled planted-concept CLIP-ResNet ``scenes-rn`` (config + safetensors in this folder).

The model is a plain ``open_clip.model.CLIP`` built from ``scenes-rn.json``, so every open_clip / CLIP-ResNet
code path applies to it unchanged.

Example:
    >>> from nha_plugin.zoo._scenes_rn import load_scenes_rn
    >>> model, preprocess, tokenizer = load_scenes_rn()
    >>> model.visual.attnpool.num_heads
    8
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

ZOO_DIR = Path(__file__).resolve().parent
CONFIG_PATH = ZOO_DIR / "scenes-rn.json"
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def scenes_rn_config(path: Union[str, Path, None] = None) -> dict:
    """The open_clip model config dict (with the extra top-level ``"nha"`` key)."""
    with open(path or CONFIG_PATH) as f:
        return json.load(f)


def build_scenes_rn(config: Optional[dict] = None) -> torch.nn.Module:
    """A randomly initialised ``open_clip.model.CLIP`` with the ``scenes-rn`` architecture."""
    import open_clip

    cfg = config or scenes_rn_config()
    return open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])


def preprocess_mean_std(config: Optional[dict] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    nha = (config or scenes_rn_config()).get("nha", {})
    return tuple(nha.get("preprocess_mean", _OPENAI_MEAN)), tuple(nha.get("preprocess_std", _OPENAI_STD))


def images_to_tensor(images: np.ndarray, config: Optional[dict] = None) -> torch.Tensor:
    """(B, 224, 224, 3) uint8 -> (B, 3, 224, 224) float, normalised exactly as ``preprocess`` does for
    224x224 PIL images (resize and centre crop are the identity at that size)."""
    mean, std = preprocess_mean_std(config)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_state_dict_file(path: Union[str, Path]) -> dict:
    """Read a safetensors state dict, casting floating tensors (stored as fp16) to float32."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


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
    import open_clip

    cfg = scenes_rn_config()
    path = Path(weights) if weights is not None else ZOO_DIR / cfg.get("nha", {}).get("weights", "scenes-rn.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"scenes-rn weights not found at {path}; train them with "
                                f"`python -m nha_plugin.zoo.train_scenes_rn` or reinstall nha_plugin")
    model = build_scenes_rn(cfg)
    model.load_state_dict(load_state_dict_file(path))
    model.to(device).eval()
    mean, std = preprocess_mean_std(cfg)
    preprocess = open_clip.transform.image_transform(cfg["vision_cfg"]["image_size"], is_train=False, mean=mean, std=std)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model, preprocess, tokenizer
