"""Captum baselines: integrated gradients, saliency, input x gradient, gradient SHAP, occlusion, GradCAM and layer
integrated gradients on layer4.

Their knobs travel as an argument, a :class:`CaptumSettings` passed as ``explain(..., captum=settings)`` (the
runner hands over ``BenchmarkConfig.captum``); :data:`CAPTUM_SETTINGS` is the default and is never changed.
Gradient SHAP is the one stochastic method here: it takes per-image ``seeds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..adapters import get_spec
from .forward import model_of, relative_to_logit
from .registry import register_method
from .seeds import global_rngs_restored, seed_globals

__all__ = ["CaptumSettings", "CAPTUM_SETTINGS", "integrated_gradients", "saliency", "input_x_gradient",
           "gradient_shap", "occlusion", "gradcam", "layer_integrated_gradients"]


@dataclass(frozen=True)
class CaptumSettings:
    """Settings of the Captum methods (recorded in the benchmark's protocol).

    Attributes:
        ig_steps: IntegratedGradients / LayerIntegratedGradients steps (Gauss-Legendre, zero baseline).
        gradshap_samples: GradientShap samples; baselines {zeros, uniform noise in [-1, 1]}.
        gradshap_stdev: GradientShap's Gaussian noise on the inputs.
        occlusion_window: Occlusion's square window and stride, pixels (all channels; 32 on 224 px: 49 passes).
        internal_batch_size: examples per forward pass inside IG, LayerIG and Occlusion.
    """

    ig_steps: int = 16
    gradshap_samples: int = 8
    gradshap_stdev: float = 0.1
    occlusion_window: int = 32
    internal_batch_size: int = 16


CAPTUM_SETTINGS = CaptumSettings()


def _layer4(forward: nn.Module) -> nn.Module:
    return get_spec(model_of(forward)).layer4


@register_method("integrated_gradients", family="captum", completeness=True, options=("captum",),
                 description="Captum IntegratedGradients, zero baseline (the dataset mean colour), "
                             "ig_steps Gauss-Legendre steps (protocol.captum)")
def integrated_gradients(forward: nn.Module, images: Tensor, target: Tensor,
                         captum: CaptumSettings = CAPTUM_SETTINGS) -> tuple[Tensor, Tensor]:
    """IG attributions (B, 3, S, S) and the relative completeness error (B,)."""
    from captum.attr import IntegratedGradients
    attr, delta = IntegratedGradients(forward).attribute(
        images, baselines=0.0, target=target, n_steps=captum.ig_steps,
        internal_batch_size=captum.internal_batch_size, return_convergence_delta=True)
    return attr, relative_to_logit(delta, forward, images, target)


@register_method("saliency", family="captum", description="Captum Saliency (|gradient|, summed over channels)")
def saliency(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """|d logit / d pixel|, (B, 3, S, S)."""
    from captum.attr import Saliency
    return Saliency(forward).attribute(images, target=target, abs=True)


@register_method("input_x_gradient", family="captum", description="Captum InputXGradient")
def input_x_gradient(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Input times gradient, (B, 3, S, S)."""
    from captum.attr import InputXGradient
    return InputXGradient(forward).attribute(images, target=target)


@register_method("gradient_shap", family="captum", options=("captum", "seeds"),
                 description="Captum GradientShap, gradshap_samples samples, baselines {zeros, uniform noise drawn "
                             "from the image's seed}, stdevs gradshap_stdev; each image's draws from its own seed")
def gradient_shap(forward: nn.Module, images: Tensor, target: Tensor, captum: CaptumSettings = CAPTUM_SETTINGS,
                  seeds: Optional[Sequence[int]] = None) -> Tensor:
    """GradientShap attributions (B, 3, S, S), one image at a time so that image b's noise baseline, baseline
    choices, interpolation points and input noise depend only on ``seeds[b]`` (default 0 for every image).
    The caller's numpy and torch global generator states are restored."""
    from captum.attr import GradientShap
    seeds = [0] * images.shape[0] if seeds is None else list(seeds)
    out: List[Tensor] = []
    with global_rngs_restored(images.device):
        for x, t, seed in zip(images, target, seeds):
            g = torch.Generator().manual_seed(seed)
            noise = (torch.rand(1, *images.shape[1:], generator=g) * 2 - 1).to(images)
            # Captum draws baseline choices and interpolation points from numpy's global generator and the
            # input noise from torch's: both are seeded per image
            seed_globals(seed)
            out.append(GradientShap(forward).attribute(
                x[None], baselines=torch.cat([torch.zeros_like(noise), noise]), target=t[None],
                n_samples=captum.gradshap_samples, stdevs=captum.gradshap_stdev))
    return torch.cat(out)


@register_method("occlusion", family="captum", needs_grad=False, options=("captum",),
                 description="Captum Occlusion, occlusion_window square window and stride, zero (mean-colour) patch")
def occlusion(forward: nn.Module, images: Tensor, target: Tensor, captum: CaptumSettings = CAPTUM_SETTINGS) -> Tensor:
    """Drop in the target logit when each window is set to zero, (B, 3, S, S)."""
    from captum.attr import Occlusion
    w, c = captum.occlusion_window, images.shape[1]
    return Occlusion(forward).attribute(images, sliding_window_shapes=(c, w, w), strides=(c, w, w), baselines=0.0,
                                        target=target, perturbations_per_eval=captum.internal_batch_size)


@register_method("gradcam", family="captum", description="Captum LayerGradCam on layer4 (ReLU applied, as in GradCAM)")
def gradcam(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """GradCAM on layer4, (B, 1, h, w)."""
    from captum.attr import LayerGradCam
    return LayerGradCam(forward, _layer4(forward)).attribute(images, target=target, relu_attributions=True)


@register_method("layer_integrated_gradients", family="captum", completeness=True, options=("captum",),
                 description="Captum LayerIntegratedGradients on layer4's output, zero baseline, ig_steps steps, "
                             "summed over channels")
def layer_integrated_gradients(forward: nn.Module, images: Tensor, target: Tensor,
                               captum: CaptumSettings = CAPTUM_SETTINGS) -> tuple[Tensor, Tensor]:
    """Layer IG on layer4 summed over channels (B, h, w) and the relative completeness error (B,)."""
    from captum.attr import LayerIntegratedGradients
    attr, delta = LayerIntegratedGradients(forward, _layer4(forward)).attribute(
        images, baselines=0.0, target=target, n_steps=captum.ig_steps,
        internal_batch_size=captum.internal_batch_size, return_convergence_delta=True)
    return attr.sum(dim=1), relative_to_logit(delta, forward, images, target)
