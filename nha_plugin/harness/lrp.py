"""zennit LRP (``lrp_zennit``); importing this module needs the ``zennit`` extra (ImportError otherwise, which
:mod:`nha_plugin.harness` turns into an unavailable method that says what to install).

The method propagates the target logit with :class:`nha_plugin.adapters.zennit.CLIPResNetEpsilonGammaBox`
(BatchNorm merged, explicit residual sums, the attention pool's AH rule, ZBox / Gamma(0.25) / Epsilon). It
claims conservation; its completeness error is |sum of input relevance - logit| / |logit| (biases, merged
BatchNorm shifts and the positional embedding absorb relevance, so it is not zero on a real model).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..adapters.zennit import CLIPResNetEpsilonGammaBox, conservation_error, lrp_attribute
from .registry import register_method

__all__ = ["lrp_zennit"]


@register_method("lrp_zennit", family="zennit", completeness=True,
                 description="zennit LRP, CLIPResNetEpsilonGammaBox composite (BN merged, residual Sum/Norm, "
                             "attention pool AH rule: attention constant), relevance of the target logit")
def lrp_zennit(forward: nn.Module, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Input relevance (B, 3, S, S) of the target logit and its relative conservation error (B,)."""
    relevance, logits = lrp_attribute(forward, images, target, CLIPResNetEpsilonGammaBox())
    return relevance, conservation_error(relevance, logits, target)
