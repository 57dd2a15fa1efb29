"""Randomised copies of a forward wrapper for the model-parameter randomisation check (Adebayo et al. 2018).

Stages are re-drawn top-down and cumulatively (cascading): every parameter p of a stage becomes
``mean(p) + std(p) * N(0, 1)`` (seeded; BatchNorm running statistics kept); the read-out's text directions
are unchanged. ResNet stages: :data:`STAGES`; ViT stages: :data:`VIT_STAGES` (``head`` = ln_post + proj,
``last_block``, ``upper_half`` = blocks L//2..L-1, ``all_blocks``, ``patch_embed`` = conv1, class and positional
embeddings, ln_pre). ResNet stage names given for a ViT are mapped to the ViT stage of the same depth, so
one configuration serves both.
"""
from __future__ import annotations

import copy
from typing import Iterable, List, Sequence

import torch
from torch import nn

from ..readout import LinearReadout
from .forward import is_vit, model_of, vit_model

__all__ = ["STAGES", "VIT_STAGES", "randomised_copy", "vit_randomised_copy", "randomised_copies"]

STAGES = ("attnpool", "layer4", "layer3", "layer2", "layer1", "stem")
VIT_STAGES = ("head", "last_block", "upper_half", "all_blocks", "patch_embed")
# the ViT stage each ResNet stage stands for (same depth order, top-down)
_FROM_RESNET = {"attnpool": "head", "layer4": "last_block", "layer3": "upper_half", "layer2": "all_blocks",
                "layer1": "all_blocks", "stem": "patch_embed"}


def _resnet_parameters(visual: nn.Module, stage: str) -> List[nn.Parameter]:
    if stage == "stem":
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
        return [p for n in names if hasattr(visual, n) for p in getattr(visual, n).parameters()]
    return list(getattr(visual, stage).parameters())


def _vit_parameters(visual: nn.Module, stage: str) -> List[nn.Parameter]:
    blocks = list(visual.transformer.resblocks)
    if stage == "head":
        params = list(visual.ln_post.parameters())
        return params + ([visual.proj] if isinstance(getattr(visual, "proj", None), nn.Parameter) else [])
    if stage == "last_block":
        return list(blocks[-1].parameters())
    if stage == "upper_half":
        return [p for b in blocks[len(blocks) // 2:] for p in b.parameters()]
    if stage == "all_blocks":
        return [p for b in blocks for p in b.parameters()]
    if stage == "patch_embed":
        params = list(visual.conv1.parameters()) + [visual.class_embedding, visual.positional_embedding]
        return params + (list(visual.ln_pre.parameters()) if hasattr(visual, "ln_pre") else [])
    raise ValueError(f"unknown ViT stage {stage!r}; expected one of {VIT_STAGES}")


def _redrawn(forward: nn.Module, model: nn.Module, params: Iterable[nn.Parameter], seed: int) -> nn.Module:
    """Re-draw each parameter once (in the given order, from one seeded generator) and wrap ``model`` (a copy
    already) in a read-out with ``forward``'s directions, scale and normalisation."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for p in params:
            if id(p) in done:
                continue
            done.add(id(p))
            std = p.std() if p.numel() > 1 else p.abs().clamp_min(0.02)
            p.copy_(p.mean() + std * torch.randn(p.shape, generator=g).to(p))
    return LinearReadout(model, forward.readout.detach().clone(), logit_scale=getattr(forward, "logit_scale", 1.0),
                         normalize=getattr(forward, "normalize", False))


def randomised_copy(forward: nn.Module, upto: int, seed: int = 0) -> nn.Module:
    """A copy of a CLIP-ResNet read-out with the first ``upto`` stages of :data:`STAGES` re-drawn.

    Args:
        forward: a linear read-out over a CLIP-ResNet (left untouched).
        upto: how many stages, top-down, to re-draw (1..len(STAGES)).
        seed: the generator's seed.

    Returns:
        A :class:`~nha_plugin.readout.LinearReadout` over the randomised copy.
    """
    model = copy.deepcopy(model_of(forward))
    visual = getattr(model, "visual", model)
    return _redrawn(forward, model, (p for s in STAGES[:upto] for p in _resnet_parameters(visual, s)), seed)


def vit_randomised_copy(forward: nn.Module, upto: int, seed: int = 0) -> nn.Module:
    """A copy of a CLIP-ViT read-out with the first ``upto`` stages of :data:`VIT_STAGES` re-drawn (each
    parameter once), like :func:`randomised_copy`."""
    model = copy.deepcopy(vit_model(forward))
    visual = getattr(model, "visual", model)
    return _redrawn(forward, model, (p for s in VIT_STAGES[:upto] for p in _vit_parameters(visual, s)), seed)


def randomised_copies(forward: nn.Module, stages: Sequence[str], seed: int = 0) -> List[nn.Module]:
    """One cascading randomised copy per stage name, for a ResNet (:data:`STAGES`) or a ViT
    (:data:`VIT_STAGES`; ResNet names are mapped to the ViT stage of the same depth)."""
    vit = is_vit(model_of(forward))
    known = VIT_STAGES + tuple(_FROM_RESNET) if vit else STAGES
    bad = [s for s in stages if s not in known]
    if bad:
        raise ValueError(f"unknown {'ViT' if vit else 'ResNet'} stage(s) {bad}; expected some of {known}")
    if not vit:
        return [randomised_copy(forward, STAGES.index(s) + 1, seed=seed) for s in stages]
    return [vit_randomised_copy(forward, VIT_STAGES.index(_FROM_RESNET.get(s, s)) + 1, seed=seed) for s in stages]
