"""The checks every image tower's input needs, in one place: a non-empty float batch (B, 3, H, W) of finite values
on the model's device and dtype. Each family adds its own size rule (:func:`nha_plugin.models.validate_images`
for CLIP-ResNets, :func:`nha_plugin.vit.trace.validate_images` for CLIP-ViTs)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_image_batch", "check_pixels"]


def check_pixels(images: Tensor, *, preprocess_hint: str = "the model's preprocess") -> None:
    """The checks that do not depend on the model: a non-empty (B, 3, H, W) batch of finite float pixels.

    Code that moves a batch to the model's device and dtype itself (the statistics pass) calls this first, so
    that raw integer pixels are refused instead of being cast to floats that look valid.

    Args:
        images: what the caller passed as images.
        preprocess_hint: where correctly prepared images come from, named in the messages.

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: wrong rank, channel count, no images or pixels, NaN/Inf values.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"expected images as a float tensor (B, 3, H, W); got {type(images).__name__}. "
                        f"Apply {preprocess_hint} to each PIL image and torch.stack them")
    if images.dim() == 3:
        raise ValueError(f"expected a batch (B, 3, H, W); got one image {tuple(images.shape)}: "
                         "use images.unsqueeze(0)")
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W); got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("empty batch: images has 0 entries; pass at least one image")
    if images.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels; got {images.shape[1]} (shape {tuple(images.shape)}). "
                         "Convert greyscale/RGBA with PIL's image.convert('RGB') before the preprocess")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images have no pixels (shape {tuple(images.shape)}); pass images of the model's size")
    if not images.is_floating_point():
        raise TypeError(f"expected float pixels normalised by the preprocess; got {images.dtype} (raw pixel values "
                        f"are not CLIP's input). Use {preprocess_hint}")
    bad = 0 if images.is_meta else int((~torch.isfinite(images)).sum())     # meta tensors hold no values
    if bad:
        raise ValueError(f"images contain {bad} NaN/Inf values; fix or drop those images before decomposing")


def check_image_batch(images: Tensor, *, device: torch.device, dtype: torch.dtype,
                      preprocess_hint: str = "the model's preprocess") -> None:
    """Raise a TypeError/ValueError that says what was expected, what came and what to do.

    Args:
        images: what the caller passed as images.
        device, dtype: the model's.
        preprocess_hint: where correctly prepared images come from, named in the messages.
    """
    check_pixels(images, preprocess_hint=preprocess_hint)
    if images.device != torch.device(device):
        raise ValueError(f"images are on {images.device} but the model is on {device}: use images.to('{device}')")
    if images.dtype != dtype:
        raise TypeError(f"images are {images.dtype} but the model is {dtype}: use images.to({dtype}) "
                        "or load the model with another precision")
