"""Build and load the bundled planted-concept CLIP models of this folder (``scenes-rn``, ``scenes-vit``).

Each model is ``<name>.json`` (an open_clip model config plus an ``"nha"`` section: preprocessing, weights
file, model card, training script and its defaults) and ``<name>.safetensors`` (fp16 weights). The model is a
plain ``open_clip.model.CLIP`` built from the config, so every open_clip code path applies to it unchanged:
``scenes-rn`` has a ``ModifiedResNet`` image tower, ``scenes-vit`` a ``VisionTransformer``.

Example:
    >>> from nha_plugin.zoo.bundled import load_zoo_model
    >>> model, preprocess, tokenizer = load_zoo_model("scenes-vit")
    >>> type(model.visual).__name__
    'VisionTransformer'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

ZOO_DIR = Path(__file__).resolve().parent
MODELS: Tuple[str, ...] = ("scenes-rn", "scenes-vit")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def config_path(name: str) -> Path:
    """The JSON config of bundled model ``name`` (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {', '.join(MODELS)}")
    return ZOO_DIR / f"{name}.json"


def zoo_config(name_or_path: Union[str, Path] = "scenes-rn") -> dict:
    """The open_clip model config dict (with the extra top-level ``"nha"`` key).

    Args:
        name_or_path: a bundled model name (``"scenes-rn"``, ``"scenes-vit"``) or a path to a JSON config.
    """
    path = config_path(name_or_path) if str(name_or_path) in MODELS else Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"expected a bundled model name ({', '.join(MODELS)}) or the path of a JSON config; "
                         f"got {str(name_or_path)!r}, which is neither")
    with open(path) as f:
        return json.load(f)


def build_model(config: dict) -> torch.nn.Module:
    """A randomly initialised ``open_clip.model.CLIP`` with the architecture of ``config``."""
    import open_clip

    return open_clip.model.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                                text_cfg=config["text_cfg"])


def preprocess_mean_std(config: Optional[dict] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The per-channel (mean, std) of the model's preprocessing (OpenAI's when ``config`` has none)."""
    nha = (config or {}).get("nha", {})
    return tuple(nha.get("preprocess_mean", _OPENAI_MEAN)), tuple(nha.get("preprocess_std", _OPENAI_STD))


def images_to_tensor(images: np.ndarray, config: Optional[dict] = None) -> torch.Tensor:
    """(B, 224, 224, 3) uint8 -> (B, 3, 224, 224) float, normalised exactly as ``preprocess`` does for
    224x224 PIL images (resize and centre crop are the identity at the models' input size, 224)."""
    mean, std = preprocess_mean_std(config)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_state_dict_file(path: Union[str, Path]) -> dict:
    """Read a safetensors state dict, casting floating tensors (stored as fp16) to float32."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def weights_path(config: dict, name: str = "scenes-rn") -> Path:
    """Where the bundled weights of ``config`` live: ``ZOO_DIR / config["nha"]["weights"]``, else
    ``ZOO_DIR / "<name>.safetensors"``."""
    return ZOO_DIR / config.get("nha", {}).get("weights", f"{name}.safetensors")


def load_zoo_model(name: str = "scenes-rn", device: Union[str, torch.device] = "cpu",
                   weights: Union[str, Path, None] = None, config: Optional[dict] = None):
    """Returns ``(model, preprocess, tokenizer)`` for a bundled model, offline.

    Args:
        name: ``"scenes-rn"`` or ``"scenes-vit"``.
        device: where to put the model.
        weights: a safetensors file to load instead of the bundled one.
        config: a config dict to use instead of the bundled ``<name>.json``.

    Returns:
        model: ``open_clip.model.CLIP`` in eval mode, float32.
        preprocess: PIL image -> (3, S, S) tensor (``open_clip.transform.image_transform``, S = image size).
        tokenizer: ``open_clip.tokenizer.SimpleTokenizer`` with the model's context length.

    Raises:
        FileNotFoundError: the weights file is missing (says how to train it).
    """
    import open_clip

    cfg = config or zoo_config(name)
    path = Path(weights) if weights is not None else weights_path(cfg, name)
    if not path.is_file():
        script = cfg.get("nha", {}).get("training_script", "nha_plugin.zoo.train_scenes_rn")
        raise FileNotFoundError(f"{name} weights not found at {path}; train them with `python -m {script}` "
                                f"(recipe in {cfg.get('nha', {}).get('card', 'the model card')}) "
                                f"or reinstall nha_plugin")
    model = build_model(cfg)
    model.load_state_dict(load_state_dict_file(path))
    model.to(device).eval()
    mean, std = preprocess_mean_std(cfg)
    preprocess = open_clip.transform.image_transform(cfg["vision_cfg"]["image_size"], is_train=False,
                                                     mean=mean, std=std)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model, preprocess, tokenizer
