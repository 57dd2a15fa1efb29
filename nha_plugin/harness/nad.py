"""NAD methods: the exact neuron x head decomposition's spatial map and its heads-only and neurons-only maps.

- ``nad_spatial`` / ``nad_spatial_interp``: :class:`nha_plugin.NeuronHeadAttribution` at granularity
  "spatial" (sink kept, or interpolated with the removed part reported), complete.
- ``nad_heads``: per spatial token t, ``sum_h a[h,t] (W_o^h (W_v^h z_t + b_v^h)) . e`` in logit units.
- ``nad_neurons``: ``sum_n F_t[n] w[n]`` with ``w[n] = sum_h g[h,n] mean_t a[h,t]`` in logit units.

The attention-pool algebra comes from :mod:`nha_plugin.pool`, the sink rule from :mod:`nha_plugin.pool_maps`
and the logit factor from :func:`nha_plugin.readout.logit_factor`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attribution import NeuronHeadAttribution
from ..pool import head_bias, pair_coefficients, pool_output, target_weights
from ..pool_maps import apply_sink
from ..spec import AttentionPoolSpec
from .forward import pool_inputs, readout_factor, relative_to_logit, resnet_spec, target_directions
from .registry import MethodFn, register_method

__all__ = ["nad_heads", "nad_neurons"]


def _nad_spatial(sink: str) -> MethodFn:
    def fn(forward, images, target):
        nad = NeuronHeadAttribution(forward, sink=sink)
        attr, delta = nad.attribute(images, target=target, granularity="spatial", return_convergence_delta=True)
        return attr, relative_to_logit(delta, forward, images, target)
    return fn


register_method("nad_spatial", family="nad", completeness=True, needs_grad=False,
                description="NAD spatial map (layer4 cells; mean token spread 1/hw; sink kept: exact)")(
    _nad_spatial("keep"))
register_method("nad_spatial_interp", family="nad", completeness=True, needs_grad=False,
                description="NAD spatial map with the attention-sink cell interpolated (W, N, NW mean); the "
                            "removed part is reported as its own term, so completeness still holds")(
    _nad_spatial("interpolate"))


def _target_parts(forward: nn.Module, images: Tensor, target: Tensor):
    """spec, layer4 features F (B, C, h, w), tokens z (B, T, C), class attention a (B, H, T), target
    directions e (B, D), their pair weights g (B, H, C) and the logit factor (B, 1, 1)."""
    spec: AttentionPoolSpec = resnet_spec(forward)
    feats, z, a = pool_inputs(spec, images)
    e = target_directions(forward, target).to(z.dtype)
    embedding = pool_output(spec, pair_coefficients(a, z))
    return spec, feats, z, a, e, target_weights(spec, e[..., None])[..., 0], readout_factor(forward, embedding)


@register_method("nad_heads", family="nad", needs_grad=False,
                 description="NAD heads-only map: per spatial token t, sum_h a[h,t] (W_o^h (W_v^h z_t + b_v^h)) . e "
                             "(token scores incl. positional and head-bias shares), sink interpolated")
def nad_heads(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Heads-only map in logit units, (B, h, w), sink interpolated."""
    spec, feats, z, a, e, g, scale = _target_parts(forward, images, target)
    per_head = torch.einsum("btn,bhn->bht", z, g) + (head_bias(spec) @ e.T).T[:, :, None]   # (B, H, T)
    tok = (a * per_head).sum(dim=1)[:, 1:]
    return apply_sink(tok.view(-1, *feats.shape[-2:]), "interpolate") * scale.view(-1, 1, 1)


@register_method("nad_neurons", family="nad", needs_grad=False,
                 description="NAD neurons-only map: sum_n F_t[n] w[n], w[n] = sum_h g[h,n] mean_t a[h,t] (raw layer4 "
                             "activations, no positional embedding, no per-token attention), sink interpolated")
def nad_neurons(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Neurons-only map in logit units, (B, h, w), sink interpolated."""
    spec, feats, z, a, e, g, scale = _target_parts(forward, images, target)
    w = torch.einsum("bhn,bh->bn", g, a[:, :, 1:].mean(dim=-1))
    grid = torch.einsum("bnij,bn->bij", feats, w)
    return apply_sink(grid, "interpolate") * scale.view(-1, 1, 1)
