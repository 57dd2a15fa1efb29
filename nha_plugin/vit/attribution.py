"""``ViTAttribution``: the exact CLIP-ViT decomposition as a Captum layer attribution.

The CLIP-ViT sibling of :class:`nha_plugin.NeuronHeadAttribution`: both are
:class:`nha_plugin.readout_attribution.ReadoutAttribution` subclasses, so they share the read-out detection (a
module carrying ``readout`` (D, K), ``logit_scale``, ``normalize``, ``model``, such as
``nha_plugin.harness.ZeroShotClassifier``), Captum's target semantics and return conventions, and exact
convergence deltas.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from captum.log import log_usage
from torch import Tensor, nn

from ..readout_attribution import ReadoutAttribution
from .decomposition import ViTContributions, decompose
from .spec import ViTSpec, vit_spec

__all__ = ["ViTAttribution", "GRANULARITIES"]

GRANULARITIES = ("spatial", "head", "layer", "token")


class ViTAttribution(ReadoutAttribution):
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
        layer: the layer explained: None or the last residual block (``visual.transformer.resblocks[-1]``),
            whose patch-token grid the spatial map is on; any other module is refused (the layers whose
            (head, token) entries the map sums are chosen with ``token_layers``).
        device_ids: accepted for Captum compatibility; unused.
        readout: (D, K) read-out matrix, overriding ``forward_func.readout``.
        model: the CLIP-ViT (whole model or image tower), overriding ``forward_func.model``.
        logit_scale, normalize: override the read-out's scale and whether the embedding is normalised.
        granularity, contrastive: defaults for :meth:`attribute`.
        token_layers: layers whose (head, token) entries make up "spatial"/"token" attributions ("all" by
            default); the other layers' heads join the reported rest.

    Example::

        head = nha.harness.ZeroShotClassifier(model, tokenizer, ["cat", "dog"], templates)
        attr, delta = vit.ViTAttribution(head).attribute(images, target=0, return_convergence_delta=True)
        up = LayerAttribution.interpolate(attr, images.shape[-2:])       # attr: (B, 1, gh, gw)
    """

    granularities = GRANULARITIES
    family = "CLIP-ViT"
    decomposed = "the residual stream's components"
    layer_hint = ("The spatial map sums the (layer, head, patch) entries of the token layers: choose those with "
                  "token_layers=[...] (e.g. token_layers=[5] for block 5 alone), not with layer=")

    def __init__(self, forward_func: Callable, layer: Optional[nn.Module] = None,
                 device_ids: Optional[Sequence[int]] = None, *, readout: Optional[Tensor] = None,
                 model: Optional[nn.Module] = None, logit_scale: Optional[float] = None,
                 normalize: Optional[bool] = None, granularity: str = "spatial",
                 token_layers: Union[str, Sequence[int]] = "all", contrastive: bool = False) -> None:
        super().__init__(forward_func, layer, device_ids, readout=readout, model=model, logit_scale=logit_scale,
                         normalize=normalize, granularity=granularity, contrastive=contrastive,
                         token_layers=token_layers)

    @staticmethod
    def spec_of(model: nn.Module) -> ViTSpec:
        """The CLIP-ViT's :class:`ViTSpec` (:func:`nha_plugin.vit.spec.vit_spec`)."""
        return vit_spec(model)

    def default_layer(self) -> Optional[nn.Module]:
        """The last residual block (its patch tokens carry the map), or None for a spec without a module."""
        return self.spec.module.transformer.resblocks[-1] if self.spec.module is not None else None

    def contributions(self, inputs: Tensor, token_layers: Union[str, Sequence[int], None] = None) -> ViTContributions:
        """The full :class:`ViTContributions` behind an attribution."""
        layers = token_layers if token_layers is not None else self.defaults["token_layers"]
        return decompose(self.spec, inputs, token_layers=layers)

    # Captum's NoiseTunnel calls attribute.__wrapped__; log_usage supplies it as on Captum's own methods.
    @log_usage()
    def attribute(self, inputs: Union[Tensor, tuple], target: Any = None, additional_forward_args: Any = None,
                  *, granularity: Optional[str] = None, token_layers: Union[str, Sequence[int], None] = None,
                  contrastive: Optional[bool] = None, baselines: Any = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False):
        r"""Attributions of ``forward_func(inputs)[:, target]``; ``inputs``, ``target``,
        ``additional_forward_args``, ``contrastive``, ``baselines`` (refused), ``return_convergence_delta`` and
        ``attribute_to_layer_input`` behave as in :meth:`nha_plugin.NeuronHeadAttribution.attribute` (Captum's
        contract, shared through the base class).

        Args:
            granularity: ``"spatial"`` (B, 1, gh, gw) | ``"head"`` (B, L, H) | ``"layer"`` (B, 2L+1) in the order
                [embedding, attn_0, mlp_0, ...] | ``"token"`` (B, L', H, N) over the token layers.
            token_layers: override the constructor's ``token_layers`` for this call.

        Returns:
            attributions, or ``(attributions, delta)`` with delta ``sum(attr) + rest - f(x)[target]`` (B,); plain
            tensors (no autograd graph).

        Precision: the forward pass runs in the model's dtype and the decomposition in float64 / float32
        (:func:`nha_plugin.vit.decompose`), so the delta measures ``forward_func``'s own low-precision forward:
        for a cosine read-out ``|delta| <= bound * logit_scale * ||w_target||`` with bound 1e-13 (fp64), 1e-6
        (fp32), and ``(L + 1) * eps`` for bf16 / fp16 models with L blocks (eps = 7.8e-3 for bf16, 9.8e-4
        for fp16: the model's stream is rounded to its dtype at every residual addition, so the bound grows with
        depth); measured |delta| / logit_scale on the tiny 3-block test ViT (8 images): 1.4e-16, 3.1e-7, 3.8e-3
        and 4.3e-4.
        """
        return self.attribute_readout(inputs, target, additional_forward_args, granularity=granularity,
                                      contrastive=contrastive, baselines=baselines,
                                      return_convergence_delta=return_convergence_delta,
                                      attribute_to_layer_input=attribute_to_layer_input, token_layers=token_layers)
