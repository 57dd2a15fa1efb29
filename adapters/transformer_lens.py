"""TransformerLens front door: a ``HookedRootModule`` around a CLIP-ResNet (needs the ``tl`` extra).

    tl_model = HookedCLIPResNet(model)
    logits, cache = tl_model.run_with_cache(images)
    stack, labels = cache.stack_head_results(return_labels=True)          # (H, B, D), ['H0', 'H1', ...]
    tl_model.run_with_hooks(images, fwd_hooks=[("attnpool.hook_pattern", fn)])

Hook names: ``hook_layer4`` [B, C, h, w] and ``attnpool.hook_*`` (see :mod:`nha_plugin.hooks`). The cache's neuron
and pair stacks are :class:`nha_plugin.Contributions`'s, built from the cached hook values.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from nha_plugin.decomposition import Contributions
from nha_plugin.hooks import HookedAttentionPool, find_pool
from nha_plugin.pool import canonical_target, positional_embedding_for

from . import get_spec, require_extra

_tl = require_extra("transformer_lens", "tl")
from transformer_lens import ActivationCache, HookedRootModule  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402

__all__ = ["HookedCLIPResNet", "CLIPResNetActivationCache"]


class HookedCLIPResNet(HookedRootModule):
    """A CLIP-ResNet image tower as a TransformerLens ``HookedRootModule``: images -> embedding (B, D).

    The wrapped model is not modified: the trunk runs as the adapter's callable and the attention pool is a
    :class:`~nha_plugin.hooks.HookedAttentionPool` around the original pool's parameters, read at every call.
    So the wrapper follows the model: move or cast the model itself (``model.to(...)``, ``model.float()``).
    Moving the wrapper is refused (it would move the pool but not the trunk, leaving the caller's model split
    across dtypes or devices), and ``train()`` / ``eval()`` set the wrapper's own hook points only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        spec = get_spec(model)
        parent, attr = find_pool(model)
        self._trunk = spec.trunk
        # read afresh on each use: a spec kept from construction would hold views of weights the caller may
        # since have cast or moved
        self._read_spec: Callable[[], object] = lambda: get_spec(model)
        self._model_tensors: Callable[[], list] = lambda: [*model.parameters(), *model.buffers()]
        self.hook_layer4 = HookPoint()
        self.attnpool = HookedAttentionPool(getattr(parent, attr), hook_cls=HookPoint)
        self.setup()

    @property
    def spec(self):
        """The wrapped model's :class:`~nha_plugin.spec.AttentionPoolSpec`, as it is now."""
        return self._read_spec()

    def forward(self, images: Tensor) -> Tensor:
        return self.attnpool(self.hook_layer4(self._trunk(images)))

    def _apply(self, fn, recurse: bool = True):
        """Every dtype / device move (``to``, ``float``, ``double``, ``half``, ``cuda``, ...) passes through here:
        one that would change a tensor of the wrapped model is refused before anything moves; one that changes
        nothing (``to`` the model's own device and dtype) is a no-op."""
        for t in self._model_tensors():
            moved = fn(t)
            if moved is not t and (moved.dtype != t.dtype or moved.device != t.device):
                raise RuntimeError(
                    f"HookedCLIPResNet wraps the caller's model and reads its weights at every call; moving the "
                    f"wrapper would move the attention pool ({t.dtype}, {t.device} -> {moved.dtype}, "
                    f"{moved.device}) but not the trunk. Move or cast the model itself (model.to(...), "
                    "model.float()): the wrapper follows it")
        return self

    def train(self, mode: bool = True) -> "HookedCLIPResNet":
        """Set the mode of the wrapper and its hook points; the wrapped model's modules keep theirs."""
        foreign = {id(m) for m in self.attnpool.pool.modules()}
        for m in self.modules():
            if id(m) not in foreign:
                m.training = mode
        return self

    def run_with_cache(self, *args, **kwargs):
        out, cache = super().run_with_cache(*args, **kwargs)
        if not isinstance(cache, ActivationCache):
            cache = CLIPResNetActivationCache(dict(cache), self)
        return out, cache


class CLIPResNetActivationCache(ActivationCache):
    """Activation cache whose stacks split the embedding into labelled parts that sum to it (minus the
    constant term). Stacks put the component axis first, as TransformerLens does; pass ``target`` (D,) or
    (D, K), as TransformerLens's ``project_output_onto``, to get scores (components, B) or (components, B, K)
    instead of vectors (components, B, D)."""

    REQUIRED = ("hook_layer4", "attnpool.hook_pattern", "attnpool.hook_pair_coeffs")

    def contributions(self) -> Contributions:
        """The cached run's :class:`~nha_plugin.Contributions` (bias ``'own'``, sink ``'keep'``), built from the
        cached layer4 features, class attention and pair coefficients, edits made by hooks included."""
        missing = [name for name in self.REQUIRED if name not in self.cache_dict]
        if missing:
            raise KeyError(f"the cache lacks {missing}; run run_with_cache without a names_filter, or with one that "
                           f"keeps {list(self.REQUIRED)}")
        spec = self.model.spec.detached()
        features = self["hook_layer4"]
        return Contributions(spec, features, positional_embedding_for(spec, features.shape[-2:]),
                             self["attnpool.hook_pattern"], self["attnpool.hook_pair_coeffs"])

    def stack_head_results(self, target: Optional[Tensor] = None, return_labels: bool = False):
        """Each head's cached result ``W_o^h z_h`` (its value bias included, as TransformerLens's ``result``),
        (H, B, D), or projected onto ``target``; labels ``'H0'``, ... They sum to the embedding minus ``b_o``."""
        stack = self["attnpool.hook_result"].transpose(0, 1)                      # (H, B, D)
        if target is not None:
            e, kind = canonical_target(target, stack.shape[-1], stack.shape[1], stack.dtype, stack.device,
                                       per_image=False)
            stack = stack @ (e[0] if kind == "set" else e[0, :, 0])
        labels = [f"H{h}" for h in range(stack.shape[0])]
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(self, target: Optional[Tensor] = None, neurons: Optional[Sequence[int]] = None,
                             return_labels: bool = False):
        """:meth:`Contributions.stack_neuron_contributions` of the cached run: (C', B, D), or (C', B) / (C', B, K)
        with a target; labels ``'N17'``. All C neurons sum to the embedding minus the constant term."""
        return self.contributions().stack_neuron_contributions(target, neurons, return_labels, per_image=False)

    def stack_pair_results(self, target: Optional[Tensor] = None, heads: Optional[Sequence[int]] = None,
                           neurons: Optional[Sequence[int]] = None, return_labels: bool = False):
        """:meth:`Contributions.stack_pair_contributions` of the cached run: (P, B, D), or (P, B) / (P, B, K) with
        a target; labels ``'H3N17'``. All H*C pairs of a large model are big: select ``heads``/``neurons`` or
        give a ``target``."""
        return self.contributions().stack_pair_contributions(target, heads, neurons, return_labels, per_image=False)
