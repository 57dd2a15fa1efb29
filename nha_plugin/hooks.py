"""Named hook points on the attention pool (TransformerLens style), as plain ``nn.Module`` identities.

``HookedAttentionPool`` recomputes the pool from its parameters with a named identity module at every
intermediate, so PyTorch hooks, Captum layer methods and nnsight-style tools can target them by name::

    with nha.hooks.hooked(model) as pool:          # model.visual.attnpool is swapped in, then back out
        pool.hook_pattern.register_forward_hook(...)
        model.encode_image(images)

Hook points and shapes (B batch, T = h*w + 1 tokens, H heads, d head width, C neurons, D embedding):

    hook_tokens       [B, T, C]     mean token + spatial tokens, plus positional embedding
    hook_q/k/v        [B, T, H, d]
    hook_attn_scores  [B, H, T]     class-token row, before softmax (scaled by 1/sqrt(d))
    hook_pattern      [B, H, T]     class-token attention
    hook_pair_coeffs  [B, H, C]     s[h, n] = sum_t a[h, t] z_t[n]
    hook_z            [B, H, d]     per-head attention output, before c_proj
    hook_result       [B, H, D]     per-head contribution W_o^h z_h
    hook_out          [B, D]        the image embedding

Editing ``hook_v`` or ``hook_pair_coeffs`` both reach the output: z_h = sum_t a v_t + W_v^h (s_edited - s).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Type

import torch
from torch import Tensor, nn

from .pool import head_split, pair_coefficients, positional_embedding_for, tokens, value_tokens
from .spec import AttentionPoolSpec, UnsupportedModelError, pool_weights_from_module

__all__ = ["HookPoint", "HookedAttentionPool", "hooked", "HOOK_NAMES", "find_pool"]

HOOK_NAMES = ("hook_tokens", "hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern",
              "hook_pair_coeffs", "hook_z", "hook_result", "hook_out")


class HookPoint(nn.Module):
    """An identity module to hang hooks on."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def find_pool(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute name) of a CLIP-ResNet's attention pool: ``visual.attnpool`` or timm's ``head``."""
    visual = getattr(model, "visual", model)
    if hasattr(visual, "attnpool"):
        return visual, "attnpool"
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "pos_embed"):
        return model, "head"
    raise UnsupportedModelError(f"no attention pool found on {type(model).__name__} "
                                "(expected .visual.attnpool, .attnpool, or a timm AttentionPool2d .head)")


class HookedAttentionPool(nn.Module):
    """The attention pool of ``pool`` recomputed from its parameters, with named hook points.

    Args:
        pool: the original attention-pool module (open_clip, OpenAI clip or timm); its parameters are used
            in place, not copied.
        hook_cls: the identity class to use (TransformerLens's ``HookPoint`` in the TL adapter).
    """

    def __init__(self, pool: nn.Module, hook_cls: Type[nn.Module] = HookPoint):
        super().__init__()
        self.pool = pool
        self.pool_spec()  # fail early on an unknown layout
        for name in HOOK_NAMES:
            setattr(self, name, hook_cls())

    def pool_spec(self) -> AttentionPoolSpec:
        """The wrapped pool's parameters as a spec, read on every call so that in-place edits count. It has no
        trunk: only the pool is recomputed here."""
        return AttentionPoolSpec(**pool_weights_from_module(self.pool), trunk=None)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The attention pool's output (B, D) for layer4 features x (B, C, h, w), through every hook point."""
        if pre_logits:
            raise ValueError("pre_logits=True is not supported by the hooked attention pool")
        spec = self.pool_spec()
        H, d = spec.num_heads, spec.head_dim
        z = self.hook_tokens(tokens(x, positional_embedding_for(spec, x.shape[-2:])))
        B, T = z.shape[:2]
        # all T queries are exposed (hook_q), though only the class token's row is attended with
        q = self.hook_q((z @ spec.q_weight.T + spec.q_bias).view(B, T, H, d))
        k = self.hook_k((z @ spec.k_weight.T + spec.k_bias).view(B, T, H, d))
        v = self.hook_v(value_tokens(spec, z))
        scores = self.hook_attn_scores(torch.einsum("bhj,bthj->bht", q[:, 0], k) / math.sqrt(d))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        raw = pair_coefficients(pattern, z)
        coeffs = self.hook_pair_coeffs(raw)
        wo, wv = head_split(spec)
        # an edit of the pair coefficients reaches the output through the value path: + W_v^h (s_edited - s)
        zh = torch.einsum("bht,bthj->bhj", pattern, v) + torch.einsum("hjn,bhn->bhj", wv, coeffs - raw)
        result = self.hook_result(torch.einsum("Dhj,bhj->bhD", wo, self.hook_z(zh)))
        return self.hook_out(result.sum(dim=1) + spec.c_bias)


@contextmanager
def hooked(model: nn.Module, hook_cls: Type[nn.Module] = HookPoint) -> Iterator[HookedAttentionPool]:
    """Swap a :class:`HookedAttentionPool` into ``model`` for the duration of the block; the original pool
    is put back in ``finally``, also after an exception."""
    parent, attr = find_pool(model)
    original = getattr(parent, attr)
    if isinstance(original, HookedAttentionPool):
        raise RuntimeError("this model's attention pool is already hooked; nested hooked() blocks are not allowed")
    hooked_pool = HookedAttentionPool(original, hook_cls)
    setattr(parent, attr, hooked_pool)
    try:
        yield hooked_pool
    finally:
        setattr(parent, attr, original)
