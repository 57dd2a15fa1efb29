"""TransformerLens front door: a ``HookedRootModule`` around a CLIP-ResNet (needs the ``tl`` extra).

    tl_model = HookedCLIPResNet(model)
    logits, cache = tl_model.run_with_cache(images)
    stack, labels = cache.stack_head_results(return_labels=True)          # (H, B, D), ['H0', 'H1', ...]
    tl_model.run_with_hooks(images, fwd_hooks=[("attnpool.hook_pattern", fn)])

Hook names: ``hook_layer4`` [B, C, h, w] and ``attnpool.hook_*`` (see :mod:`nha_plugin.hooks`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from nha_plugin.hooks import HookedAttentionPool, find_pool

from . import get_spec, require_extra

_tl = require_extra("transformer_lens", "tl")
from transformer_lens import ActivationCache, HookedRootModule  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402

__all__ = ["HookedCLIPResNet", "CLIPResNetActivationCache"]


class HookedCLIPResNet(HookedRootModule):
    """A CLIP-ResNet image tower as a TransformerLens ``HookedRootModule``: images -> embedding (B, D).

    The wrapped model is not modified: the trunk runs as the adapter's callable and the attention pool is a
    :class:`~nha_plugin.hooks.HookedAttentionPool` around the original pool's parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        spec = get_spec(model)
        parent, attr = find_pool(model)
        self._trunk = spec.trunk
        self.spec = spec
        self.hook_layer4 = HookPoint()
        self.attnpool = HookedAttentionPool(getattr(parent, attr), hook_cls=HookPoint)
        self.setup()

    def forward(self, images: Tensor) -> Tensor:
        return self.attnpool(self.hook_layer4(self._trunk(images)))

    def run_with_cache(self, *args, **kwargs):
        out, cache = super().run_with_cache(*args, **kwargs)
        if not isinstance(cache, ActivationCache):
            cache = CLIPResNetActivationCache(dict(cache), self)
        return out, cache


def _project(stack: Tensor, target: Optional[Tensor]) -> Tensor:
    return stack if target is None else stack @ target.to(stack.dtype)


class CLIPResNetActivationCache(ActivationCache):
    """Activation cache whose stacks split the embedding into labelled parts that sum to it (minus the
    constant term). Stacks put the component axis first, as TransformerLens does; pass ``target`` (D,) to
    get scores (components, B) instead of vectors (components, B, D)."""

    def _coeffs(self) -> Tensor:
        return self["attnpool.hook_pair_coeffs"]

    def stack_head_results(self, target: Optional[Tensor] = None, return_labels: bool = False):
        stack = _project(self["attnpool.hook_result"].transpose(0, 1), target)      # (H, B, D)
        labels = [f"H{h}" for h in range(stack.shape[0])]
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(self, target: Optional[Tensor] = None, neurons: Optional[Sequence[int]] = None,
                             return_labels: bool = False):
        from nha_plugin.pool import neuron_contributions
        s = self._coeffs()
        idx = torch.arange(s.shape[-1]) if neurons is None else torch.as_tensor(list(neurons))
        stack = neuron_contributions(self.model.spec.detached(), s, idx).transpose(0, 1)      # (C', B, D)
        labels = [f"N{int(n)}" for n in idx]
        stack = _project(stack, target)
        return (stack, labels) if return_labels else stack

    def stack_pair_results(self, target: Optional[Tensor] = None, heads: Optional[Sequence[int]] = None,
                           neurons: Optional[Sequence[int]] = None, return_labels: bool = False):
        """Pair contributions s[h,n] u[h,n], stacked as (P, B, D) or (P, B) with a target, labels 'H3N17'.
        All H*C pairs of a large model are big: select ``heads``/``neurons`` or give a ``target``."""
        from nha_plugin.pool import head_split, target_weights
        spec = self.model.spec.detached()
        s = self._coeffs()
        H, C = s.shape[1:]
        hs = torch.arange(H) if heads is None else torch.as_tensor(list(heads))
        ns = torch.arange(C) if neurons is None else torch.as_tensor(list(neurons))
        sub = s[:, hs][:, :, ns]                                                   # (B, h', n')
        if target is not None:
            g = target_weights(spec, target.to(s.dtype).view(-1, 1))[..., 0]        # (H, C)
            stack = (sub * g[hs][:, ns]).flatten(1).T                                  # (P, B)
        else:
            wo, wv = head_split(spec)
            u = torch.einsum("Dhj,hjn->hnD", wo[:, hs], wv[hs][..., ns])
            stack = torch.einsum("bhn,hnD->hnbD", sub, u).flatten(0, 1)
        labels = [f"H{int(h)}N{int(n)}" for h in hs for n in ns]
        return (stack, labels) if return_labels else stack
