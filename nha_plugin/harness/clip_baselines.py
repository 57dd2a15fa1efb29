"""CLIP-specific training-free baselines on the attention pool: MaskCLIP for ResNet, self-self attention and the
raw class-token attention. Token outputs come from :mod:`nha_plugin.pool_maps`, attention from
:mod:`nha_plugin.pool`."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..pool_maps import maskclip_tokens, self_self_tokens, token_cosines
from ..spec import AttentionPoolSpec
from .forward import pool_inputs, resnet_spec, target_directions
from .registry import MethodFn, register_method

__all__ = ["class_attention_map"]


def _token_cosine(token_outputs: Callable[[AttentionPoolSpec, Tensor], Tensor]) -> MethodFn:
    """A method mapping each spatial token's output (B, hw, D) to its cosine with the target direction."""
    def fn(forward, images, target):
        spec = resnet_spec(forward)
        feats = spec.trunk(images)
        return token_cosines(token_outputs(spec, feats), target_directions(forward, target), feats.shape[-2:],
                             per_image=True)
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
def class_attention_map(forward: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Mean over heads of the class token's attention to each layer4 cell, (B, h, w)."""
    feats, _, a = pool_inputs(resnet_spec(forward), images)
    return a[:, :, 1:].mean(dim=1).view(-1, *feats.shape[-2:])
