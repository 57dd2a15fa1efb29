"""``ReadoutAttribution``: the Captum layer-attribution base of the exact attributions of a linear read-out.

:class:`nha_plugin.NeuronHeadAttribution` (CLIP-ResNet) and :class:`nha_plugin.vit.ViTAttribution` (CLIP-ViT)
explain ``forward_func(images)[:, k] = f(y) * (y . w_k)``, a linear read-out of the image embedding y. What they
share lives here, once:

- finding the read-out: a ``forward_func`` carrying ``readout`` (D, K), ``logit_scale``, ``normalize`` and
  ``model`` (as ``nha_plugin.harness.ZeroShotClassifier`` / ``TextSimilarity`` do), or explicit arguments;
- Captum's target semantics (an int, a list of B ints, a (B,) or 0-d integer tensor; floats and bools are
  refused) and its tuple-in/tuple-out rule;
- the layer the attribution explains (``layer=`` accepts that one module only) and the refusal of ``baselines``
  (an exact decomposition has no baseline);
- the logit factor f(y) (:func:`nha_plugin.readout.logit_factor`) that turns scores of ``y . w`` into logits;
- the contrastive option: explain ``logit_c - mean_k logit_k`` through the read-out
  :func:`nha_plugin.readout.contrastive_columns` builds;
- the convergence delta, measured against ``forward_func(inputs)[b, target[b]]`` (minus the mean logit when
  contrastive), as a plain tensor (no autograd graph).

A subclass says how to read its model (:meth:`ReadoutAttribution.spec_of`), where its map lives
(:meth:`ReadoutAttribution.default_layer`) and how to decompose images
(:meth:`ReadoutAttribution.contributions`); the decomposition it returns supplies the scores through
``scores(target, level, per_image=True)`` and ``scores_and_rest(...)``. Its ``attribute`` states its own keyword
options and hands over to :meth:`ReadoutAttribution.attribute_readout`.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from torch import Tensor, nn

from .pool import check_directions, working_dtype
from .readout import contrastive_columns, logit_factor

__all__ = ["ReadoutAttribution", "lift_to_input"]


def lift_to_input(attribution: Union[Tensor, tuple], inputs: Union[Tensor, tuple]) -> Union[Tensor, tuple]:
    """Spread a spatial map over the input pixels and channels, preserving its sum.

    Each grid cell's value is divided evenly over the (H/h)(W/w) pixels and 3 channels it covers, which is
    what ``captum.metrics.infidelity`` needs (attributions shaped like the inputs).

    Args:
        attribution: a spatial map (B, 1, h, w), as ``attribute(..., granularity="spatial")`` returns, or the
            1-tuple holding it that ``attribute((images,), ...)`` returns.
        inputs: the images it explains, (B, 3, H, W), with H and W whole multiples of h and w, or a 1-tuple
            holding them (as Captum passes inputs).

    Returns:
        (B, 3, H, W) with the same per-image sum as ``attribution``; a 1-tuple holding it when ``attribution`` or
        ``inputs`` came as a tuple (Captum's tuple-in, tuple-out rule).
    """
    attribution, attribution_tuple = _images(attribution, "spatial map")
    inputs, inputs_tuple = _images(inputs, "images")
    lifted = _lift(attribution, inputs)
    return (lifted,) if attribution_tuple or inputs_tuple else lifted


def _lift(attribution: Tensor, inputs: Tensor) -> Tensor:
    """:func:`lift_to_input` on plain tensors."""
    if attribution.dim() != 4 or attribution.shape[1] != 1:
        raise ValueError(f"expected a spatial map (B, 1, h, w); got {tuple(attribution.shape)}")
    B, C, H, W = inputs.shape
    h, w = attribution.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"input {H}x{W} is not a whole multiple of the map's {h}x{w} grid")
    up = F.interpolate(attribution, size=(H, W), mode="nearest")
    return up.expand(B, C, H, W) / (C * (H // h) * (W // w))


def _images(inputs: Union[Tensor, tuple], what: str = "images") -> tuple[Tensor, bool]:
    """Captum inputs -> ``(the tensor, whether it came as a 1-tuple)``; ``what`` names it in errors."""
    is_tuple = isinstance(inputs, tuple)
    if is_tuple:
        if len(inputs) != 1:
            raise ValueError(f"expected one tensor of {what}; got a tuple of {len(inputs)}")
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"expected {what} as a tensor; got {type(inputs).__name__}")
    return inputs, is_tuple


def _convergence_delta(forward_func: Callable, inputs: Tensor, additional_forward_args: Any, targets: Tensor,
                       total: Tensor, contrastive: bool) -> Tensor:
    """(B,) residual ``total - forward_func(inputs, *additional_forward_args)[b, targets[b]]`` (minus the mean
    over the outputs when ``contrastive``: the logit of the contrastive read-out)."""
    extra = additional_forward_args if additional_forward_args is not None else ()
    extra = extra if isinstance(extra, tuple) else (extra,)
    logits = forward_func(inputs, *extra)
    reference = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    if contrastive:
        reference = reference - logits.mean(dim=1)
    return total - reference.to(total.dtype)


def _is_integer(value: Any) -> bool:
    """An int (not a bool), a numpy integer, or an integer 0-d tensor."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class ReadoutAttribution(LayerAttribution):
    r"""Base of the exact Captum layer attributions of a linear read-out of a CLIP image embedding.

    The image embedding y splits exactly into components; a read-out column w gives the logit
    ``f(y) * (y . w)`` with ``f = logit_scale`` (divided by ``||y||`` for a cosine read-out), so each
    granularity's scores times f, plus the terms the decomposition reports beside them, equal the logit. The
    convergence delta is that sum minus ``forward_func(inputs)[b, target[b]]``.

    Subclasses set :attr:`granularities`, :attr:`family` and :attr:`decomposed` and implement
    :meth:`spec_of`, :meth:`default_layer`, :meth:`contributions` and ``attribute``.

    Args:
        forward_func: a linear read-out module (``readout``/``logit_scale``/``normalize``/``model`` attributes),
            or any callable given together with explicit ``readout=`` and ``model=``.
        layer: the layer the spatial map lives on: None or :meth:`default_layer` (the one layer the method explains;
            any other is refused).
        device_ids: accepted for Captum compatibility (DataParallel); unused.
        readout: (D, K) read-out matrix, overriding ``forward_func.readout``.
        model: the CLIP model, overriding ``forward_func.model``.
        logit_scale, normalize: override the read-out's scale (default 1.0) and whether the embedding is
            normalised first (default False).
        granularity: the default granularity of ``attribute``, one of :attr:`granularities`.
        contrastive: the default of ``attribute``'s ``contrastive``: explain ``logit_c - mean_k logit_k``.
        **defaults: the subclass's other defaults for ``attribute`` (kept in :attr:`defaults`).

    Attributes:
        spec: the model's spec; model: the model; readout: (D, K); logit_scale: float; normalize: bool;
        defaults: dict.
    """

    #: the granularities ``attribute`` accepts; the decomposition's score levels of the same names
    granularities: tuple[str, ...] = ()
    #: the model family named in errors, e.g. "CLIP-ResNet"
    family: str = ""
    #: what the decomposition is of, said when ``attribute_to_layer_input=True`` or another ``layer=`` is refused
    decomposed: str = ""
    #: what to do instead of naming another layer, said when ``layer=`` is refused
    layer_hint: str = ""

    def __init__(self, forward_func: Callable, layer: Optional[nn.Module] = None,
                 device_ids: Optional[Sequence[int]] = None, *, readout: Optional[Tensor] = None,
                 model: Optional[nn.Module] = None, logit_scale: Optional[float] = None,
                 normalize: Optional[bool] = None, granularity: str = "spatial", contrastive: bool = False,
                 **defaults: Any) -> None:
        self.model = model if model is not None else getattr(forward_func, "model", None)
        self.spec, self.readout = self._read_out(forward_func, readout, self.model)
        self.logit_scale = float(logit_scale if logit_scale is not None else getattr(forward_func, "logit_scale", 1.0))
        self.normalize = bool(normalize if normalize is not None else getattr(forward_func, "normalize", False))
        self.check_granularity(granularity)
        self._check_contrastive(contrastive)
        self.defaults = dict(granularity=granularity, contrastive=contrastive, **defaults)
        super().__init__(forward_func, self._explained_layer(layer), device_ids)

    # ---- what a subclass supplies ------------------------------------------------------------------------
    @staticmethod
    def spec_of(model: nn.Module) -> Any:
        """The model's spec (its ``output_dim`` is the embedding width D); raises for a model of another family."""
        raise NotImplementedError("a ReadoutAttribution subclass must say how to read its model (spec_of)")

    def default_layer(self) -> Optional[nn.Module]:
        """The layer the spatial map lives on when the constructor is given none."""
        raise NotImplementedError("a ReadoutAttribution subclass must name its default layer (default_layer)")

    def contributions(self, inputs: Tensor, **options: Any) -> Any:
        """The decomposition of images (B, 3, H, W); it scores targets with ``scores`` / ``scores_and_rest``."""
        raise NotImplementedError("a ReadoutAttribution subclass must decompose images (contributions)")

    # ---- Captum's contract -------------------------------------------------------------------------------
    def has_convergence_delta(self) -> bool:
        """True: every attribution comes with its exact residual against the read-out's logit."""
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        """False: the scores are the components' own shares of the logit, not gradients times inputs."""
        return False

    def check_granularity(self, granularity: str) -> None:
        """Refuse a granularity outside :attr:`granularities`, listing them."""
        if granularity not in self.granularities:
            raise ValueError(f"granularity must be one of {', '.join(self.granularities)}; got {granularity!r}")

    def _check_contrastive(self, contrastive: Any) -> None:
        """Refuse a non-bool ``contrastive``, and ``True`` for a read-out with a single output."""
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be True or False; got {contrastive!r}")
        if contrastive and self.readout.shape[1] < 2:
            raise ValueError(f"contrastive=True explains logit_c - mean_k logit_k and needs at least 2 outputs; this "
                             f"read-out has {self.readout.shape[1]}")

    def _module_name(self, module: nn.Module) -> str:
        """Where ``module`` sits in the model (``'visual.layer4'``), else its type."""
        found = [name for name, m in self.model.named_modules() if m is module] if self.model is not None else []
        return found[0] if found and found[0] else type(module).__name__

    def _explained_layer(self, layer: Optional[nn.Module]) -> Optional[nn.Module]:
        """The layer the attribution explains: :meth:`default_layer`; ``layer`` must be None or that module."""
        accepted = self.default_layer()
        if layer is None or layer is accepted:
            return accepted
        where = self._module_name(accepted) if accepted is not None else "no module (the model was given as a spec)"
        raise ValueError(f"{type(self).__name__} explains {self.decomposed}, on {where}: layer= must be that "
                         f"module or None; got {self._module_name(layer)}. {self.layer_hint}".rstrip())

    def target_columns(self, target: Any, batch: int) -> Tensor:
        """Captum's target semantics -> the read-out column of each image.

        Args:
            target: an int, a list of ``batch`` ints, a (B,) or 0-d integer tensor; None only when the read-out has
                K == 1. Floats and bools are refused (they would be truncated to another column).
            batch: B.

        Returns:
            (B,) long tensor on the read-out's device.
        """
        K = self.readout.shape[1]
        if target is None:
            if K != 1:
                raise ValueError(f"the read-out has {K} outputs; pass target= (an int, a list of B ints, or a "
                                 "tensor of shape (B,))")
            target = 0
        if isinstance(target, tuple):
            raise ValueError("tuple targets address multi-dimensional outputs; this read-out's output is (B, K)")
        if isinstance(target, Tensor):
            ok = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
        else:
            ok = _is_integer(target) or (isinstance(target, list) and all(_is_integer(t) for t in target))
        if not ok:
            got = f"a {target.dtype} tensor" if isinstance(target, Tensor) else repr(target)
            raise TypeError(f"target must be an int, a list of ints or an integer tensor (the read-out column of "
                            f"each image); got {got}. Convert it with int(...) / .long() if it holds column indices")
        t = torch.as_tensor(target, dtype=torch.long).flatten().cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"got {t.numel()} targets for a batch of {batch}; give one int or one per example")
        if (t < 0).any() or (t >= K).any():
            raise ValueError(f"target {t.tolist()} out of range: the read-out has K={K} outputs (0..{K - 1})")
        return t.to(self.readout.device)

    def logit_factors(self, contrib: Any, scores: Tensor) -> Tensor:
        """(B,) factor turning scores of ``y . w`` (B, ...) into logits, in the scores' dtype and device."""
        if not self.normalize:                      # the embedding is not needed: do not build it
            return torch.full((scores.shape[0],), self.logit_scale, dtype=scores.dtype, device=scores.device)
        return logit_factor(contrib.embedding.to(scores.dtype), self.logit_scale, True)

    def attribute_readout(self, inputs: Union[Tensor, tuple], target: Any = None,
                          additional_forward_args: Any = None, *, granularity: Optional[str] = None,
                          contrastive: Optional[bool] = None, baselines: Any = None,
                          return_convergence_delta: bool = False, attribute_to_layer_input: bool = False,
                          **options: Any):
        r"""The body of every subclass's ``attribute``: attributions of ``forward_func(inputs)[:, target]``.

        Args:
            inputs: images (B, 3, H, W), or a 1-tuple holding them (then a 1-tuple is returned).
            target: see :meth:`target_columns`.
            additional_forward_args: passed to ``forward_func`` for the convergence delta only; the decomposition
                reads the images alone.
            granularity: one of :attr:`granularities`; None takes the constructor's.
            contrastive: explain ``logit_c - mean_k logit_k`` (the read-out of
                :func:`nha_plugin.readout.contrastive_columns`); None takes the constructor's.
            baselines: refused unless None: the decomposition is exact, it needs no baseline.
            return_convergence_delta: also return (B,) residuals ``sum(attr) + rest - f(x)[target]``.
            attribute_to_layer_input: unsupported; must be False.
            **options: the subclass's options for :meth:`contributions`.

        Returns:
            attributions (B, ...) (a spatial map as (B, 1, h, w)), or ``(attributions, delta (B,))``; plain tensors
            without an autograd graph.
        """
        if attribute_to_layer_input:
            raise ValueError(f"attribute_to_layer_input=True is not supported: the decomposition is of "
                             f"{self.decomposed}; leave it False")
        if baselines is not None:
            raise ValueError(f"{type(self).__name__} needs no baselines: it is an exact decomposition of the logit "
                             "itself (no reference input, no path). Drop baselines=; the convergence delta is the "
                             "residual against forward_func(inputs)[target]")
        granularity = self.defaults["granularity"] if granularity is None else granularity
        contrastive = self.defaults["contrastive"] if contrastive is None else contrastive
        self.check_granularity(granularity)
        self._check_contrastive(contrastive)
        images, is_tuple = _images(inputs)
        targets = self.target_columns(target, images.shape[0])
        # attributions are read-outs of a fixed decomposition, never differentiated: no graph is built or returned
        with torch.no_grad():
            contrib = self.contributions(images, **options)
            readout = self.readout.to(working_dtype(self.readout.dtype))     # bf16 columns are exact in float32
            readout = contrastive_columns(readout) if contrastive else readout
            directions = readout[:, targets].T                                     # (B, D)
            if return_convergence_delta:
                attr, rest = contrib.scores_and_rest(directions, level=granularity, per_image=True)
            else:
                attr = contrib.scores(directions, level=granularity, per_image=True)
            factor = self.logit_factors(contrib, attr)
            attr = attr * factor.view(-1, *([1] * (attr.dim() - 1)))
            if granularity == "spatial":
                attr = attr.unsqueeze(1)           # Captum's layer maps carry a channel axis: (B, 1, h, w)
            out = (attr,) if is_tuple else attr
            if not return_convergence_delta:
                return out
            total = attr.flatten(start_dim=1).sum(dim=1) + rest * factor
            delta = _convergence_delta(self.forward_func, images, additional_forward_args, targets, total,
                                       contrastive)
        return out, delta

    # ---- reading the read-out ----------------------------------------------------------------------------
    def _read_out(self, forward_func: Callable, readout: Optional[Tensor],
                  model: Optional[nn.Module]) -> tuple[Any, Tensor]:
        """``(spec, readout (D, K))``: explicit arguments first, else ``forward_func``'s attributes."""
        model = model if model is not None else getattr(forward_func, "model", None)
        readout = readout if readout is not None else getattr(forward_func, "readout", None)
        if model is None or readout is None:
            raise TypeError(
                f"{type(self).__name__} needs a linear read-out of a {self.family} embedding: pass "
                "nha_plugin.harness.ZeroShotClassifier / TextSimilarity as forward_func, or give readout=(D, K) "
                f"and model=... explicitly (got forward_func={type(forward_func).__name__})")
        spec = self.spec_of(model)
        if readout.dim() != 2 or readout.shape[0] != spec.output_dim:
            raise ValueError(f"readout must be (D, K) with D={spec.output_dim} (the model's embedding width); "
                             f"got {tuple(readout.shape)}")
        check_directions(readout.detach().T, "readout column")
        return spec, readout
