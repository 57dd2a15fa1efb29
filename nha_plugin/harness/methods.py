"""Method registry: every attribution method turns (forward wrapper, images, target) into a map.

A method is a function ``fn(forward, images, target) -> Tensor`` (or ``(Tensor, completeness_error)`` when it
claims completeness). ``forward`` is a linear read-out module (``ZeroShotClassifier``, ``TextSimilarity``,
``LinearReadout``: images (B, 3, S, S) -> logits (B, K), with ``model``, ``readout``, ``logit_scale``,
``normalize``); ``target`` is a (B,) long tensor of read-out columns. The raw attribution may be pixel-shaped
(B, 3, S, S), a layer map (B, 1, h, w) or (B, h, w); :func:`explain` post-processes every method identically
(channels summed, bilinear upsampling to S, float32) and times it.

Register a new method in a few lines::

    from nha_plugin.harness.methods import register_method

    @register_method("my_grad_norm", family="user", description="L2 norm of the input gradient")
    def my_grad_norm(forward, images, target):
        x = images.clone().requires_grad_(True)
        forward(x).gather(1, target[:, None]).sum().backward()
        return x.grad.norm(dim=1)                     # (B, S, S)

Completeness errors are relative: ``|sum(attribution) + reported constants - claimed total| / |f(x)[target]|``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import get_spec
from ..attribution import NeuronHeadAttribution
from ..pool import class_attention, head_bias, pool_output, positional_embedding_for, target_weights, tokens
from ..pool_maps import apply_sink, maskclip_tokens, self_self_tokens, token_cosines
from ..readout import logit_factor
from ..spec import AttentionPoolSpec

__all__ = ["Method", "Explanation", "METHODS", "register_method", "get_method", "available_methods", "explain",
           "to_pixel_map", "DEFAULT_METHODS", "CAPTUM_SETTINGS", "randomised_copy", "STAGES"]

MethodFn = Callable[[nn.Module, Tensor, Tensor], Union[Tensor, Tuple[Tensor, Tensor]]]


@dataclass
class Method:
    """One registered attribution method.

    Attributes:
        name: registry key.
        fn: ``fn(forward, images (B,3,S,S), target (B,)) -> map`` or ``(map, completeness_error (B,))``.
        family: "nad" | "clip" | "captum" | "zennit" | "floor" | "user".
        description: one line for the protocol.
        claims_completeness: whether ``fn`` returns a completeness error.
        needs_grad: whether it needs autograd (others run under ``torch.no_grad``).
        target_dependent: False for maps that ignore the target (raw attention, floors).
    """

    name: str
    fn: MethodFn
    family: str = "user"
    description: str = ""
    claims_completeness: bool = False
    needs_grad: bool = True
    target_dependent: bool = True


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        maps: (B, S, S) float32 pixel maps after the shared post-processing.
        seconds: wall time of the whole call (method + post-processing), seconds.
        completeness_error: (B,) relative completeness error, or None when the method makes no claim.
        raw: the method's own output before post-processing.
    """

    method: str
    maps: Tensor
    seconds: float
    completeness_error: Optional[Tensor] = None
    raw: Optional[Tensor] = None

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.maps.shape[0])


METHODS: Dict[str, Method] = {}


def register_method(name: str, *, family: str = "user", description: str = "", completeness: bool = False,
                    needs_grad: bool = True, target_dependent: bool = True, overwrite: bool = False):
    """Decorator that registers ``fn(forward, images, target)`` under ``name``; returns ``fn`` unchanged."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in METHODS and not overwrite:
            raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
        METHODS[name] = Method(name, fn, family, description, completeness, needs_grad, target_dependent)
        return fn

    return deco


def available_methods() -> List[str]:
    """Registered method names (zennit's LRP appears once ``nha_plugin.harness.lrp`` can import zennit)."""
    _load_optional()
    return list(METHODS)


def get_method(name: Union[str, Method]) -> Method:
    if isinstance(name, Method):
        return name
    _load_optional()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def _load_optional() -> None:
    from . import vit_methods  # noqa: F401  registers the CLIP-ViT methods
    try:
        from . import lrp  # noqa: F401  registers "lrp_zennit" when zennit is installed
    except ImportError:
        pass


def to_pixel_map(raw: Tensor, size: int) -> Tensor:
    """The shared post-processing: (B, 3, S, S) -> channel sum; (B, 1, h, w) / (B, h, w) -> bilinear upsample
    (align_corners=False) to (B, size, size). Returns float32, detached."""
    raw = raw.detach().float()
    if raw.dim() == 3:
        raw = raw[:, None]
    if raw.dim() != 4:
        raise ValueError(f"expected an attribution (B, C, H, W) or (B, h, w); got {tuple(raw.shape)}")
    if raw.shape[1] != 1:
        raw = raw.sum(dim=1, keepdim=True)
    if raw.shape[-2:] != (size, size):
        raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
    return raw[:, 0]


def explain(method: Union[str, Method], forward: nn.Module, images: Tensor, target: Tensor) -> Explanation:
    """Run one method on a batch and post-process its map; times the call (method + post-processing)."""
    m = get_method(method)
    target = torch.as_tensor(target, dtype=torch.long, device=images.device).flatten()
    if target.numel() == 1:
        target = target.expand(images.shape[0])
    start = time.perf_counter()
    with torch.set_grad_enabled(m.needs_grad):
        out = m.fn(forward, images, target)
    delta = None
    if isinstance(out, tuple):
        out, delta = out
        delta = delta.detach().float().abs()
    maps = to_pixel_map(out, images.shape[-1])
    seconds = time.perf_counter() - start
    return Explanation(m.name, maps, seconds, delta if m.claims_completeness else None, out.detach())


# ---- helpers on the forward wrapper ------------------------------------------------------------------
def _spec(forward: nn.Module) -> AttentionPoolSpec:
    model = getattr(forward, "model", None)
    if model is None:
        raise TypeError(f"expected a linear read-out (ZeroShotClassifier, TextSimilarity, LinearReadout) with a "
                        f"`model` attribute; got {type(forward).__name__}")
    return get_spec(model).detached()


def _directions(forward: nn.Module, target: Tensor) -> Tensor:
    """Read-out column per image, (B, D)."""
    return forward.readout[:, target].T


def _logit_of_target(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    with torch.no_grad():
        return forward(images).gather(1, target[:, None])[:, 0]


def _pool_parts(spec: AttentionPoolSpec, images: Tensor):
    """layer4 features (B, C, h, w), tokens z (B, T, C) with positional embedding, class attention (B, H, T)."""
    feats = spec.trunk(images)
    z = tokens(feats, positional_embedding_for(spec, feats.shape[-2:]))
    return feats, z, class_attention(spec, z)


def _embedding(spec: AttentionPoolSpec, feats: Tensor, z: Tensor, a: Tensor) -> Tensor:
    """y (B, D) rebuilt from the decomposition (equals the model's attention pool to float precision)."""
    return pool_output(spec, torch.einsum("bht,btn->bhn", a, z))


# ---- NAD ------------------------------------------------------------------------------------------------
def _nad_spatial(sink: str) -> MethodFn:
    def fn(forward, images, target):
        nad = NeuronHeadAttribution(forward, sink=sink)
        attr, delta = nad.attribute(images, target=target, granularity="spatial", return_convergence_delta=True)
        logit = _logit_of_target(forward, images, target)
        return attr, delta / logit.abs().clamp_min(1e-12)
    return fn


register_method("nad_spatial", family="nad", completeness=True, needs_grad=False,
                description="NAD spatial map (layer4 cells; mean token spread 1/hw; sink kept: exact)")(
    _nad_spatial("keep"))
register_method("nad_spatial_interp", family="nad", completeness=True, needs_grad=False,
                description="NAD spatial map with the attention-sink cell interpolated (W, N, NW mean); the "
                            "removed part is reported as its own term, so completeness still holds")(
    _nad_spatial("interpolate"))


def _target_scale(forward: nn.Module, y: Tensor) -> Tensor:
    """Per-image factor that turns y . e into the read-out's logit (:func:`nha_plugin.readout.logit_factor`)."""
    return logit_factor(y, getattr(forward, "logit_scale", 1.0), getattr(forward, "normalize", False))


def _target_parts(forward, images, target):
    """spec, layer4 features, tokens z (B, T, C), class attention a (B, H, T), target directions e (B, D) and
    their pair weights g (B, H, C)."""
    spec = _spec(forward)
    feats, z, a = _pool_parts(spec, images)
    e = _directions(forward, target).to(z.dtype)
    return spec, feats, z, a, e, target_weights(spec, e[..., None])[..., 0]


@register_method("nad_heads", family="nad", needs_grad=False,
                 description="NAD heads-only map: per spatial token t, sum_h a[h,t] (W_o^h (W_v^h z_t + b_v^h)) . e "
                             "(token scores incl. positional and head-bias shares), sink interpolated")
def nad_heads(forward, images, target):
    spec, feats, z, a, e, g = _target_parts(forward, images, target)
    per_head = torch.einsum("btn,bhn->bht", z, g) + (head_bias(spec) @ e.T).T[:, :, None]   # (B, H, T)
    tok = (a * per_head).sum(dim=1)[:, 1:]
    scale = _target_scale(forward, _embedding(spec, feats, z, a)).view(-1, 1, 1)
    return apply_sink(tok.view(-1, *feats.shape[-2:]), "interpolate") * scale


@register_method("nad_neurons", family="nad", needs_grad=False,
                 description="NAD neurons-only map: sum_n F_t[n] w[n], w[n] = sum_h g[h,n] mean_t a[h,t] (raw layer4 "
                             "activations, no positional embedding, no per-token attention), sink interpolated")
def nad_neurons(forward, images, target):
    spec, feats, z, a, e, g = _target_parts(forward, images, target)
    w = torch.einsum("bhn,bh->bn", g, a[:, :, 1:].mean(dim=-1))
    grid = torch.einsum("bnij,bn->bij", feats, w)
    scale = _target_scale(forward, _embedding(spec, feats, z, a)).view(-1, 1, 1)
    return apply_sink(grid, "interpolate") * scale


# ---- CLIP-specific baselines ------------------------------------------------------------------------
def _token_cosine(token_outputs: Callable[[AttentionPoolSpec, Tensor], Tensor]) -> MethodFn:
    """A method mapping each spatial token's output (B, hw, D) to its cosine with the target direction."""
    def fn(forward, images, target):
        spec = _spec(forward)
        feats = spec.trunk(images)
        return token_cosines(token_outputs(spec, feats), _directions(forward, target), feats.shape[-2:], per_image=True)
    return fn


register_method("maskclip", family="clip", needs_grad=False,
                description="MaskCLIP for ResNet: per-token c_proj(v_proj(F_t)) (no q/k, no positional "
                            "embedding), cosine with the target text direction")(_token_cosine(maskclip_tokens))
register_method("self_self", family="clip", needs_grad=False,
                description="attention-pool self-self: per head softmax(QQ^T/sqrt d)+softmax(KK^T/sqrt d) over all "
                            "tokens applied to V, then c_proj; cosine of each spatial token with the target")(
    _token_cosine(self_self_tokens))


@register_method("class_attention", family="clip", needs_grad=False, target_dependent=False,
                 description="raw class-token attention of the attention pool over spatial tokens, mean over heads "
                             "(ignores the target)")
def class_attention_map(forward, images, target):
    spec = _spec(forward)
    feats, _, a = _pool_parts(spec, images)
    return a[:, :, 1:].mean(dim=1).view(-1, *feats.shape[-2:])


# ---- Captum -----------------------------------------------------------------------------------------------
CAPTUM_SETTINGS = dict(
    ig_steps=16,                 # IntegratedGradients / LayerIntegratedGradients, Gauss-Legendre, zero baseline
    gradshap_samples=8,          # GradientShap: baselines {zeros, uniform noise in [-1, 1]}, stdevs 0.1
    occlusion_window=32,         # Occlusion: 32x32 patches (all channels), stride 32 -> 7x7 = 49 forward passes
    internal_batch_size=16,
)


def _layer4(forward: nn.Module) -> nn.Module:
    return get_spec(forward.model).layer4


def _completeness(forward, images, target, attr, total_minus_baseline_delta) -> Tensor:
    return total_minus_baseline_delta / _logit_of_target(forward, images, target).abs().clamp_min(1e-12)


@register_method("integrated_gradients", family="captum", completeness=True,
                 description="Captum IntegratedGradients, zero baseline (the dataset mean colour), "
                             "ig_steps Gauss-Legendre steps (protocol.captum)")
def integrated_gradients(forward, images, target):
    from captum.attr import IntegratedGradients
    attr, delta = IntegratedGradients(forward).attribute(
        images, baselines=0.0, target=target, n_steps=CAPTUM_SETTINGS["ig_steps"],
        internal_batch_size=CAPTUM_SETTINGS["internal_batch_size"], return_convergence_delta=True)
    return attr, _completeness(forward, images, target, attr, delta)


@register_method("saliency", family="captum", description="Captum Saliency (|gradient|, summed over channels)")
def saliency(forward, images, target):
    from captum.attr import Saliency
    return Saliency(forward).attribute(images, target=target, abs=True)


@register_method("input_x_gradient", family="captum", description="Captum InputXGradient")
def input_x_gradient(forward, images, target):
    from captum.attr import InputXGradient
    return InputXGradient(forward).attribute(images, target=target)


@register_method("gradient_shap", family="captum",
                 description="Captum GradientShap, gradshap_samples samples, baselines {zeros, seeded uniform "
                             "noise}, stdevs 0.1")
def gradient_shap(forward, images, target):
    from captum.attr import GradientShap
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(1, *images.shape[1:], generator=g) * 2 - 1).to(images)
    baselines = torch.cat([torch.zeros_like(noise), noise])
    # Captum draws the baseline choice and interpolation points from numpy's global generator: seed it for
    # the call and put the caller's state back
    import numpy as np
    state = np.random.get_state()
    np.random.seed(0)
    torch.manual_seed(0)
    try:
        return GradientShap(forward).attribute(images, baselines=baselines, target=target,
                                               n_samples=CAPTUM_SETTINGS["gradshap_samples"], stdevs=0.1)
    finally:
        np.random.set_state(state)


@register_method("occlusion", family="captum", needs_grad=False,
                 description="Captum Occlusion, occlusion_window square window and stride, zero (mean-colour) patch")
def occlusion(forward, images, target):
    from captum.attr import Occlusion
    w = CAPTUM_SETTINGS["occlusion_window"]
    return Occlusion(forward).attribute(images, sliding_window_shapes=(images.shape[1], w, w),
                                        strides=(images.shape[1], w, w), baselines=0.0, target=target,
                                        perturbations_per_eval=CAPTUM_SETTINGS["internal_batch_size"])


@register_method("gradcam", family="captum", description="Captum LayerGradCam on layer4 (ReLU applied, as in GradCAM)")
def gradcam(forward, images, target):
    from captum.attr import LayerGradCam
    return LayerGradCam(forward, _layer4(forward)).attribute(images, target=target, relu_attributions=True)


@register_method("layer_integrated_gradients", family="captum", completeness=True,
                 description="Captum LayerIntegratedGradients on layer4's output, zero baseline, ig_steps steps, "
                             "summed over channels")
def layer_integrated_gradients(forward, images, target):
    from captum.attr import LayerIntegratedGradients
    attr, delta = LayerIntegratedGradients(forward, _layer4(forward)).attribute(
        images, baselines=0.0, target=target, n_steps=CAPTUM_SETTINGS["ig_steps"],
        internal_batch_size=CAPTUM_SETTINGS["internal_batch_size"], return_convergence_delta=True)
    return attr.sum(dim=1), _completeness(forward, images, target, attr, delta)


# ---- floors ---------------------------------------------------------------------------------------------
@register_method("random", family="floor", needs_grad=False, target_dependent=False,
                 description="uniform random 7x7 grid (seeded by the image content), upsampled like layer maps")
def random_map(forward, images, target):
    maps = []
    for x in images:
        seed = int((x.detach().float().abs().sum() * 1000).item()) % (2 ** 31)
        maps.append(torch.rand(7, 7, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(maps).to(images.device)


@register_method("centre", family="floor", needs_grad=False, target_dependent=False,
                 description="centre bias: isotropic Gaussian at the image centre, sigma = S/4")
def centre_map(forward, images, target):
    S = images.shape[-1]
    r = torch.arange(S, dtype=torch.float32, device=images.device) - (S - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (S / 4) ** 2))
    return g.expand(images.shape[0], S, S).clone()


DEFAULT_METHODS = ("nad_spatial", "nad_spatial_interp", "nad_heads", "nad_neurons", "maskclip", "self_self",
                   "class_attention", "integrated_gradients", "saliency", "input_x_gradient", "gradient_shap",
                   "occlusion", "gradcam", "layer_integrated_gradients", "lrp_zennit", "random", "centre")


# ---- parameter randomisation (used by the sanity-check metric) ---------------------------------------
STAGES = ("attnpool", "layer4", "layer3", "layer2", "layer1", "stem")


def _stage_modules(visual: nn.Module, stage: str) -> List[nn.Module]:
    if stage == "stem":
        return [getattr(visual, n) for n in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3") if hasattr(visual, n)]
    return [getattr(visual, stage)]


def randomised_copy(forward: nn.Module, upto: int, seed: int = 0) -> nn.Module:
    """A copy of the read-out whose image tower has the first ``upto`` stages of :data:`STAGES` (top-down)
    re-drawn: every parameter p becomes mean(p) + std(p) * N(0, 1) (seeded); BatchNorm running statistics are
    kept. The read-out (text directions) is unchanged."""
    import copy
    from ..readout import LinearReadout
    model = copy.deepcopy(forward.model)
    visual = getattr(model, "visual", model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in STAGES[:upto]:
            for mod in _stage_modules(visual, stage):
                for p in mod.parameters():
                    std = p.std() if p.numel() > 1 else p.abs().clamp_min(0.02)
                    p.copy_(p.mean() + std * torch.randn(p.shape, generator=g).to(p))
    return LinearReadout(model, forward.readout.detach().clone(), logit_scale=getattr(forward, "logit_scale", 1.0),
                         normalize=getattr(forward, "normalize", False))
