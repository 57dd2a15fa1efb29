"""``NeuronHeadAttribution``: the exact neuron x head decomposition as a Captum layer attribution.

The forward function must be a linear read-out of the CLIP image embedding. The method recognises one by
its attributes (``readout`` (D, K), ``logit_scale``, ``normalize``, ``model``), as carried by
``nha_plugin.harness.ZeroShotClassifier`` / ``TextSimilarity``, or takes them as explicit arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .adapters import get_spec
from .decomposition import Contributions
from .models import decompose
from .readout import logit_factor

__all__ = ["NeuronHeadAttribution", "lift_to_input", "GRANULARITIES"]

GRANULARITIES = ("spatial", "pair", "head", "neuron", "token")


def lift_to_input(attribution: Tensor, inputs: Tensor) -> Tensor:
    """Spread a (B, 1, h, w) map over the input pixels and channels, (B, 3, H, W), preserving its sum.

    Each grid cell's value is divided evenly over the (H/h)(W/w) pixels and 3 channels it covers, which is
    what ``captum.metrics.infidelity`` needs (attributions shaped like the inputs)."""
    if attribution.dim() != 4 or attribution.shape[1] != 1:
        raise ValueError(f"expected a spatial map (B, 1, h, w); got {tuple(attribution.shape)}")
    B, C, H, W = inputs.shape
    h, w = attribution.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"input {H}x{W} is not a whole multiple of the map's {h}x{w} grid")
    up = F.interpolate(attribution, size=(H, W), mode="nearest")
    return up.expand(B, C, H, W) / (C * (H // h) * (W // w))


def _readout_from(forward_func: Callable, readout: Optional[Tensor], model: Optional[nn.Module],
                  logit_scale: Optional[float], normalize: Optional[bool], *, spec_of: Callable[[nn.Module], Any],
                  who: str, family: str) -> tuple:
    """The linear read-out an attribution explains: explicit arguments first, else ``forward_func``'s attributes.

    Args:
        forward_func: the read-out module (``readout``/``logit_scale``/``normalize``/``model`` attributes) or any
            callable given together with explicit ``readout`` and ``model``.
        readout: (D, K) read-out matrix or None; model: the CLIP model or None.
        logit_scale, normalize: overrides of the read-out's scale (default 1.0) and cosine normalisation (False).
        spec_of: builds the model's spec (``get_spec`` / ``vit_spec``); its ``output_dim`` is D.
        who, family: the attribution class and the model family named in errors.

    Returns:
        ``(spec, readout (D, K), logit_scale: float, normalize: bool)``.
    """
    model = model if model is not None else getattr(forward_func, "model", None)
    readout = readout if readout is not None else getattr(forward_func, "readout", None)
    if model is None or readout is None:
        raise TypeError(
            f"{who} needs a linear read-out of a {family} embedding: pass "
            "nha_plugin.harness.ZeroShotClassifier / TextSimilarity as forward_func, or give readout=(D, K) "
            f"and model=... explicitly (got forward_func={type(forward_func).__name__})")
    spec = spec_of(model)
    if readout.dim() != 2 or readout.shape[0] != spec.output_dim:
        raise ValueError(f"readout must be (D, K) with D={spec.output_dim} (the model's embedding width); "
                         f"got {tuple(readout.shape)}")
    scale = float(logit_scale if logit_scale is not None else getattr(forward_func, "logit_scale", 1.0))
    cosine = bool(normalize if normalize is not None else getattr(forward_func, "normalize", False))
    return spec, readout, scale, cosine


def _check_granularity(granularity: str, allowed: Sequence[str]) -> None:
    if granularity not in allowed:
        raise ValueError(f"granularity must be one of {', '.join(allowed)}; got {granularity!r}")


def _images(inputs: Union[Tensor, tuple]) -> tuple:
    """Captum inputs -> ``(images (B, 3, H, W), whether they came as a 1-tuple)``."""
    is_tuple = isinstance(inputs, tuple)
    if is_tuple:
        if len(inputs) != 1:
            raise ValueError(f"expected one input tensor of images; got a tuple of {len(inputs)}")
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"expected images as a tensor (B, 3, H, W); got {type(inputs).__name__}")
    return inputs, is_tuple


def _target_directions(attribution, targets: Tensor, contrib, dtype: torch.dtype) -> tuple:
    """Each image's read-out column and logit factor.

    Args:
        attribution: carries ``readout`` (D, K), ``logit_scale`` and ``normalize``.
        targets: (B,) read-out columns.
        contrib: the decomposition; its ``embedding`` (B, D) is read (and so built) only for cosine read-outs.
        dtype: the dtype of the decomposition the columns are applied to.

    Returns:
        ``(e (B, D), factor (B,))``: the logit of image b is ``factor[b] * (y_b . e_b)``.
    """
    e = attribution.readout[:, targets].T.to(dtype)
    if not attribution.normalize:                      # the embedding is not needed: do not build it
        return e, torch.full((targets.shape[0],), attribution.logit_scale, dtype=e.dtype, device=e.device)
    return e, logit_factor(contrib.embedding.to(dtype), attribution.logit_scale, True)


def _scaled(attr: Tensor, factor: Tensor, granularity: str) -> Tensor:
    """Per-image scores (B, ...) times the logit factor (B,); a spatial map gets its channel axis, (B, 1, h, w)."""
    attr = attr * factor.view(-1, *([1] * (attr.dim() - 1)))
    return attr.unsqueeze(1) if granularity == "spatial" else attr


def _convergence_delta(forward_func: Callable, inputs: Tensor, additional_forward_args: Any, targets: Tensor,
                       total: Tensor) -> Tensor:
    """(B,) residual ``total - forward_func(inputs, *additional_forward_args)[b, targets[b]]``."""
    with torch.no_grad():
        extra = additional_forward_args if additional_forward_args is not None else ()
        extra = extra if isinstance(extra, tuple) else (extra,)
        logits = forward_func(inputs, *extra)
    reference = logits.gather(1, targets.view(-1, 1)).squeeze(1).to(total.dtype)
    return total - reference


class NeuronHeadAttribution(LayerAttribution):
    r"""Exact attribution of a CLIP-ResNet read-out to (neuron, head) pairs, heads, neurons, tokens or
    layer4 locations.

    The image embedding splits exactly as ``y = beta + sum_{h,n} s[h,n] u[h,n]``; a read-out column w gives
    the logit ``scale * y . w`` (divided by ``||y||`` for cosine read-outs), so every granularity's scores
    plus the reported constant terms equal the logit. The convergence delta is that residual, measured
    against ``forward_func(inputs)[target]``.

    Args:
        forward_func: a linear read-out module (``ZeroShotClassifier``, ``TextSimilarity``, or any module with
            ``readout``/``logit_scale``/``normalize``/``model`` attributes), or any callable together with the
            explicit ``readout=`` and ``model=`` arguments.
        layer: the layer the spatial map lives on; defaults to the model's layer4.
        device_ids: accepted for Captum compatibility (DataParallel); unused.
        readout: (D, K) read-out matrix, overriding ``forward_func.readout``.
        model: the CLIP-ResNet, overriding ``forward_func.model``.
        logit_scale, normalize: override the read-out's scale and whether the embedding is normalised.
        granularity, sink, bias: defaults for :meth:`attribute`.

    Example::

        head = nha.harness.ZeroShotClassifier(model, tokenizer, ["cat", "dog"], templates)
        nad = nha.NeuronHeadAttribution(head)
        attr, delta = nad.attribute(images, target=0, return_convergence_delta=True)   # (B, 1, 7, 7), (B,)
        up = LayerAttribution.interpolate(attr, images.shape[-2:])
    """

    def __init__(self, forward_func: Callable, layer: Optional[nn.Module] = None,
                 device_ids: Optional[Sequence[int]] = None, *, readout: Optional[Tensor] = None,
                 model: Optional[nn.Module] = None, logit_scale: Optional[float] = None,
                 normalize: Optional[bool] = None, granularity: str = "spatial", sink: str = "keep",
                 bias: str = "own") -> None:
        self.spec, self.readout, self.logit_scale, self.normalize = _readout_from(
            forward_func, readout, model, logit_scale, normalize, spec_of=get_spec, who="NeuronHeadAttribution",
            family="CLIP-ResNet")
        self.defaults = dict(granularity=granularity, sink=sink, bias=bias)
        _check_granularity(granularity, GRANULARITIES)
        super().__init__(forward_func, layer if layer is not None else self.spec.layer4, device_ids)

    def has_convergence_delta(self) -> bool:
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def _targets(self, target: Any, batch: int) -> Tensor:
        """Captum target semantics -> (B,) long tensor of read-out columns."""
        K = self.readout.shape[1]
        if target is None:
            if K != 1:
                raise ValueError(f"the read-out has {K} outputs; pass target= (an int, a list of B ints, or a "
                                 "tensor of shape (B,))")
            target = 0
        if isinstance(target, tuple):
            raise ValueError("tuple targets address multi-dimensional outputs; this read-out's output is (B, K)")
        t = torch.as_tensor(target, dtype=torch.long).flatten().cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"got {t.numel()} targets for a batch of {batch}; give one int or one per example")
        if (t < 0).any() or (t >= K).any():
            raise ValueError(f"target {t.tolist()} out of range: the read-out has K={K} outputs (0..{K - 1})")
        return t.to(self.readout.device)

    def contributions(self, inputs: Tensor, sink: Optional[str] = None, bias: Optional[str] = None) -> Contributions:
        """The full :class:`Contributions` object behind an attribution."""
        return decompose(self.spec, inputs, sink=sink or self.defaults["sink"], bias=bias or self.defaults["bias"])

    # Captum's NoiseTunnel calls attribute.__wrapped__; log_usage supplies it as on Captum's own methods.
    @log_usage()
    def attribute(self, inputs: Union[Tensor, tuple], target: Any = None, additional_forward_args: Any = None,
                  *, granularity: Optional[str] = None, sink: Optional[str] = None, bias: Optional[str] = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False):
        r"""Attributions of ``forward_func(inputs)[:, target]``.

        Args:
            inputs: images (B, 3, H, W), or a 1-tuple holding them (then a 1-tuple is returned).
            target: int, list of B ints, or a (B,) tensor (Captum semantics); optional when K == 1.
            additional_forward_args: passed to ``forward_func`` when computing the convergence delta only; the
                decomposition reads the images alone.
            granularity: ``"spatial"`` (B, 1, h, w) | ``"pair"`` (B, H, C) | ``"head"`` (B, H) |
                ``"neuron"`` (B, C) | ``"token"`` (B, T).
            sink, bias: see :func:`nha_plugin.decompose`.
            return_convergence_delta: also return (B,) residuals ``sum(attr) + constant terms - f(x)[target]``.
            attribute_to_layer_input: unsupported (the decomposition is of layer4's output); must be False.

        Returns:
            attributions, or ``(attributions, delta)``.
        """
        if attribute_to_layer_input:
            raise ValueError("attribute_to_layer_input=True is not supported: the decomposition is of layer4's output")
        granularity = granularity or self.defaults["granularity"]
        _check_granularity(granularity, GRANULARITIES)
        inputs, is_tuple = _images(inputs)
        targets = self._targets(target, inputs.shape[0])
        contrib = self.contributions(inputs, sink, bias)
        e, factor = _target_directions(self, targets, contrib, contrib.pair_coefficients.dtype)
        attr = _scaled(contrib.scores(e, level=granularity, per_image=True), factor, granularity)
        out = (attr,) if is_tuple else attr
        if not return_convergence_delta:
            return out
        rest = contrib.bias_score(e, per_image=True)
        if granularity == "spatial":
            rest = rest + contrib.positional_score(e, per_image=True)
        if granularity in ("spatial", "token"):
            rest = rest + contrib.sink_score(e, level=granularity, per_image=True)
        total = attr.flatten(start_dim=1).sum(dim=1) + rest * factor
        return out, _convergence_delta(self.forward_func, inputs, additional_forward_args, targets, total)
