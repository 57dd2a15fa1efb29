"""Registers zennit LRP (``lrp_zennit``) with the harness; imported on demand, needs the ``zennit`` extra.

The method propagates the target logit with :class:`nha_plugin.adapters.zennit.CLIPResNetEpsilonGammaBox`
(BatchNorm merged, explicit residual sums, the attention pool's AH rule, ZBox / Gamma(0.25) / Epsilon). It
claims conservation; its completeness error is |sum of input relevance - logit| / |logit| (biases, merged
BatchNorm shifts and the positional embedding absorb relevance, so it is not zero on a real model).
"""
from __future__ import annotations

from ..adapters.zennit import CLIPResNetEpsilonGammaBox, conservation_error, lrp_attribute
from .methods import METHODS, register_method

__all__ = ["lrp_zennit"]


def lrp_zennit(forward, images, target):
    relevance, logits = lrp_attribute(forward, images, target, CLIPResNetEpsilonGammaBox())
    return relevance, conservation_error(relevance, logits, target)


if "lrp_zennit" not in METHODS:
    register_method("lrp_zennit", family="zennit", completeness=True,
                    description="zennit LRP, CLIPResNetEpsilonGammaBox composite (BN merged, residual Sum/Norm, "
                                "attention pool AH rule: attention constant), relevance of the target logit")(lrp_zennit)
