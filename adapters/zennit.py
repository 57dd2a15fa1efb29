"""zennit LRP for CLIP-ResNets: canonizers that make layer-wise relevance propagation proper on them.

CLIP's ModifiedResNet breaks two assumptions of plain gradient-based LRP: the bottleneck's ``out += identity``
is an implicit sum (a gradient copies relevance into both branches, doubling it), and the attention pool mixes
tokens through a softmax. The canonizers here (all constructible without arguments, so Quantus or
``zennit.composites`` can build them):

- :class:`CLIPBatchNormCanonizer` merges every BatchNorm into the convolution before it (stem, bottlenecks,
  downsample branches), found by name in the model.
- :class:`CLIPBottleneckCanonizer` makes the residual sum an explicit ``zennit.layer.Sum`` module, so the
  composite's ``Norm`` rule splits relevance between the branches in proportion to their contributions.
- :class:`AttentionPoolCanonizer` rewrites ``AttentionPool2d.forward`` for the AH rule (Ali et al. 2022):
  the softmax attention is held constant (detached), so relevance flows only through the values; the
  attention-weighted sum over tokens and the mean token are propagated with the LRP-epsilon rule for a linear
  map with constant coefficients, and the positional embedding enters through an explicit ``Sum`` (its share
  is absorbed, as a bias's is). The rewritten forward returns the same embedding as the original.
- :class:`CLIPResNetCanonizer` bundles the three.

Composites (registered with ``zennit.composites.register_composite``): ``"clip_resnet_epsilon_gamma_box"``
(ZBox on the first convolution with CLIP's normalised pixel bounds, Gamma(0.25) on convolutions, Epsilon on
linear layers) and ``"clip_resnet_epsilon_plus"``. :func:`lrp_readout` turns a linear read-out
(``ZeroShotClassifier``…) into a module whose cosine normalisation is held constant, so its logit is
propagated as well.

Example::

    from zennit.attribution import Gradient
    from nha_plugin.adapters.zennit import CLIPResNetEpsilonGammaBox, lrp_readout, lrp_attribute
    relevance, logits = lrp_attribute(head, images, target)          # (B, 3, S, S), (B, K)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import require_extra

require_extra("zennit", "zennit")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, MergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonGammaBox, EpsilonPlus, register_composite  # noqa: E402
from zennit.layer import Sum  # noqa: E402

__all__ = ["CLIPBatchNormCanonizer", "CLIPBottleneckCanonizer", "AttentionPoolCanonizer", "CLIPResNetCanonizer",
           "CLIPResNetEpsilonGammaBox", "CLIPResNetEpsilonPlus", "LRPReadout", "lrp_readout", "lrp_attribute",
           "conservation_error", "conservation_table", "COMPOSITE_NAMES", "CLIP_MEAN", "CLIP_STD"]

# the names under which importing this module registers the composites in zennit.composites.COMPOSITES
COMPOSITE_NAMES = ("clip_resnet_epsilon_gamma_box", "clip_resnet_epsilon_plus")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _act(module: nn.Module, i: int) -> nn.Module:
    """open_clip names the bottleneck ReLUs act1..3, OpenAI's clip relu1..3."""
    return getattr(module, f"act{i}", None) or getattr(module, f"relu{i}")


def _is_bottleneck(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "avgpool", "downsample"))


def _is_attention_pool(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "c_proj", "positional_embedding",
                                             "num_heads"))


class CLIPBatchNormCanonizer(MergeBatchNorm):
    """Merge each BatchNorm2d of a CLIP ResNet into the convolution before it. The pairs are found by name
    (``convI``/``bnI`` siblings and ``downsample.0``/``downsample.1``), so no argument is needed."""

    def apply(self, root_module: nn.Module):
        modules = dict(root_module.named_modules())
        instances = []
        for name, module in modules.items():
            if not isinstance(module, nn.BatchNorm2d):
                continue
            prefix, _, last = name.rpartition(".")
            conv_name = None
            if last.startswith("bn") and last[2:].isdigit():
                conv_name = f"{prefix}.conv{last[2:]}" if prefix else f"conv{last[2:]}"
            elif last == "1" and prefix.endswith("downsample"):
                conv_name = f"{prefix}.0"
            conv = modules.get(conv_name)
            if isinstance(conv, nn.Conv2d):
                instance = self.copy()
                instance.register([conv], module)
                instances.append(instance)
        return instances

    def copy(self):
        return self.__class__()


class CLIPBottleneckCanonizer(AttributeCanonizer):
    """Give every CLIP ResNet bottleneck an explicit ``canonizer_sum`` (``zennit.layer.Sum``) for its residual."""

    def __init__(self):
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module):
        if _is_bottleneck(module):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = _act(self, 1)(self.bn1(self.conv1(x)))
        out = _act(self, 2)(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.canonizer_sum(torch.stack([identity, out], dim=-1))
        return _act(self, 3)(out)


class _ConstantWeightSum(torch.autograd.Function):
    """y[b, o, c] = sum_t w[b, o, t] x[b, t, c] with w held constant; the backward pass carries relevance
    with the epsilon rule for this linear map: R_x[t, c] = x[t, c] sum_o w[o, t] R_y[o, c] / (y[o, c] + eps)."""

    @staticmethod
    def forward(ctx, weights: Tensor, x: Tensor, eps: float) -> Tensor:
        y = torch.einsum("bot,btc->boc", weights, x)
        ctx.save_for_backward(weights, x, y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, relevance: Tensor):
        weights, x, y = ctx.saved_tensors
        z = y + ctx.eps * torch.where(y >= 0, 1.0, -1.0).to(y)
        return None, x * torch.einsum("bot,boc->btc", weights, relevance / z), None


class AttentionPoolCanonizer(AttributeCanonizer):
    """AH rule for ``AttentionPool2d``: attention constant, relevance through values, c_proj and v_proj (whose
    nn.Linear rules the composite sets); mean token and token mixing by the epsilon rule; positional embedding
    through an explicit ``Sum``."""

    eps = 1e-9

    def __init__(self):
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module):
        if _is_attention_pool(module):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        tokens = x.flatten(start_dim=2).transpose(1, 2)                              # (B, hw, C)
        hw = tokens.shape[1]
        mean_w = torch.full((B, 1, hw), 1.0 / hw, dtype=x.dtype, device=x.device)
        tokens = torch.cat([_ConstantWeightSum.apply(mean_w, tokens, AttentionPoolCanonizer.eps), tokens], dim=1)
        pos = self.positional_embedding.to(x.dtype)[None].expand_as(tokens)
        z = self.canonizer_sum(torch.stack([tokens, pos], dim=-1))                    # (B, T, C)
        H = self.num_heads
        d = C // H
        q = self.q_proj(z[:, :1]).view(B, 1, H, d).transpose(1, 2)                  # (B, H, 1, d)
        k = self.k_proj(z).view(B, -1, H, d).transpose(1, 2)                         # (B, H, T, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).detach()   # (B, H, 1, T)
        v = self.v_proj(z).view(B, -1, H, d).transpose(1, 2).reshape(B * H, -1, d)  # (B*H, T, d)
        out = _ConstantWeightSum.apply(attn.reshape(B * H, 1, -1), v, AttentionPoolCanonizer.eps)
        return self.c_proj(out.view(B, H * d))


class CLIPResNetCanonizer(CompositeCanonizer):
    """BatchNorm merging + explicit residual sums + the attention pool's AH rule, for CLIP ModifiedResNets.

    Applied to a cosine read-out (``ZeroShotClassifier``, ``TextSimilarity``, ``LinearReadout`` with
    ``normalize=True``) instead of its :func:`lrp_readout`, it raises: there the embedding's norm is a traced
    function of the image, the rules would propagate through the division and the relevance would silently
    change (signs included)."""

    def __init__(self):
        super().__init__([CLIPBatchNormCanonizer(), CLIPBottleneckCanonizer(), AttentionPoolCanonizer()])

    def apply(self, root_module: nn.Module):
        if _is_cosine_readout(root_module):
            raise ValueError(
                f"the CLIP-ResNet LRP composite was applied to a cosine read-out ({type(root_module).__name__}); "
                "its normalisation has no LRP rule and the relevance would be wrong without an error. Apply it to "
                "nha_plugin.adapters.zennit.lrp_readout(forward) instead (or call lrp_attribute(forward, ...))")
        return super().apply(root_module)


def _is_cosine_readout(module: nn.Module) -> bool:
    """A read-out recognised by its attributes (never by importing it) that divides by the embedding's norm."""
    return (not isinstance(module, LRPReadout) and isinstance(getattr(module, "readout", None), Tensor)
            and bool(getattr(module, "normalize", False)) and hasattr(module, "logit_scale"))


def _bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


@register_composite("clip_resnet_epsilon_gamma_box")
class CLIPResNetEpsilonGammaBox(EpsilonGammaBox):
    """EpsilonGammaBox with the CLIP-ResNet canonizers; ``low``/``high`` default to CLIP's normalised [0, 1]
    pixel bounds, so the composite is constructible without arguments."""

    def __init__(self, low: Optional[Tensor] = None, high: Optional[Tensor] = None, epsilon: float = 1e-6,
                 gamma: float = 0.25, stabilizer: float = 1e-6, layer_map=None, first_map=None, zero_params=None,
                 canonizers=None):
        lo, hi = _bounds(CLIP_MEAN, CLIP_STD)
        super().__init__(low=lo if low is None else low, high=hi if high is None else high, epsilon=epsilon,
                         gamma=gamma, stabilizer=stabilizer, layer_map=layer_map, first_map=first_map,
                         zero_params=zero_params, canonizers=[CLIPResNetCanonizer()] + list(canonizers or []))


@register_composite("clip_resnet_epsilon_plus")
class CLIPResNetEpsilonPlus(EpsilonPlus):
    """EpsilonPlus (ZPlus on convolutions, Epsilon on linear layers) with the CLIP-ResNet canonizers."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, layer_map=None, zero_params=None,
                 canonizers=None):
        super().__init__(epsilon=epsilon, stabilizer=stabilizer, layer_map=layer_map, zero_params=zero_params,
                         canonizers=[CLIPResNetCanonizer()] + list(canonizers or []))


class _ConstantScale(torch.autograd.Function):
    """y = x * c with c held constant; relevance passes unchanged (contributions scale with their sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor) -> Tensor:
        return x * c

    @staticmethod
    def backward(ctx, relevance: Tensor):
        return relevance, None


class LRPReadout(nn.Module):
    """logits = Linear_readout(scale * y) with y the image tower's embedding and scale = logit_scale / ||y||
    (cosine read-outs) held constant: the same logits as the read-out, with a linear last layer LRP can use.

    Args:
        visual: the CLIP image tower (``model.visual``).
        readout: (D, K) read-out matrix.
        logit_scale, normalize: as on :class:`nha_plugin.readout.LinearReadout`.
    """

    def __init__(self, visual: nn.Module, readout: Tensor, logit_scale: float = 1.0, normalize: bool = True):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(readout.shape[0], readout.shape[1], bias=False).to(readout)
        with torch.no_grad():
            self.head.weight.copy_(readout.T)
        self.head.weight.requires_grad_(False)
        self.logit_scale = float(logit_scale)
        self.normalize = bool(normalize)

    def forward(self, images: Tensor) -> Tensor:
        y = self.visual(images.to(self.head.weight.dtype))
        scale = torch.full_like(y[:, :1], self.logit_scale)
        if self.normalize:
            scale = scale / y.norm(dim=-1, keepdim=True).detach()
        return self.head(_ConstantScale.apply(y, scale.detach()))


def lrp_readout(forward: nn.Module) -> LRPReadout:
    """:class:`LRPReadout` for a ``LinearReadout`` / ``ZeroShotClassifier`` / ``TextSimilarity``."""
    model = forward.model
    return LRPReadout(getattr(model, "visual", model), forward.readout.detach(),
                      getattr(forward, "logit_scale", 1.0), getattr(forward, "normalize", False))


def lrp_attribute(forward: nn.Module, images: Tensor, target: Tensor, composite=None) -> tuple[Tensor, Tensor]:
    """LRP relevance (B, 3, S, S) of ``forward(images)[b, target[b]]`` and the logits (B, K).

    The output relevance is the target logit itself, so a conserving propagation gives input relevances that
    sum to it; :func:`conservation_error` measures how far they are."""
    head = lrp_readout(forward)
    composite = composite if composite is not None else CLIPResNetEpsilonGammaBox()
    target = torch.as_tensor(target, dtype=torch.long, device=images.device).flatten()

    def start(out: Tensor) -> Tensor:
        return out * F.one_hot(target.expand(out.shape[0]), out.shape[1]).to(out)

    with Gradient(model=head, composite=composite) as attributor:
        logits, relevance = attributor(images.detach().clone().requires_grad_(True), start)
    return relevance, logits.detach()


def conservation_error(relevance: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """|sum of input relevance - target logit| / |target logit|, (B,)."""
    target = torch.as_tensor(target, dtype=torch.long, device=logits.device).flatten().expand(logits.shape[0])
    total = logits.gather(1, target[:, None])[:, 0]
    return (relevance.flatten(start_dim=1).sum(dim=1) - total).abs() / total.abs().clamp_min(1e-12)


def conservation_table(forward: nn.Module, images: Tensor, target: Tensor, composite=None,
                       stages: Sequence[str] = ("layer1", "layer2", "layer3", "layer4", "attnpool")) -> list:
    """Where relevance is lost: the relevance entering each stage of the image tower, as a fraction of the logit.

    The relevance at a stage is the sum over the stage's output of what the rules above it passed down (zennit
    hands it as the gradient of that tensor); "input" is the pixels' relevance. A conserving rule keeps the
    fraction; biases, merged BatchNorm shifts and the positional embedding absorb what a stage loses.

    Args:
        forward: a linear read-out (as for :func:`lrp_attribute`).
        images: (B, 3, S, S).
        target: int or (B,) read-out columns.
        composite: the zennit composite (default :class:`CLIPResNetEpsilonGammaBox`).
        stages: submodules of the image tower, bottom to top.

    Returns:
        Rows top-down ``{"stage", "relevance" (B,) sums, "fraction" (B,) relevance / logit, "lost" (B,) fraction
        lost between this stage and the one above}``: first ``"logit"`` (fraction 1), then the stages from the
        top, last ``"input"``.
    """
    head = lrp_readout(forward)
    composite = composite if composite is not None else CLIPResNetEpsilonGammaBox()
    target = torch.as_tensor(target, dtype=torch.long, device=images.device).flatten().expand(images.shape[0])
    outputs: dict = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    x = images.detach().clone().requires_grad_(True)
    with Gradient(model=head, composite=composite) as attributor:
        # registered after the composite's own hooks, so the tensors kept are the ones its rules pass relevance to
        handles = [getattr(head.visual, name).register_forward_hook(keep(name)) for name in stages]
        try:
            logits, relevance = attributor(x, lambda out: out * F.one_hot(target, out.shape[1]).to(out))
        finally:
            for h in handles:
                h.remove()
    logit = logits.detach().gather(1, target[:, None])[:, 0]
    sums = [("logit", logit)] + [(n, outputs[n].grad.flatten(1).sum(1)) for n in reversed(stages)]
    sums.append(("input", relevance.flatten(1).sum(1)))
    rows, above = [], None
    for name, total in sums:
        fraction = (total / logit).detach()
        rows.append({"stage": name, "relevance": total.detach(), "fraction": fraction,
                     "lost": torch.zeros_like(fraction) if above is None else above - fraction})
        above = fraction
    return rows
