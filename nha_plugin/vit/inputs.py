"""Model inputs from uint8 images, for the CLIP-ViT experiments (TextSpan, spurious features, second-order neurons).

    size = input_size(model)                                          # (height, width), e.g. (224, 224)
    x = images_to_input(scenes_uint8, size, torch.float32, "cpu")     # (B, 3, H, W), CLIP-normalised
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["input_size", "images_to_input"]


def input_size(model: nn.Module) -> Tuple[int, int]:
    """(height, width) the image tower takes, 224 when the model does not say.

    Read from open_clip's ``visual.image_size`` (an int or a pair), transformers' ``config.image_size`` (or
    ``config.vision_config.image_size``) or timm's ``patch_embed.img_size``.

    Args:
        model: a CLIP model or its image tower (open_clip, transformers or timm), or a ViTSpec.
    """
    config = getattr(model, "config", None)
    candidates = (getattr(getattr(model, "visual", model), "image_size", None),
                  getattr(getattr(config, "vision_config", config), "image_size", None),
                  getattr(getattr(model, "patch_embed", None), "img_size", None))
    size = next((c for c in candidates if c is not None), 224)
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def images_to_input(images: Union[np.ndarray, Sequence[np.ndarray]], size: Sequence[int], dtype: torch.dtype,
                    device: Union[str, torch.device], preprocess: Optional[Callable] = None) -> Tensor:
    """Images as the model's input.

    Without ``preprocess``: CLIP's normalisation (exactly what ``preprocess`` does to a 224 px image), then a
    bilinear, antialiased resize when the images are not ``size`` already. With ``preprocess`` (open_clip's
    transform): applied to each image as a PIL image.

    Args:
        images: (B, S, S, 3) uint8 (or a sequence of (S, S, 3) arrays with ``preprocess``).
        size: (height, width) of the model's input (:func:`input_size`).
        dtype, device: of the result.
        preprocess: optional PIL -> (3, H, W) tensor transform.

    Returns:
        (B, 3, H, W) tensor.
    """
    if preprocess is not None:
        from PIL import Image
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    else:
        from ..zoo import images_to_tensor
        x = images_to_tensor(np.asarray(images))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.to(device=device, dtype=dtype)
