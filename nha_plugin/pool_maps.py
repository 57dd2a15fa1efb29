"""Per-token maps of CLIP-ResNet's attention pool: the attention sink, MaskCLIP and self-self token outputs, and the
head maps of the NAD segmentor. The one home of what the decomposition, the harness and the segmentor show per
layer4 cell; the algebra they rest on is :mod:`nha_plugin.pool`.

The attention sink: a trained CLIP-ResNet's class token attends heavily to the last spatial token. Maps handle it
with ``sink`` = ``"keep"`` (exact) | ``"interpolate"`` (replace the last cell by the mean of its W, N and NW
neighbours, as the NAD paper does for segmentation) | ``"drop"`` (zero it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .pool import class_attention, head_split, positional_embedding_for, tokens, value_tokens
from .spec import AttentionPoolSpec

__all__ = ["SINK_MODES", "BIAS_SHARES", "check_sink", "sink_value", "apply_sink", "maskclip_tokens",
           "self_self_tokens", "token_cosines", "head_maps"]

SINK_MODES = ("keep", "interpolate", "drop")
BIAS_SHARES = ("attention", "uniform")


def check_sink(sink: str, modes: tuple = SINK_MODES) -> None:
    """Refuse a sink mode outside ``modes`` with a message that lists them."""
    if sink not in modes:
        raise ValueError(f"sink must be one of {', '.join(map(repr, modes))}; got {sink!r}")


def sink_value(grid: Tensor, sink: str) -> Tensor:
    """The value the sink cell (the last one) of maps (..., h, w) gets under ``sink`` ('interpolate' | 'drop'),
    shape (...,). 'interpolate' is the mean of its W, N and NW neighbours."""
    check_sink(sink, ("interpolate", "drop"))
    if sink == "drop":
        return torch.zeros_like(grid[..., -1, -1])
    h, w = grid.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"sink='interpolate' needs a grid of at least 2x2; got {h}x{w}")
    return (grid[..., -1, -2] + grid[..., -2, -1] + grid[..., -2, -2]) / 3


def apply_sink(grid: Tensor, sink: str) -> Tensor:
    """Maps (..., h, w) with the sink cell handled per ``sink`` (a new tensor unless ``sink='keep'``)."""
    check_sink(sink)
    if sink == "keep":
        return grid
    out = grid.clone()
    out[..., -1, -1] = sink_value(grid, sink)
    return out


def maskclip_tokens(spec: AttentionPoolSpec, features: Tensor) -> Tensor:
    """MaskCLIP for ResNet: c_proj(v_proj(F_m)) per spatial cell (no q/k, no positional embedding), (B, h*w, D)."""
    flat = rearrange(features, "b c h w -> b (h w) c")
    return (flat @ spec.v_weight.T + spec.v_bias) @ spec.c_weight.T + spec.c_bias


def self_self_tokens(spec: AttentionPoolSpec, features: Tensor,
                     positional_embedding: Optional[Tensor] = None) -> Tensor:
    """Self-self attention outputs per spatial token, (B, h*w, D): per head
    (softmax(QQ^T/sqrt d) + softmax(KK^T/sqrt d)) over all T tokens applied to V, heads concatenated, then c_proj.
    ``positional_embedding`` (T, C) defaults to the spec's, interpolated to the features' grid."""
    H, d = spec.num_heads, spec.head_dim
    pos = positional_embedding if positional_embedding is not None else \
        positional_embedding_for(spec, features.shape[-2:])
    z = tokens(features, pos)

    def heads(wt, b):
        return rearrange(z @ wt.T + b, "b t (h j) -> b h t j", h=H)

    q, k, v = heads(spec.q_weight, spec.q_bias), heads(spec.k_weight, spec.k_bias), heads(spec.v_weight, spec.v_bias)
    attn = (torch.softmax(q @ q.transpose(-1, -2) / math.sqrt(d), dim=-1)
            + torch.softmax(k @ k.transpose(-1, -2) / math.sqrt(d), dim=-1))
    out = rearrange(attn @ v, "b h t j -> b t (h j)") @ spec.c_weight.T + spec.c_bias
    return out[:, 1:]


def token_cosines(outputs: Tensor, directions: Tensor, grid: tuple[int, int], per_image: bool = False) -> Tensor:
    """Cosine of each token output (B, h*w, D) with directions, as grids.

    Args:
        outputs: per-token outputs (B, h*w, D), e.g. :func:`maskclip_tokens`.
        directions: (P, D) class directions (every image against every class), or (B, D) one per image.
        grid: (h, w).
        per_image: whether ``directions`` holds one row per image.

    Returns:
        (B, h, w) with ``per_image``, else (B, P, h, w).
    """
    out, e = F.normalize(outputs, dim=-1), F.normalize(directions.to(outputs), dim=-1)
    if per_image:
        return torch.einsum("btd,bd->bt", out, e).view(-1, *grid)
    return rearrange(out @ e.T, "b (i j) p -> b p i j", i=grid[0], j=grid[1])


def head_maps(spec: AttentionPoolSpec, features: Tensor, text: Tensor, *, positional_embedding: Optional[Tensor] = None,
              sink: str = "interpolate", bias_share: str = "attention") -> Tensor:
    """L[b, p, h, i, j]: cosine between t_p and the contribution of spatial token (i, j) through head h,
    (B, P, H, h, w).

    The contribution is ``a[h, m] W_o^h (W_v^h z_m + b_v^h)`` plus a share of the output bias b_o; with either share
    the H*T (head, token) entries sum to the image embedding exactly:

    - ``"attention"`` (default): a[h, m] b_o / H. a[h, m] then scales the whole entry and drops out of the cosine:
      L = cos(W_o^h (W_v^h z_m + b_v^h) + b_o / H, t_p), what head h would write if it attended only to token m
      (defined even where a[h, m] underflows to 0).
    - ``"uniform"`` (the even split TextSpan uses for ViTs): b_o / (H T) per entry. A token a head ignores
      (a[h, m] -> 0) then points along b_o, whatever the image.

    The norm and the dot products with the texts go through the (H, d, d) Gram matrices of W_o^h, so the
    (B, T, H, D) contributions are never built.

    Args:
        spec: the model's attention pool.
        features: layer4 output F (B, C, h, w) of the crop.
        text: class directions (P, D) (need not be unit norm; cosines are taken).
        positional_embedding: (h*w + 1, C) for this grid; default: the spec's, interpolated to the grid.
        sink: see :data:`SINK_MODES`.
        bias_share: "attention" | "uniform" (see above).
    """
    if bias_share not in BIAS_SHARES:
        raise ValueError(f"bias_share must be one of {BIAS_SHARES}; got {bias_share!r}")
    H = spec.num_heads
    h, w = features.shape[-2:]
    pos = positional_embedding if positional_embedding is not None else positional_embedding_for(spec, (h, w))
    z = tokens(features, pos)
    T = z.shape[1]
    av = value_tokens(spec, z, class_attention(spec, z) if bias_share == "uniform" else None)[:, 1:]
    wo, _ = head_split(spec)                                                      # (D, H, d)
    text = text.to(av)
    share = spec.c_bias / (H * T if bias_share == "uniform" else H)              # (D,)
    text_in = torch.einsum("Dhj,pD->hjp", wo, text)                               # W_o^h^T t_p
    share_in = torch.einsum("Dhj,D->hj", wo, share)                               # W_o^h^T share
    gram = torch.einsum("Dhj,Dhk->hjk", wo, wo)                                   # W_o^h^T W_o^h
    dots = torch.einsum("bmhj,hjp->bpmh", av, text_in) + (text @ share)[None, :, None, None]
    sq = ((torch.einsum("bmhj,hjk->bmhk", av, gram) * av).sum(-1) + 2 * (av * share_in).sum(-1) + share @ share)
    cos = dots / (sq.clamp_min(0).sqrt()[:, None] * text.norm(dim=-1)[None, :, None, None]).clamp_min(1e-30)
    return apply_sink(rearrange(cos, "b p (i j) h -> b p h i j", i=h, j=w), sink)
