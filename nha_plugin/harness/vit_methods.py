"""CLIP-ViT attribution methods for the harness, registered in the same registry as the ResNet methods.

A ViT runs through the unchanged runner and metrics: the forward wrapper is the same linear read-out
(``ZeroShotClassifier`` over an open_clip CLIP-ViT), and methods return maps on the patch grid, which
:func:`~nha_plugin.harness.methods.to_pixel_map` upsamples like any layer map. Model-agnostic methods
(Captum's integrated gradients, saliency, input x gradient, gradient SHAP, occlusion, and the floors) apply
to a ViT as they are; the ResNet-specific ones (NAD, MaskCLIP/self-self for the attention pool, GradCAM on
layer4) do not. :data:`VIT_DEFAULT_METHODS` lists the set that runs on a ViT.

Registered here:

- ``vit_spatial``: the exact decomposition's spatial map (``nha_plugin.vit.ViTAttribution``, granularity
  "spatial"): per patch, the sum over layers and heads of its token entries' scores against the target's
  read-out column, in logit units; complete (class-token, MLP and embedding terms reported apart).
- ``textspan_vit``: TextSpan's segmentation map (METHODS.md §B): the same token scores against the target
  column minus the mean of all columns (``heat[:, c] - mean over classes``).
- ``vit_maskclip``: MaskCLIP's ViT map (the last block's value path per token, no q/k, no residual or MLP,
  then ln_post and proj; cosine with the target column), the usual training-free ViT baseline.
- ``vit_class_attention``: the last block's class-token attention over patches, mean over heads (ignores the
  target; the ViT analogue of ``class_attention``).

:func:`randomised_copies` extends the parameter-randomisation check to ViTs (stages top-down: ``head``
(ln_post + proj), ``last_block``, ``upper_half`` (blocks L//2..L-1), ``all_blocks``, ``patch_embed`` (conv1,
class and positional embeddings, ln_pre)); ResNet stage names given for a ViT are mapped to their
counterparts, so one configuration serves both.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..readout import logit_factor
from .methods import STAGES, randomised_copy, register_method

__all__ = ["VIT_DEFAULT_METHODS", "VIT_STAGES", "is_vit", "vit_randomised_copy", "randomised_copies",
           "methods_for", "merge_results", "run_side_by_side"]

VIT_DEFAULT_METHODS = ("vit_spatial", "textspan_vit", "vit_maskclip", "vit_class_attention", "integrated_gradients",
                       "saliency", "input_x_gradient", "gradient_shap", "occlusion", "random", "centre")
VIT_STAGES = ("head", "last_block", "upper_half", "all_blocks", "patch_embed")
# the ResNet stage each ViT stage stands in for (same depth order, top-down)
_FROM_RESNET = {"attnpool": "head", "layer4": "last_block", "layer3": "upper_half", "layer2": "all_blocks",
                "layer1": "all_blocks", "stem": "patch_embed"}


def _visual(model: nn.Module) -> nn.Module:
    return getattr(model, "visual", model)


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` (a CLIP model or its image tower) is an open_clip VisionTransformer."""
    visual = _visual(model)
    return hasattr(visual, "transformer") and hasattr(visual, "conv1") and hasattr(visual, "class_embedding")


def methods_for(model: nn.Module, methods: Sequence[str]) -> List[str]:
    """``methods`` unchanged for a ResNet; for a ViT, the harness's default ResNet list becomes
    :data:`VIT_DEFAULT_METHODS` (an explicit list is kept as given)."""
    from .methods import DEFAULT_METHODS
    if is_vit(model) and tuple(methods) == tuple(DEFAULT_METHODS):
        return list(VIT_DEFAULT_METHODS)
    return list(methods)


def _model(forward: nn.Module) -> nn.Module:
    model = getattr(forward, "model", None)
    if model is None or not is_vit(model):
        raise TypeError(f"ViT methods need a linear read-out (ZeroShotClassifier, TextSimilarity, LinearReadout) "
                        f"over an open_clip CLIP-ViT; got {type(forward).__name__} over "
                        f"{type(model).__name__ if model is not None else 'no model'}")
    return model


@register_method("vit_spatial", family="vit", completeness=True, needs_grad=False,
                 description="ViT decomposition spatial map: per patch, sum over layers and heads of its token "
                             "entries' scores against the target column, logit units (exact; class-token, MLP and "
                             "embedding terms reported apart)")
def vit_spatial(forward, images, target):
    from ..vit import ViTAttribution
    _model(forward)
    attr, delta = ViTAttribution(forward).attribute(images, target=target, granularity="spatial",
                                                    return_convergence_delta=True)
    with torch.no_grad():
        logit = forward(images).gather(1, target[:, None])[:, 0]
    return attr, delta / logit.abs().clamp_min(1e-12)


@register_method("textspan_vit", family="vit", needs_grad=False,
                 description="TextSpan segmentation map (METHODS.md B): token scores summed over layers and heads "
                             "against the target column minus the mean column (heat[:, c] - mean over classes)")
def textspan_vit(forward, images, target):
    from ..vit import decompose
    c = decompose(_model(forward), images)
    R = forward.readout.to(c.embedding.dtype)
    e = R[:, target].T - R.mean(dim=1)                                        # (B, D)
    return c.scores(e, level="spatial", per_image=True) * logit_factor(c.embedding, getattr(forward, "logit_scale", 1.0), getattr(forward, "normalize", False)).view(-1, 1, 1)


@register_method("vit_class_attention", family="vit", needs_grad=False, target_dependent=False,
                 description="last ViT block's class-token attention over the patches, mean over heads (ignores "
                             "the target)")
def vit_class_attention(forward, images, target):
    from ..vit import decompose
    c = decompose(_model(forward), images, token_layers=None)
    a = c.attention[:, -1, :, 1:].mean(dim=1)                                 # (B, N - 1), class token first
    return a.reshape(a.shape[0], *c.spec.grid)


@register_method("vit_maskclip", family="vit", needs_grad=False,
                 description="MaskCLIP for ViT: the last block's value path per token, no q/k attention, no "
                             "residual or MLP: proj(ln_post(W_o (W_v ln_1(x_i) + b_v) + b_o)); cosine of each patch "
                             "with the target column")
def vit_maskclip(forward, images, target):
    from ..vit import trace, vit_spec
    spec = vit_spec(_model(forward))
    layer = spec.blocks[-1]
    h = layer.ln_1(trace(spec, images).x_in[-1])                             # (B, N, W)
    v = torch.einsum("hdw,bnw->bnhd", layer.W_v, h) + layer.b_v               # (B, N, H, d)
    z = spec.ln_post(v.flatten(2) @ layer.W_o.T + layer.b_o) @ spec.output_projection()
    e = forward.readout[:, target].T.to(z.dtype)
    cos = torch.einsum("bnd,bd->bn", F.normalize(z[:, 1:], dim=-1), F.normalize(e, dim=-1))
    return cos.reshape(cos.shape[0], *spec.grid)


# ---- parameter randomisation ----------------------------------------------------------------------------
def _stage_parameters(visual: nn.Module, stage: str) -> List[nn.Parameter]:
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


def vit_randomised_copy(forward: nn.Module, upto: int, seed: int = 0) -> nn.Module:
    """A copy of the read-out whose ViT has the first ``upto`` stages of :data:`VIT_STAGES` (top-down) re-drawn
    (each parameter p -> mean(p) + std(p) N(0, 1), seeded, each parameter once), like the ResNet
    :func:`~nha_plugin.harness.methods.randomised_copy`; the read-out's text directions are unchanged."""
    from ..readout import LinearReadout
    model = copy.deepcopy(_model(forward))
    visual = _visual(model)
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for stage in VIT_STAGES[:upto]:
            for p in _stage_parameters(visual, stage):
                if id(p) in done:
                    continue
                done.add(id(p))
                std = p.std() if p.numel() > 1 else p.abs().clamp_min(0.02)
                p.copy_(p.mean() + std * torch.randn(p.shape, generator=g).to(p))
    return LinearReadout(model, forward.readout.detach().clone(), logit_scale=getattr(forward, "logit_scale", 1.0),
                         normalize=getattr(forward, "normalize", False))


def randomised_copies(forward: nn.Module, stages: Sequence[str], seed: int = 0) -> List[nn.Module]:
    """One cascading randomised copy per stage name, for a ResNet (:data:`~nha_plugin.harness.methods.STAGES`)
    or a ViT (:data:`VIT_STAGES`; ResNet names are mapped to the ViT stage of the same depth)."""
    vit = is_vit(forward.model)
    known = VIT_STAGES + tuple(_FROM_RESNET) if vit else STAGES
    bad = [s for s in stages if s not in known]
    if bad:
        raise ValueError(f"unknown {'ViT' if vit else 'ResNet'} stage(s) {bad}; expected some of {known}")
    if not vit:
        return [randomised_copy(forward, STAGES.index(s) + 1, seed=seed) for s in stages]
    return [vit_randomised_copy(forward, VIT_STAGES.index(_FROM_RESNET.get(s, s)) + 1, seed=seed) for s in stages]


# ---- ResNet and ViT side by side ------------------------------------------------------------------------
def merge_results(named: "dict[str, dict]") -> dict:
    """One results dict from several :func:`~nha_plugin.harness.runner.run_benchmark` results (e.g. a ResNet
    and a ViT on the same images): methods keyed ``"<label>:<method>"``, protocols kept per label. The
    report's :func:`~nha_plugin.harness.report.markdown` and ``table`` accept it."""
    if not named:
        raise ValueError("give at least one results dict")
    first = next(iter(named.values()))
    return {"protocol": {label: r["protocol"] for label, r in named.items()}, "metrics": first["metrics"],
            "methods": {f"{label}:{m}": e for label, r in named.items() for m, e in r["methods"].items()}}


def run_side_by_side(configs: "dict[str, object]", out: str, forwards: "dict[str, nn.Module] | None" = None,
                     items=None, classes=None) -> dict:
    """Run :func:`~nha_plugin.harness.runner.run_benchmark` once per labelled configuration on the same images
    (each in ``out/<label>``), with each model's own default method set (:func:`methods_for`), and write the
    merged comparison to ``out/side_by_side.json`` and ``.md`` (atomically).

    Args:
        configs: label -> :class:`~nha_plugin.harness.runner.BenchmarkConfig` (its ``out`` is replaced).
        forwards: label -> forward wrapper overriding the config's model (optional).
        items, classes: shared evaluation items (default: each config's dataset, same seed -> same images).
    """
    import dataclasses
    import json
    import os
    from pathlib import Path

    from . import report, runner

    forwards = forwards or {}
    results = {}
    for label, cfg in configs.items():
        forward = forwards.get(label)
        if forward is None:
            forward = runner._build_forward(cfg, classes or runner.load_benchmark_data(cfg.dataset, cfg.n, cfg.seed,
                                                                                      cfg.path)[1])
        cfg = dataclasses.replace(cfg, out=str(Path(out) / label),
                                  methods=tuple(methods_for(forward.model, cfg.methods)))
        results[label] = runner.run_benchmark(cfg, forward=forward, items=items, classes=classes)
    merged = merge_results(results)
    Path(out).mkdir(parents=True, exist_ok=True)
    md = report.markdown(merged).replace("# Attribution benchmark", "# Attribution benchmark: side by side", 1)
    for name, text in (("side_by_side.json", json.dumps(merged, indent=2)), ("side_by_side.md", md)):
        path = Path(out) / name
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return merged
