"""Per-crop class logits of the NAD segmentor and its baselines (docs/methods.md §1), from layer4 features.

For P classes with unit text directions t_p:

1. Pair ranking: score[p, h, n] = <PC0[h, n], t_p> with PC0[h, n] = sign[h, n] u[h, n] / ||u[h, n]|| (u from
   :func:`nha_plugin.pool.pair_directions`; sign +1 unless a dataset's PC0 signs are given). TopK(p) = the k pairs
   with the largest signed score; ``mask[p, h, n]`` is 1 on them.
2. Head maps L[p, m, h] = cos(t_p, contribution of token m through head h) (:func:`nha_plugin.pool_maps.head_maps`).
3. Neuron maps Z[m, n] = raw layer4 activation F_m[n] (no positional embedding).
4. logit[p, m] = (1/k) sum_h L[p, m, h] * (Z @ mask[p, h, :])[m] (one matmul over all pairs), class token dropped;
   the attention-sink cell of L and Z is handled per ``sink`` (:func:`nha_plugin.pool_maps.apply_sink`).

The baselines (:data:`METHOD_DESCRIPTIONS`) share the class texts: MaskCLIP for ResNet, self-self attention,
neurons-only, heads-only and the floor "global" (each crop's zero-shot class painted over it).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ...pool import (check_pair_signs, class_attention, pair_coefficients, pair_directions, pool_output,
                     positional_embedding_for, tokens)
from ...pool_maps import apply_sink, head_maps, maskclip_tokens, self_self_tokens, token_cosines
from ...spec import AttentionPoolSpec

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "DEFAULT_K", "PAPER_PAIR_SHARE", "paper_k", "pair_scores", "top_pairs",
           "neuron_maps", "nad_logits", "crop_logits"]

DEFAULT_K = 20000
# The paper keeps 20,000 of RN50x16's 48 x 3072 pairs per class; other models default to the same share.
PAPER_PAIR_SHARE = DEFAULT_K / (48 * 3072)

METHOD_DESCRIPTIONS: Dict[str, str] = {
    "nad": "NAD: (1/k) sum over the class's top-k pairs (h, n) of Z[m, n] L[p, m, h] (head cosine x neuron activation)",
    "maskclip": "MaskCLIP for ResNet: per-token c_proj(v_proj(F_m)) (no q/k, no positional embedding), cosine with t_p",
    "self-self": "self-self attention: per head softmax(QQ^T/sqrt d)+softmax(KK^T/sqrt d) over all tokens applied to "
                 "V, then c_proj; cosine of each spatial token with t_p",
    "neurons": "neurons only: NAD with L replaced by 1, i.e. (1/k) sum over the top-k pairs of Z[m, n] "
               "(= activations weighted by how many of a neuron's heads are in TopK(p))",
    "heads": "heads only: (1/H) sum_h L[p, m, h], no neuron mask",
    "global": "floor: each crop's zero-shot class (cos of the crop's image embedding with t_p) painted over the crop",
}
METHODS: Tuple[str, ...] = tuple(METHOD_DESCRIPTIONS)


def paper_k(spec: AttentionPoolSpec) -> int:
    """Pairs per class at the paper's share of H*C (20,000 for RN50x16, 417 for scenes-rn).

    Args:
        spec: the attention pool (H heads, C neurons).

    Returns:
        max(1, round(PAPER_PAIR_SHARE * H * C)).
    """
    return max(1, round(PAPER_PAIR_SHARE * spec.num_heads * spec.num_neurons))


def pair_scores(spec: AttentionPoolSpec, text: Tensor, pair_signs: Optional[Tensor] = None,
                heads_per_chunk: int = 4) -> Tensor:
    """Signed alignment <PC0[h, n], t_p> of every pair with every class.

    Args:
        spec: the attention pool.
        text: class directions (P, D).
        pair_signs: (H, C) of +-1 (e.g. ``nha_plugin.stats.DatasetStats.load(path).pc0_sign``); +1 when None.
        heads_per_chunk: u is built this many heads at a time (the full (H, C, D) table is 453 MB for RN50x16
            in fp32).

    Returns:
        (P, H, C) in the spec's dtype.
    """
    signs = check_pair_signs(pair_signs, spec)
    text = text.to(device=spec.device, dtype=spec.dtype)
    out = []
    for h0 in range(0, spec.num_heads, heads_per_chunk):
        u = pair_directions(spec, slice(h0, h0 + heads_per_chunk))                 # (h', C, D)
        out.append(torch.einsum("hnD,pD->phn", u, text) / u.norm(dim=-1).clamp_min(1e-30))
    return torch.cat(out, dim=1) * signs


def top_pairs(spec: AttentionPoolSpec, text: Tensor, k: int = DEFAULT_K, pair_signs: Optional[Tensor] = None) -> Tensor:
    """Indicator of each class's top-k pairs by :func:`pair_scores`.

    Args:
        spec, text, pair_signs: as :func:`pair_scores`.
        k: pairs per class; larger than H*C is clipped to H*C with a warning (then every pair is kept).

    Returns:
        (P, H, C) of 0/1 in the spec's dtype.
    """
    H, C = spec.num_heads, spec.num_neurons
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    if k > H * C:
        warnings.warn(f"k={k} exceeds the {H}x{C}={H * C} pairs of this model; using k={H * C} (every pair)",
                      stacklevel=2)
        k = H * C
    scores = pair_scores(spec, text, pair_signs).flatten(1)
    mask = torch.zeros_like(scores)
    mask.scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    return mask.view(-1, H, C)


def neuron_maps(features: Tensor, sink: str = "interpolate") -> Tensor:
    """Z: raw layer4 activations per cell (no positional embedding), the sink cell handled per ``sink``.

    Args:
        features: layer4 output (B, C, h, w).
        sink: "interpolate" | "keep" | "drop" (:data:`nha_plugin.pool_maps.SINK_MODES`).

    Returns:
        (B, C, h, w).
    """
    return apply_sink(features, sink)


def nad_logits(head_map: Tensor, neuron_map: Tensor, mask: Tensor, k: Optional[int] = None) -> Tensor:
    """logit[b, p, i, j] = (1/k) sum_h L[b, p, h, i, j] (Z @ mask[p, h, :]^T)[b, i, j].

    Args:
        head_map: L (B, P, H, h, w).
        neuron_map: Z (B, C, h, w).
        mask: (P, H, C) indicator of each class's top pairs (any weights work: the sum is weighted by them).
        k: the divisor (default: the number of selected pairs of the first class).

    Returns:
        (B, P, h, w).
    """
    B, P, H, h, w = head_map.shape
    k = k if k is not None else int(mask[0].sum().item())
    z = rearrange(neuron_map, "b n i j -> b (i j) n")
    zm = (z @ rearrange(mask.to(z), "p h n -> n (p h)")).view(B, h * w, P, H)    # the pairs, in one matmul
    out = (rearrange(head_map, "b p h i j -> b (i j) p h") * zm).sum(-1) / k
    return rearrange(out, "b (i j) p -> b p i j", i=h, j=w)


def crop_logits(spec: AttentionPoolSpec, features: Tensor, text: Tensor, methods: Sequence[str],
                mask: Optional[Tensor] = None, k: Optional[int] = None, sink: str = "interpolate",
                bias_share: str = "attention") -> Dict[str, Tensor]:
    """Grid-level class logits of every requested method for a batch of crops.

    Args:
        spec: the attention pool.
        features: layer4 output (B, C, h, w) of the crops.
        text: class directions (P, D).
        methods: names from :data:`METHODS`.
        mask: (P, H, C) top-pair indicator (needed by "nad" and "neurons"); k: its divisor.
        sink: sink handling of the NAD maps ("interpolate" | "keep").
        bias_share: how the head maps share b_o ("attention" | "uniform"; see
            :func:`nha_plugin.pool_maps.head_maps`).

    Returns:
        ``{method: (B, P, h, w)}``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown segmentation method(s) {unknown}; choose from {list(METHODS)}")
    grid = tuple(features.shape[-2:])
    pos = positional_embedding_for(spec, grid)
    text = text.to(device=features.device, dtype=features.dtype)
    if mask is None and any(m in ("nad", "neurons") for m in methods):
        raise ValueError("methods 'nad' and 'neurons' need the top-pair mask (see top_pairs)")
    k = k if k is not None or mask is None else int(mask[0].sum().item())
    out: Dict[str, Tensor] = {}
    L = (head_maps(spec, features, text, positional_embedding=pos, sink=sink, bias_share=bias_share)
         if {"nad", "heads"} & set(methods) else None)
    Z = neuron_maps(features, sink) if {"nad", "neurons"} & set(methods) else None
    for m in methods:
        if m == "nad":
            out[m] = nad_logits(L, Z, mask, k)
        elif m == "heads":
            out[m] = L.mean(dim=2)
        elif m == "neurons":
            out[m] = torch.einsum("bnij,pn->bpij", Z, mask.to(Z).sum(dim=1)) / k
        elif m == "maskclip":
            out[m] = token_cosines(maskclip_tokens(spec, features), text, grid)
        elif m == "self-self":
            out[m] = token_cosines(self_self_tokens(spec, features, pos), text, grid)
        elif m == "global":
            z = tokens(features, pos)
            y = pool_output(spec, pair_coefficients(class_attention(spec, z), z))
            cos = F.normalize(y, dim=-1) @ F.normalize(text, dim=-1).T
            out[m] = cos[:, :, None, None].expand(-1, -1, *grid)
    return out
