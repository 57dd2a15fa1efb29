"""``NeuronHeadAttribution``: the exact neuron x head decomposition as a Captum layer attribution.

The forward function must be a linear read-out of the CLIP image embedding. The method recognises one by
its attributes (``readout`` (D, K), ``logit_scale``, ``normalize``, ``model``), as carried by
``nha_plugin.harness.ZeroShotClassifier`` / ``TextSimilarity``, or takes them as explicit arguments. What it
shares with the CLIP-ViT sibling (targets, read-out, deltas) is
:class:`nha_plugin.readout_attribution.ReadoutAttribution`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from captum.log import log_usage
from torch import Tensor, nn

from .adapters import get_spec
from .decomposition import Contributions, check_bias
from .models import decompose
from .pool_maps import check_sink
from .readout_attribution import ReadoutAttribution, lift_to_input
from .spec import AttentionPoolSpec

__all__ = ["NeuronHeadAttribution", "lift_to_input", "GRANULARITIES"]

GRANULARITIES = ("spatial", "pair", "head", "neuron", "token")


class NeuronHeadAttribution(ReadoutAttribution):
    r"""Exact attribution of a CLIP-ResNet read-out to (neuron, head) pairs, heads, neurons, tokens or
    layer4 locations.

    The image embedding splits exactly as ``y = beta + sum_{h,n} s[h,n] u[h,n]``; a read-out column w gives
    the logit ``scale * y . w`` (divided by ``||y||`` for cosine read-outs), so every granularity's scores
    plus the reported constant terms (:meth:`Contributions.rest_score`) equal the logit. The convergence delta
    is that residual, measured against ``forward_func(inputs)[target]``.

    Args:
        forward_func: a linear read-out module (``ZeroShotClassifier``, ``TextSimilarity``, or any module with
            ``readout``/``logit_scale``/``normalize``/``model`` attributes), or any callable together with the
            explicit ``readout=`` and ``model=`` arguments.
        layer: the layer explained: None or the model's layer4 (whose output grid the spatial map is on); any
            other module is refused.
        device_ids: accepted for Captum compatibility (DataParallel); unused.
        readout: (D, K) read-out matrix, overriding ``forward_func.readout``.
        model: the CLIP-ResNet, overriding ``forward_func.model``.
        logit_scale, normalize: override the read-out's scale and whether the embedding is normalised.
        granularity, sink, bias, contrastive: defaults for :meth:`attribute`.

    Example::

        head = nha.harness.ZeroShotClassifier(model, tokenizer, ["cat", "dog"], templates)
        nad = nha.NeuronHeadAttribution(head)
        attr, delta = nad.attribute(images, target=0, return_convergence_delta=True)   # (B, 1, 7, 7), (B,)
        up = LayerAttribution.interpolate(attr, images.shape[-2:])
    """

    granularities = GRANULARITIES
    family = "CLIP-ResNet"
    decomposed = "layer4's output"
    layer_hint = ("The decomposition splits the attention pool's output over layer4's neurons and cells; for "
                  "another layer use a gradient method (captum.attr.LayerGradCam, LayerIntegratedGradients)")

    def __init__(self, forward_func: Callable, layer: Optional[nn.Module] = None,
                 device_ids: Optional[Sequence[int]] = None, *, readout: Optional[Tensor] = None,
                 model: Optional[nn.Module] = None, logit_scale: Optional[float] = None,
                 normalize: Optional[bool] = None, granularity: str = "spatial", sink: str = "keep",
                 bias: str = "own", contrastive: bool = False) -> None:
        check_sink(sink)
        check_bias(bias)
        super().__init__(forward_func, layer, device_ids, readout=readout, model=model, logit_scale=logit_scale,
                         normalize=normalize, granularity=granularity, contrastive=contrastive, sink=sink, bias=bias)

    @staticmethod
    def spec_of(model: nn.Module) -> AttentionPoolSpec:
        """The CLIP-ResNet's :class:`AttentionPoolSpec` (:func:`nha_plugin.adapters.get_spec`)."""
        return get_spec(model)

    def default_layer(self) -> Optional[nn.Module]:
        """The model's layer4, whose grid the spatial map is on."""
        return self.spec.layer4

    def contributions(self, inputs: Tensor, sink: Optional[str] = None, bias: Optional[str] = None) -> Contributions:
        """The full :class:`Contributions` object behind an attribution (sink/bias: None takes the constructor's)."""
        return decompose(self.spec, inputs, sink=self.defaults["sink"] if sink is None else sink,
                         bias=self.defaults["bias"] if bias is None else bias)

    # Captum's NoiseTunnel calls attribute.__wrapped__; log_usage supplies it as on Captum's own methods.
    @log_usage()
    def attribute(self, inputs: Union[Tensor, tuple], target: Any = None, additional_forward_args: Any = None,
                  *, granularity: Optional[str] = None, sink: Optional[str] = None, bias: Optional[str] = None,
                  contrastive: Optional[bool] = None, baselines: Any = None,
                  return_convergence_delta: bool = False, attribute_to_layer_input: bool = False):
        r"""Attributions of ``forward_func(inputs)[:, target]``.

        Args:
            inputs: images (B, 3, H, W), or a 1-tuple holding them (then a 1-tuple is returned).
            target: int, list of B ints, or a (B,) tensor (Captum semantics); optional when K == 1.
            additional_forward_args: passed to ``forward_func`` when computing the convergence delta only; the
                decomposition reads the images alone.
            granularity: ``"spatial"`` (B, 1, h, w) | ``"pair"`` (B, H, C) | ``"head"`` (B, H) |
                ``"neuron"`` (B, C) | ``"token"`` (B, T).
            sink, bias: see :func:`nha_plugin.decompose`; None takes the constructor's.
            contrastive: explain ``logit_c - mean_k logit_k`` instead of ``logit_c`` (the read-out of
                :func:`nha_plugin.readout.contrastive_columns`; the delta is then against that contrastive logit);
                None takes the constructor's.
            baselines: refused unless None (an exact decomposition has no baseline).
            return_convergence_delta: also return (B,) residuals ``sum(attr) + constant terms - f(x)[target]``.
            attribute_to_layer_input: unsupported (the decomposition is of layer4's output); must be False.

        Returns:
            attributions, or ``(attributions, delta)``; plain tensors (no autograd graph).

        Precision: the decomposition runs in float64 for a float64 model and in float32 otherwise, from the
        layer4 features the model's trunk computed (the model is not modified), so the attributions are exact to
        that precision. The delta measures ``forward_func``'s own forward pass (attention pool and read-out in the
        model's dtype) against them: for a cosine read-out ``|delta| <= bound * logit_scale * ||w_target||``
        (times ``||y||`` for a raw dot product), bound = 1e-13 (fp64), 1e-6 (fp32), and the dtype's machine
        epsilon for bf16 (7.8e-3) and fp16 (9.8e-4); measured |delta| / logit_scale on the tiny test
        ResNet (8 images): 2e-16, 3.8e-8, 3.4e-4 and 5.5e-5. In bf16 a logit near 20 is itself only known to +-0.06: the delta says so.
        """
        return self.attribute_readout(inputs, target, additional_forward_args, granularity=granularity,
                                      contrastive=contrastive, baselines=baselines,
                                      return_convergence_delta=return_convergence_delta,
                                      attribute_to_layer_input=attribute_to_layer_input, sink=sink, bias=bias)
