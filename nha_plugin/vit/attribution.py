"""``ViTAttribution``: the exact CLIP-ViT decomposition as a Captum layer attribution.

The CLIP-ViT sibling of :class:`nha_plugin.NeuronHeadAttribution`: same read-out detection (a module carrying
``readout`` (D, K), ``logit_scale``, ``normalize``, ``model``, such as ``nha_plugin.harness.ZeroShotClassifier``),
same Captum target semantics and return conventions, exact convergence deltas.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from captum.attr import LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ..attribution import (NeuronHeadAttribution, _check_granularity, _convergence_delta, _images,
                           _readout_from, _scaled, _target_directions)
from .decomposition import ViTContributions, decompose
from .spec import vit_spec

__all__ = ["ViTAttribution", "GRANULARITIES"]

GRANULARITIES = ("spatial", "head", "layer", "token")


class ViTAttribution(LayerAttribution):
    r"""Exact attribution of a CLIP-ViT read-out to patches, heads, layers or (layer, head, token) entries.

    The image embedding is the exact sum of the embedding, MLP and (layer, head, token) components with
    LN_post's statistics frozen (``nha_plugin.vit.decompose``); a read-out column w gives the logit
    ``scale * y . w`` (divided by ``||y||`` for cosine read-outs), so each granularity's attributions plus the
    terms reported beside them (:meth:`ViTContributions.rest_score`) equal the logit. The convergence delta is
    that residual against ``forward_func(inputs)[:, target]``.

    Args:
        forward_func: a linear read-out module (``ZeroShotClassifier``, ``TextSimilarity``, or any module with
            ``readout``/``logit_scale``/``normalize``/``model`` attributes), or any callable together with
            explicit ``readout=`` and ``model=``.
        layer: the layer the spatial map lives on; defaults to the last residual block (its patch tokens).
        device_ids: accepted for Captum compatibility; unused.
        readout: (D, K) read-out matrix, overriding ``forward_func.readout``.
        model: the CLIP-ViT (whole model or image tower), overriding ``forward_func.model``.
        logit_scale, normalize: override the read-out's scale and whether the embedding is normalised.
        granularity: default for :meth:`attribute`.
        token_layers: layers whose (head, token) entries make up "spatial"/"token" attributions ("all" by
            default); the other layers' heads join the reported rest.

    Example::

        head = nha.harness.ZeroShotClassifier(model, tokenizer, ["cat", "dog"], templates)
        attr, delta = vit.ViTAttribution(head).attribute(images, target=0, return_convergence_delta=True)
        up = LayerAttribution.interpolate(attr, images.shape[-2:])       # attr: (B, 1, gh, gw)
    """

    _targets = NeuronHeadAttribution._targets
    has_convergence_delta = NeuronHeadAttribution.has_convergence_delta
    multiplies_by_inputs = NeuronHeadAttribution.multiplies_by_inputs

    def __init__(self, forward_func: Callable, layer: Optional[nn.Module] = None,
                 device_ids: Optional[Sequence[int]] = None, *, readout: Optional[Tensor] = None,
                 model: Optional[nn.Module] = None, logit_scale: Optional[float] = None,
                 normalize: Optional[bool] = None, granularity: str = "spatial",
                 token_layers: Union[str, Sequence[int]] = "all") -> None:
        self.spec, self.readout, self.logit_scale, self.normalize = _readout_from(
            forward_func, readout, model, logit_scale, normalize, spec_of=vit_spec, who="ViTAttribution",
            family="CLIP-ViT")
        _check_granularity(granularity, GRANULARITIES)
        self.defaults = dict(granularity=granularity, token_layers=token_layers)
        if layer is None and self.spec.module is not None:
            layer = self.spec.module.transformer.resblocks[-1]
        super().__init__(forward_func, layer, device_ids)

    def contributions(self, inputs: Tensor, token_layers: Union[str, Sequence[int], None] = None) -> ViTContributions:
        """The full :class:`ViTContributions` behind an attribution."""
        layers = token_layers if token_layers is not None else self.defaults["token_layers"]
        return decompose(self.spec, inputs, token_layers=layers)

    # Captum's NoiseTunnel calls attribute.__wrapped__; log_usage supplies it as on Captum's own methods.
    @log_usage()
    def attribute(self, inputs: Union[Tensor, tuple], target: Any = None, additional_forward_args: Any = None,
                  *, granularity: Optional[str] = None, token_layers: Union[str, Sequence[int], None] = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False):
        r"""Attributions of ``forward_func(inputs)[:, target]``.

        Args:
            inputs: images (B, 3, H, W), or a 1-tuple holding them (then a 1-tuple is returned).
            target: int, list of B ints, or a (B,) tensor (Captum semantics); optional when K == 1.
            additional_forward_args: passed to ``forward_func`` for the convergence delta only.
            granularity: ``"spatial"`` (B, 1, gh, gw) | ``"head"`` (B, L, H) | ``"layer"`` (B, 2L+1) in the order
                [embedding, attn_0, mlp_0, ...] | ``"token"`` (B, L', H, N) over the token layers.
            token_layers: override the constructor's ``token_layers`` for this call.
            return_convergence_delta: also return (B,) residuals ``sum(attr) + rest - f(x)[target]``.
            attribute_to_layer_input: unsupported; must be False.

        Returns:
            attributions, or ``(attributions, delta)``.
        """
        if attribute_to_layer_input:
            raise ValueError("attribute_to_layer_input=True is not supported: the decomposition is of the "
                             "residual stream's components")
        granularity = granularity or self.defaults["granularity"]
        _check_granularity(granularity, GRANULARITIES)
        inputs, is_tuple = _images(inputs)
        targets = self._targets(target, inputs.shape[0])
        contrib = self.contributions(inputs, token_layers)
        e, factor = _target_directions(self, targets, contrib, contrib.embedding.dtype)
        attr, rest = contrib.scores_and_rest(e, level=granularity, per_image=True)
        attr = _scaled(attr, factor, granularity)
        out = (attr,) if is_tuple else attr
        if not return_convergence_delta:
            return out
        total = attr.flatten(start_dim=1).sum(dim=1) + rest * factor
        return out, _convergence_delta(self.forward_func, inputs, additional_forward_args, targets, total)
