"""Per-crop class logits of the NAD segmentor and its baselines (docs/methods.md §1), from layer4 features.

For P classes with unit text directions t_p:

1. Pair ranking: score[p, h, n] = <PC0[h, n], t_p> with PC0[h, n] = sign[h, n] u[h, n] / ||u[h, n]|| (u from
   :func:`nha_plugin.pool.pair_directions`; sign +1 unless a dataset's PC0 signs are given). TopK(p) = the k pairs
   with the largest signed score; ``mask[p, h, n]`` is 1 on them.
2. Head maps L[p, m, h] = cos(t_p, contribution of token m through head h) (:func:`nha_plugin.pool_maps.head_maps`).
3. Neuron maps Z[m, n] = raw layer4 activation F_m[n] (no positional embedding).
4. logit[p, m] = (1/k) sum_h L[p, m, h] * (Z @ mask[p, h, :])[m] (one matmul over all pairs), class token dropped;
   the attention-sink cell of L and Z is handled per ``sink`` (:func:`nha_plugin.pool_maps.apply_sink`), on the maps
   (``sink_space="maps"``: the sink cell's L is the mean of its neighbours' cosines) or, as the paper's code does,
   on the contribution vectors before the cosine (``sink_space="contributions"``, :func:`contribution_head_maps`).

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

from ...pool import (check_pair_signs, class_attention, head_split, pair_coefficients, pair_directions, pool_output,
                     positional_embedding_for, tokens, value_tokens)
from ...pool_maps import (BIAS_SHARES, apply_sink, check_sink, head_maps, maskclip_tokens, self_self_tokens,
                          token_cosines)
from ...spec import AttentionPoolSpec

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "DEFAULT_K", "PAPER_PAIR_SHARE", "SINK_SPACES", "paper_k", "pair_scores",
           "top_pairs", "neuron_maps", "contribution_head_maps", "nad_logits", "crop_logits"]

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
# Where the head maps' sink cell is interpolated: between the cosines (nha) or between the contribution vectors
# before the cosine (the NAD paper's code).
SINK_SPACES = ("maps", "contributions")


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


def contribution_head_maps(spec: AttentionPoolSpec, features: Tensor, text: Tensor, *,
                           positional_embedding: Optional[Tensor] = None, sink: str = "interpolate",
                           bias_share: str = "uniform", heads_per_chunk: int = 8) -> Tensor:
    """L[b, p, h, i, j] as the NAD paper's code builds it: the contribution vector of each spatial token through each
    head, the sink cell's *vectors* handled per ``sink`` before the cosine with t_p, (B, P, H, h, w).

    The contribution of token m through head h is ``c[m, h] = a[h, m] W_o^h (W_v^h z_m + b_v^h)`` plus a share of
    b_o: ``b_o / (H T)`` (``"uniform"``, the paper's code) or ``a[h, m] b_o / H`` (``"attention"``). With
    ``sink="interpolate"`` the sink cell gets ``(c[W] + c[N] + c[NW]) / 3`` and then its cosine, where
    :func:`nha_plugin.pool_maps.head_maps` averages the neighbours' cosines; every other cell is the same as there.
    The vectors are built densely, ``heads_per_chunk`` heads at a time ((B, h*w, heads_per_chunk, D) at once), as the
    paper's code does (its T is the native grid's, which is the crop's at the paper's crop size).

    Args:
        spec: the model's attention pool.
        features: layer4 output F (B, C, h, w) of the crops.
        text: class directions (P, D) (cosines are taken, so they need not be unit norm).
        positional_embedding: (h*w + 1, C) for this grid; default: the spec's, interpolated to the grid.
        sink: "interpolate" | "keep" | "drop" (:data:`nha_plugin.pool_maps.SINK_MODES`), applied to the vectors.
        bias_share: "uniform" | "attention" (:data:`nha_plugin.pool_maps.BIAS_SHARES`).
        heads_per_chunk: heads whose vectors are held at once.

    Returns:
        (B, P, H, h, w) cosines (0 where a vector is zero, e.g. the sink cell under ``sink="drop"``).
    """
    check_sink(sink)
    if bias_share not in BIAS_SHARES:
        raise ValueError(f"bias_share must be one of {BIAS_SHARES}; got {bias_share!r}")
    H, (h, w) = spec.num_heads, features.shape[-2:]
    z = tokens(features, positional_embedding_for(spec, (h, w)) if positional_embedding is None
               else positional_embedding)
    attention = class_attention(spec, z)                                         # (B, H, T)
    av = value_tokens(spec, z, attention)[:, 1:]                                 # (B, hw, H, d): a[h,m] (W_v z + b_v)
    wo, _ = head_split(spec)                                                     # (D, H, d)
    unit = F.normalize(text.to(av), dim=-1)
    out, step = [], max(1, int(heads_per_chunk))
    for h0 in range(0, H, step):
        hs = slice(h0, h0 + step)
        c = torch.einsum("bmhj,Dhj->bmhD", av[:, :, hs], wo[:, hs])
        if bias_share == "uniform":
            c = c + spec.c_bias / (H * z.shape[1])
        else:
            c = c + rearrange(attention[:, hs, 1:], "b h m -> b m h 1") * (spec.c_bias / H)
        grid = apply_sink(rearrange(c, "b (i j) h D -> b h D i j", i=h, j=w), sink)
        out.append(torch.einsum("bhDij,pD->bphij", F.normalize(grid, dim=2), unit))
    return torch.cat(out, dim=2)


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
                bias_share: str = "attention", sink_space: str = "maps") -> Dict[str, Tensor]:
    """Grid-level class logits of every requested method for a batch of crops.

    Args:
        spec: the attention pool.
        features: layer4 output (B, C, h, w) of the crops.
        text: class directions (P, D).
        methods: names from :data:`METHODS`.
        mask: (P, H, C) top-pair indicator (needed by "nad" and "neurons"); k: its divisor.
        sink: sink handling of the NAD maps ("interpolate" | "keep" | "drop").
        bias_share: how the head maps share b_o ("attention" | "uniform"; see
            :func:`nha_plugin.pool_maps.head_maps`).
        sink_space: "maps" (:func:`nha_plugin.pool_maps.head_maps`: the sink cell's cosines interpolated) or
            "contributions" (:func:`contribution_head_maps`: its contribution vectors, as the paper's code).

    Returns:
        ``{method: (B, P, h, w)}``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown segmentation method(s) {unknown}; choose from {list(METHODS)}")
    if sink_space not in SINK_SPACES:
        raise ValueError(f"sink_space must be one of {SINK_SPACES}; got {sink_space!r}")
    grid = tuple(features.shape[-2:])
    pos = positional_embedding_for(spec, grid)
    text = text.to(device=features.device, dtype=features.dtype)
    if mask is None and any(m in ("nad", "neurons") for m in methods):
        raise ValueError("methods 'nad' and 'neurons' need the top-pair mask (see top_pairs)")
    k = k if k is not None or mask is None else int(mask[0].sum().item())
    out: Dict[str, Tensor] = {}
    maps = head_maps if sink_space == "maps" else contribution_head_maps
    L = (maps(spec, features, text, positional_embedding=pos, sink=sink, bias_share=bias_share)
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
