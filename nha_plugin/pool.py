"""The attention-pool algebra of CLIP-ResNet on an :class:`AttentionPoolSpec`: the one home of the weights' head
split, tokens, class attention, pair directions, constant terms and target weights.

With F the layer4 output (B, C, h, w) and p the positional embedding (T, C), the tokens are
``z_0 = mean_t F_t + p_0`` and ``z_t = F_t + p_t``. For head h the class-token attention is
``a[h, t] = softmax_t(q_h(z_0) . k_h(z_t) / sqrt(d))`` and, because ``sum_t a[h, t] = 1``::

    y = beta + sum_{h,n} s[h,n] u[h,n]
    s[h,n] = sum_t a[h,t] z_t[n]          (B, H, C)  pair coefficients, the only image-dependent part
    u[h,n] = W_o^h W_v^h[:, n]            (H, C, D)  pair directions, fixed by the weights
    beta   = b_o + sum_h W_o^h b_v^h      (D,)       constant

Scores against a direction e never need u: ``g[h,n] = (W_o^h^T e) . W_v^h[:, n]`` (:func:`target_weights`); score
targets (one direction, a set, one per image) take one layout first (:func:`canonical_target`), shared with the
CLIP-ViT decomposition.
Per-token maps built on these (MaskCLIP, self-self, head maps, the attention sink) live in
:mod:`nha_plugin.pool_maps`; the decomposition object in :mod:`nha_plugin.decomposition`.

This module imports only torch and einops and knows nothing of open_clip.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .spec import AttentionPoolSpec

__all__ = [
    "head_split", "pair_directions", "neuron_contributions", "neuron_blocks", "head_outputs", "pool_output",
    "constant_term", "head_bias", "target_weights", "interpolate_positional_embedding", "positional_embedding_for",
    "tokens", "class_attention", "pair_coefficients", "value_tokens", "pair_norms", "check_pair_signs", "pc_sign",
    "working_dtype", "working_spec", "reference_pool_output", "canonical_target", "check_directions", "finish_scores",
]


def head_split(spec: AttentionPoolSpec) -> tuple[Tensor, Tensor]:
    """W_o per head (D, H, d) and W_v per head (H, d, C): views of the spec's weights."""
    H, d = spec.num_heads, spec.head_dim
    wo = rearrange(spec.c_weight, "D (h j) -> D h j", h=H, j=d)
    wv = rearrange(spec.v_weight, "(h j) n -> h j n", h=H, j=d)
    return wo, wv


def pair_directions(spec: AttentionPoolSpec, heads: Optional[slice] = None) -> Tensor:
    """u[h, n] = W_o^h W_v^h[:, n], shape (H, C, D). Large for big models (453 MB for RN50x16 in fp32);
    pass ``heads`` (a slice) to build a chunk."""
    wo, wv = head_split(spec)
    if heads is not None:
        wo, wv = wo[:, heads], wv[heads]
    return torch.einsum("Dhj,hjn->hnD", wo, wv)


def neuron_contributions(spec: AttentionPoolSpec, coeffs: Tensor, neurons: Optional[Tensor] = None) -> Tensor:
    """sum_h s[h,n] u[h,n] for coefficients (B, H, C): (B, C', D), C' = selected neurons (all by default)."""
    _, wv = head_split(spec)
    if neurons is not None:
        wv, coeffs = wv[..., neurons], coeffs[..., neurons]
    scaled = rearrange(wv[None] * coeffs[:, :, None, :], "b h j n -> b n (h j)")   # s[h,n] W_v^h[:, n]
    return scaled @ spec.c_weight.T


def neuron_blocks(spec: AttentionPoolSpec, neurons: slice, dtype: torch.dtype = torch.float64) -> Tensor:
    """``U_n = [u[0,n] ... u[H-1,n]]`` for a slice of neurons: (C', D, H), detached, in ``dtype``."""
    wo, wv = head_split(spec.detached())
    return torch.einsum("Dhj,hjn->nDh", wo.to(dtype), wv[..., neurons].to(dtype))


def head_outputs(spec: AttentionPoolSpec, coefficients: Tensor) -> Tensor:
    """Per-head output ``W_o^h W_v^h s_h`` (B, H, D) for any pair coefficients s (B, H, C), without bias.

    Linear in s, so it maps centred coefficients, deltas and means alike. Computed through W_v then W_o per
    head: the (H, C, D) direction table is never built. The weights are cast to the coefficients' dtype and
    device; autograd flows through them when the spec is not detached."""
    wo, wv = head_split(spec)
    wo, wv = wo.to(coefficients), wv.to(coefficients)
    return torch.einsum("Dhj,bhj->bhD", wo, torch.einsum("hjn,bhn->bhj", wv, coefficients))


def pool_output(spec: AttentionPoolSpec, coefficients: Tensor) -> Tensor:
    """The image embedding ``beta + sum_h W_o^h W_v^h s_h`` (B, D) from pair coefficients (B, H, C): what the
    model's attention pool returns for the coefficients it computed, and an ablated embedding for edited ones."""
    return constant_term(spec).to(coefficients) + head_outputs(spec, coefficients).sum(dim=1)


def constant_term(spec: AttentionPoolSpec) -> Tensor:
    """beta = b_o + sum_h W_o^h b_v^h = c_proj(b_v), shape (D,)."""
    return spec.c_bias + spec.c_weight @ spec.v_bias


def head_bias(spec: AttentionPoolSpec) -> Tensor:
    """W_o^h b_v^h per head, shape (H, D)."""
    wo, _ = head_split(spec)
    bv = rearrange(spec.v_bias, "(h j) -> h j", h=spec.num_heads)
    return torch.einsum("Dhj,hj->hD", wo, bv)


def target_weights(spec: AttentionPoolSpec, directions: Tensor) -> Tensor:
    """g[..., h, n, k] = (W_o^h^T e_k) . W_v^h[:, n] for directions (..., D, K); returns (..., H, C, K).

    Costs O(H d (D + C) K): the (H, C, D) direction table is never built."""
    wo, wv = head_split(spec)
    r = torch.einsum("Dhj,...Dk->...hjk", wo, directions)
    return torch.einsum("...hjk,hjn->...hnk", r, wv)


def canonical_target(target: Tensor, D: int, B: int, dtype: torch.dtype, device: torch.device,
                     per_image: Optional[bool] = None) -> tuple[Tensor, str]:
    """Score targets in the one layout every score is computed in.

    Args:
        target: one direction (D,), a set of K directions (D, K), or one direction per image (B, D).
        D, B: the embedding width and the batch size.
        dtype, device: those of the decomposition (the target is cast to ``dtype``; it must be on ``device``).
        per_image: which reading of a 2-D target is meant; needed only when B == D makes it ambiguous.

    Returns:
        ``(directions (1 or B, D, K), kind)`` with kind ``'single'`` | ``'set'`` | ``'per_image'``.

    Raises:
        ValueError: for a wrong shape, or a direction that is zero or holds NaN/inf (:func:`check_directions`).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape (D,), (D, K) or (B, D); got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the decomposition is on {device}; move it with "
                         "target.to(...)")
    target = target.to(dtype)
    if target.dim() == 1:
        if target.shape[0] != D:
            raise ValueError(f"target direction has {target.shape[0]} entries; the embedding has D={D}")
        check_directions(target[None], "target")
        return target.view(1, D, 1), "single"
    if target.dim() != 2:
        raise ValueError(f"target must be (D,), (D, K) or (B, D) with D={D}, B={B}; got {tuple(target.shape)}")
    as_set, as_per_image = target.shape[0] == D, tuple(target.shape) == (B, D)
    if per_image is None:
        if as_set and as_per_image:
            raise ValueError(f"target of shape {tuple(target.shape)} is ambiguous (B == D == {D}): pass "
                             "per_image=True or per_image=False")
        per_image = as_per_image
    if per_image:
        if not as_per_image:
            raise ValueError(f"per-image targets must be (B, D) = ({B}, {D}); got {tuple(target.shape)}")
        check_directions(target, "per-image target row")
        return target.unsqueeze(-1), "per_image"
    if not as_set:
        raise ValueError(f"target must be (D,), (D, K) or (B, D) with D={D}, B={B}; got {tuple(target.shape)}")
    check_directions(target.T, "target column")
    return target.unsqueeze(0), "set"


def check_directions(vectors: Tensor, what: str) -> None:
    """Refuse directions that hold NaN/inf or are zero: a score against them is NaN or meaningless (and a cosine
    divides by their norm).

    Args:
        vectors: (N, D), one direction per row.
        what: how to name row i in the message, e.g. ``"target column"`` -> "target column 3 is zero".
    """
    finite = torch.isfinite(vectors).all(dim=-1)
    zero = finite & (vectors == 0).all(dim=-1)
    for bad, why in ((~finite, "holds NaN or inf"), (zero, "is zero")):
        idx = bad.nonzero().flatten().tolist()
        if idx:
            name = what if vectors.shape[0] == 1 and what == "target" else f"{what} {idx[0]}"
            more = f" (and {len(idx) - 1} more: {idx[1:6]})" if len(idx) > 1 else ""
            raise ValueError(f"{name} {why}{more}: a score against it is undefined. Give finite, non-zero "
                             "directions (drop or replace that one)")


def finish_scores(x: Tensor, kind: str, scale: Optional[Tensor]) -> Tensor:
    """Scores (B, K, ...) in the caller's layout: divided by the cosine divisor ``scale`` (B, K) when given, and
    without the K axis unless the target was a set (``kind`` from :func:`canonical_target`)."""
    if scale is not None:
        x = x / scale.view(*scale.shape, *([1] * (x.dim() - 2)))
    return x if kind == "set" else x[:, 0]


def interpolate_positional_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a (1 + g*g, C) positional embedding to ``grid`` (bicubic over the grid, row 0 kept)."""
    g = round((pos.shape[0] - 1) ** 0.5)
    if (g, g) == tuple(grid):
        return pos
    spatial = rearrange(pos[1:], "(a b) c -> 1 c a b", a=g, b=g)
    work = spatial if spatial.dtype == torch.float64 else spatial.float()
    # antialias as timm does (it only matters when shrinking the grid)
    spatial = F.interpolate(work, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True).to(pos.dtype)
    return torch.cat([pos[:1], rearrange(spatial, "1 c a b -> (a b) c")], dim=0)


def positional_embedding_for(spec: AttentionPoolSpec, grid: tuple[int, int]) -> Tensor:
    """The spec's positional embedding (h*w + 1, C) for a layer4 grid (h, w): itself at the native grid,
    interpolated otherwise (:func:`interpolate_positional_embedding`)."""
    return interpolate_positional_embedding(spec.positional_embedding, tuple(grid))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the decomposition's own maths runs in for a model in ``dtype``: float64 stays float64, anything
    narrower than float32 (bfloat16, float16) is lifted to float32.

    Low-precision numbers are exact in float32, so the decomposition of bf16/fp16 layer4 features is then exact
    up to float32 rounding (~1e-7 relative); what remains of a completeness error or convergence delta is the
    model's own low-precision forward, which they measure against."""
    return torch.promote_types(dtype, torch.float32)


def working_spec(spec: AttentionPoolSpec) -> AttentionPoolSpec:
    """The spec with its pool weights in :func:`working_dtype` (the spec itself when that is its dtype). The
    trunk, the model's own pool and every module stay as they are: the caller's model is not touched."""
    dtype = working_dtype(spec.dtype)
    if dtype == spec.dtype:
        return spec
    return replace(spec, **{n: getattr(spec, n).to(dtype) for n in spec.WEIGHT_NAMES})


def reference_pool_output(spec: AttentionPoolSpec, features: Tensor, positional_embedding: Tensor) -> Tensor:
    """The attention pool's output (B, D) computed by torch's own multi-head attention from the pool's parameters:
    an independent reference where the model's own pool cannot run (another grid on open_clip / OpenAI pools,
    a spec without a pool).

    The tokens are built here with plain torch operations (not :func:`tokens`) and the attention is
    ``F.multi_head_attention_forward`` with the mean token as the only query, as CLIP's ``AttentionPool2d`` does;
    nothing of this module's algebra is reused, so a fault in it shows as a completeness error.

    Args:
        spec: the attention pool; its weights set the dtype the reference runs in (the model's, for a spec read
            from the model).
        features: layer4 output (B, C, h, w).
        positional_embedding: (h*w + 1, C) for this grid (:func:`positional_embedding_for`).

    Returns:
        (B, D) in the spec's dtype.
    """
    dtype = spec.dtype
    x = features.to(dtype).flatten(2).permute(2, 0, 1)                            # (hw, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + positional_embedding.to(dtype)[:, None, :]
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=spec.num_heads,
        in_proj_weight=None, in_proj_bias=torch.cat([spec.q_bias, spec.k_bias, spec.v_bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=spec.c_weight, out_proj_bias=spec.c_bias, use_separate_proj_weight=True,
        q_proj_weight=spec.q_weight, k_proj_weight=spec.k_weight, v_proj_weight=spec.v_weight,
        training=False, need_weights=False)
    return out[0]


def tokens(features: Tensor, pos: Tensor) -> Tensor:
    """z (B, T, C): mean token then the h*w spatial tokens, plus the positional embedding."""
    flat = rearrange(features, "b c h w -> b (h w) c")
    return torch.cat([flat.mean(dim=1, keepdim=True), flat], dim=1) + pos.to(features.dtype)


def class_attention(spec: AttentionPoolSpec, tokens: Tensor) -> Tensor:
    """a (B, H, T): the class token's attention over all tokens, per head."""
    H, d = spec.num_heads, spec.head_dim
    q = tokens[:, 0] @ spec.q_weight.T + spec.q_bias                      # (B, C)
    k = tokens @ spec.k_weight.T + spec.k_bias                            # (B, T, C)
    logits = torch.einsum("bhj,bthj->bht", q.view(-1, H, d), k.view(k.shape[0], k.shape[1], H, d))
    return torch.softmax(logits / math.sqrt(d), dim=-1)


def pair_coefficients(attention: Tensor, z: Tensor) -> Tensor:
    """s[h, n] = sum_t a[h, t] z_t[n]: pair coefficients (B, H, C) from class attention (B, H, T) and tokens
    (B, T, C)."""
    return torch.einsum("bht,btn->bhn", attention, z)


def value_tokens(spec: AttentionPoolSpec, z: Tensor, attention: Optional[Tensor] = None) -> Tensor:
    """Per-head values ``W_v^h z_t + b_v^h`` of tokens z (B, T, C), as (B, T, H, d); times ``a[h, t]`` when the
    class attention (B, H, T) is given (then the tokens' values sum to each head's output before W_o)."""
    v = rearrange(z @ spec.v_weight.T + spec.v_bias, "b t (h j) -> b t h j", h=spec.num_heads)
    return v if attention is None else v * rearrange(attention, "b h t -> b t h 1")


def pc_sign(projections: Tensor, dim: int = -1) -> Tensor:
    """The NAD paper's sign rule for a principal component: +1 when more than half of the k samples (the top-k
    by centred norm) project positively onto it, else -1, along ``dim`` (the k axis); returns int64 +-1.

    The paper's code takes the SVD's first right singular vector v and flips it unless more than k/2 of the top
    k project positively onto v. Applied to v = +u (the orientation this package reports), that is this rule. At
    an exact tie (k/2 positive, k even) the paper's result depends on the sign its SVD happened to return; this
    rule resolves the tie to -1, the paper's outcome when its SVD returns +u. A projection of exactly 0 does not
    count as positive."""
    k = projections.shape[dim]
    return torch.where(2 * (projections > 0).sum(dim) > k, 1, -1)


def pair_norms(spec: AttentionPoolSpec) -> Tensor:
    """||u[h, n]||, (H, C), built one head at a time so the (H, C, D) table is never held."""
    return torch.stack([pair_directions(spec, heads=slice(h, h + 1))[0].norm(dim=-1) for h in range(spec.num_heads)])


def check_pair_signs(pair_signs: Optional[Tensor], spec: AttentionPoolSpec) -> Tensor:
    """PC0 signs (H, C) of +-1 in the spec's dtype and device (+1 everywhere when None); refuses another shape
    or other values with a message that says where signs come from."""
    shape = (spec.num_heads, spec.num_neurons)
    if pair_signs is None:
        return torch.ones(shape, dtype=spec.dtype, device=spec.device)
    signs = torch.as_tensor(pair_signs)
    if tuple(signs.shape) != shape:
        raise ValueError(f"pair_signs must be (H, C) = {shape}; got {tuple(signs.shape)}. Use "
                         "nha_plugin.stats.DatasetStats.load(path).pc0_sign or shift.pc0_signs(coefficients)")
    if not bool(((signs == 1) | (signs == -1)).all()):                      # NaN fails this too
        raise ValueError("pair_signs must hold only +1 and -1 (the PC0 sign of each pair)")
    return signs.to(device=spec.device, dtype=spec.dtype)
