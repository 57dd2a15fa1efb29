"""Class texts of the segmentor: each class's prompts embedded and averaged, then centred over the classes."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...readout import check_templates

__all__ = ["centre_texts", "class_embeddings"]


def centre_texts(text: Tensor) -> Tensor:
    """Text centring: subtract the mean over the P classes, renormalise each row.

    Args:
        text: class directions (P, D), P >= 2.

    Returns:
        (P, D) unit rows.
    """
    if text.shape[0] < 2:
        raise ValueError(f"text centring needs at least 2 classes; got {text.shape[0]} (pass centre=False)")
    return F.normalize(text - text.mean(dim=0, keepdim=True), dim=-1)


def class_embeddings(model: nn.Module, tokenizer: Callable,
                     classes: Union[Sequence[str], Mapping[str, Sequence[str]]],
                     templates: Optional[Sequence[str]] = None, *, centre: bool = True,
                     cache_dir: Union[str, Path, None, bool] = None, progress: bool = False) -> Tensor:
    """Class text embeddings, one row per class.

    Each class's prompts are embedded and normalised, averaged, renormalised; with ``centre`` the P rows are then
    centred over the classes and renormalised (the paper's "text centring").

    Args:
        model, tokenizer: a whole CLIP model and its tokenizer (as :func:`nha_plugin.load_clip` returns).
        classes: class names (formatted with ``templates``), or a mapping class name -> its own prompt list.
        templates: format strings with ``{}`` for class names (default ``["a photo of a {}."]``); not used with a
            mapping.
        centre: apply text centring.
        cache_dir, progress: passed to :func:`nha_plugin.text.cache.embed_texts`.

    Returns:
        (P, D) float32 on the CPU.
    """
    from ...text.cache import embed_texts
    if isinstance(classes, Mapping):
        prompts = {name: list(p) for name, p in classes.items()}
    else:
        templates = check_templates(templates) if templates else ["a photo of a {}."]
        prompts = {name: [t.format(name) for t in templates] for name in classes}
    if not prompts or any(not p for p in prompts.values()):
        raise ValueError("give at least one class and at least one prompt per class")
    flat = [t for p in prompts.values() for t in p]
    emb = embed_texts(model, tokenizer, flat, None, cache_dir=cache_dir, progress=progress)
    rows, start = [], 0
    for p in prompts.values():
        rows.append(F.normalize(emb[start:start + len(p)].mean(dim=0), dim=-1))
        start += len(p)
    text = torch.stack(rows)
    return centre_texts(text) if centre else text
