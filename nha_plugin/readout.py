"""Linear read-outs of the image embedding: the forward functions Captum methods attribute.

Each is an ``nn.Module`` mapping images (B, 3, H, W) to logits (B, K) and carries its read-out in
attributes the decomposition recognises (``readout`` (D, K), ``logit_scale``, ``normalize``, ``model``), so
``NeuronHeadAttribution`` never needs to import this module.
"""
from __future__ import annotations

import string
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pool import check_directions

__all__ = ["LinearReadout", "ZeroShotClassifier", "TextSimilarity", "encode_image", "encode_texts", "logit_factor",
           "contrastive", "contrastive_columns", "check_templates", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates: Sequence[str]) -> list[str]:
    """Prompt templates as a list, each holding exactly one ``{}`` for the class name (``{{`` / ``}}`` are literal
    braces); refuses anything else with the reason.

    Without a ``{}`` every class would get the same prompt (and the same read-out column); two ``{}``, or a
    named / numbered field, would fail inside ``str.format``.

    Args:
        templates: a sequence of format strings, e.g. ``["a photo of a {}.", "a {}."]``.

    Returns:
        the templates as a list of str.
    """
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(f"templates must be a list of format strings such as ['a photo of a {{}}.']; got "
                        f"{type(templates).__name__} {templates!r}")
    if not templates:
        raise ValueError("templates is empty; give at least one, e.g. ['a photo of a {}.']")
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise TypeError(f"template {i} is a {type(template).__name__}, not a str: {template!r}")
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as err:
            raise ValueError(f"template {i} {template!r} is not a valid format string ({err}); write literal "
                             "braces as '{{' and '}}'") from None
        if fields != [""]:
            found = f"{len(fields)} field(s) {['{' + f + '}' for f in fields]}" if fields else "no '{}'"
            raise ValueError(f"template {i} {template!r} must hold exactly one '{{}}' for the class name; it has "
                             f"{found}. Write e.g. 'a photo of a {{}}.' (literal braces as '{{{{' and '}}}}')")
    return list(templates)


def encode_image(model: nn.Module, images: Tensor) -> Tensor:
    """Unnormalised image embedding (B, D) from a CLIP model, its image tower, or a timm CLIP ResNet."""
    if hasattr(model, "encode_image"):
        try:
            return model.encode_image(images, normalize=False)
        except TypeError:
            return model.encode_image(images)
    return model(images)


def logit_factor(embedding: Tensor, logit_scale: float = 1.0, normalize: bool = False) -> Tensor:
    """The per-image factor f (B,) with ``logit_k = f * (y . w_k)`` for a linear read-out of embeddings y (B, D):
    ``logit_scale``, divided by ``||y||`` for a cosine read-out. Every exact attribution of a read-out scales its
    scores of ``y . w`` by this factor, so they sum to the logit."""
    factor = torch.full((embedding.shape[0],), float(logit_scale), dtype=embedding.dtype, device=embedding.device)
    return factor / embedding.norm(dim=-1) if normalize else factor


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """Unit-norm text embeddings (N, D)."""
    if not hasattr(model, "encode_text"):
        raise TypeError(f"{type(model).__name__} has no encode_text; pass a whole CLIP model (image and text towers)")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


class LinearReadout(nn.Module):
    """logits = logit_scale * normalize?(encode_image(images)) @ readout.

    Args:
        model: a CLIP-ResNet (whole model or image tower).
        readout: (D, K) matrix, one column per output.
        logit_scale: multiplies the logits (CLIP uses 100 for zero-shot classification).
        normalize: divide the image embedding by its norm first (cosine read-out).
        labels: optional names of the K outputs.
    """

    def __init__(self, model: nn.Module, readout: Tensor, logit_scale: float = 1.0, normalize: bool = True,
                 labels: Optional[Sequence[str]] = None):
        super().__init__()
        if readout.dim() != 2:
            raise ValueError(f"readout must be a (D, K) matrix; got shape {tuple(readout.shape)}")
        check_directions(readout.detach().T, "readout column")
        self.model = model
        param = next(model.parameters())
        self.register_buffer("readout", readout.to(device=param.device, dtype=param.dtype))
        self.logit_scale = float(logit_scale)
        self.normalize = bool(normalize)
        self.labels = list(labels) if labels is not None else None

    def forward(self, images: Tensor) -> Tensor:
        y = encode_image(self.model, images)
        if y.shape[-1] != self.readout.shape[0]:
            raise ValueError(f"the image embedding has D={y.shape[-1]} but the read-out expects "
                             f"{self.readout.shape[0]} rows")
        if self.normalize:
            y = F.normalize(y, dim=-1)
        return self.logit_scale * y @ self.readout


class ZeroShotClassifier(LinearReadout):
    """CLIP zero-shot classifier: each class's text embedded with every template (each normalised, averaged,
    renormalised); logits = 100 * cos(image, class)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, logit_scale: float = 100.0):
        if not class_names:
            raise ValueError("class_names is empty; give at least one class")
        templates = check_templates(templates)
        rows = []
        for name in class_names:
            emb = encode_texts(model, tokenizer, [t.format(name) for t in templates])
            rows.append(F.normalize(emb.mean(dim=0), dim=-1))
        super().__init__(model, torch.stack(rows, dim=1), logit_scale=logit_scale, normalize=True,
                         labels=class_names)
        self.templates = templates


class TextSimilarity(LinearReadout):
    """Cosine similarity between images and each of ``texts`` (no templates); logits (B, len(texts))."""

    def __init__(self, model: nn.Module, tokenizer: Callable, texts: Sequence[str], logit_scale: float = 1.0):
        if not texts:
            raise ValueError("texts is empty; give at least one text")
        super().__init__(model, encode_texts(model, tokenizer, texts).T, logit_scale=logit_scale,
                         normalize=True, labels=texts)


def contrastive_columns(readout: Tensor) -> Tensor:
    """Read-out columns (D, K) minus their mean column: logit k becomes ``logit_k - mean_j logit_j``. The one home
    of the contrastive read-out, used by :func:`contrastive` and by the attributions' ``contrastive=True``.

    Args:
        readout: (D, K) with K >= 2.

    Returns:
        (D, K).
    """
    if readout.dim() != 2 or readout.shape[1] < 2:
        raise ValueError(f"a contrastive read-out needs a (D, K) matrix with K >= 2 outputs to compare; got "
                         f"{tuple(readout.shape)}")
    return readout - readout.mean(dim=1, keepdim=True)


def contrastive(readout: LinearReadout) -> LinearReadout:
    """The class-discriminative version of a read-out: each column minus the mean column, so logit k becomes
    ``logit_k - mean_j logit_j`` (the TextSpan segmentation protocol's "class minus the mean over classes").

    Still a linear read-out of the same embedding, so every exact decomposition of it stays exact; a map of it
    shows what separates the class from the others instead of what all classes share.

    Args:
        readout: a :class:`LinearReadout` (``ZeroShotClassifier``, ``TextSimilarity``) with K >= 2 columns.

    Returns:
        a new :class:`LinearReadout` over the same model (the model is shared, not copied).
    """
    labels = [f"{name} (vs mean)" for name in readout.labels] if readout.labels else None
    return LinearReadout(readout.model, contrastive_columns(readout.readout), logit_scale=readout.logit_scale,
                         normalize=readout.normalize, labels=labels)
