"""The exact neuron x head decomposition of CLIP-ResNet's attention pool.

With F the layer4 output (B, C, h, w) and p the positional embedding (T, C), the tokens are
``z_0 = mean_t F_t + p_0`` and ``z_t = F_t + p_t``. For head h the class-token attention is
``a[h, t] = softmax_t(q_h(z_0) . k_h(z_t) / sqrt(d))`` and, because ``sum_t a[h, t] = 1``::

    y = beta + sum_{h,n} s[h,n] u[h,n]
    s[h,n] = sum_t a[h,t] z_t[n]          (B, H, C)  pair coefficients, the only image-dependent part
    u[h,n] = W_o^h W_v^h[:, n]            (H, C, D)  pair directions, fixed by the weights
    beta   = b_o + sum_h W_o^h b_v^h      (D,)       constant

Scores against a target direction e never need u: ``g[h,n] = (W_o^h^T e) . W_v^h[:, n]`` and the pair
score is ``s * g``. Every reported component (pairs, heads, neurons, tokens, spatial cells, positional,
bias, attention-sink residual) sums back to ``y . e`` exactly; :meth:`Contributions.completeness_error`
measures it against the model's own attention pool.

The algebra (tokens, attention, directions, target weights) is :mod:`nha_plugin.pool`; per-token maps and the
attention sink are :mod:`nha_plugin.pool_maps`. This module imports only torch and einops, and knows nothing of
open_clip.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor

from .pool import (class_attention, constant_term, head_bias, head_outputs, neuron_contributions, pair_directions,
                   positional_embedding_for, target_weights, tokens)
from .pool_maps import check_sink, sink_value
from .spec import AttentionPoolSpec

__all__ = ["Contributions", "decompose_features", "canonical_target", "LEVELS", "BIAS_MODES"]

LEVELS = ("pair", "head", "neuron", "token", "spatial")
BIAS_MODES = ("own", "split")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def decompose_features(spec: AttentionPoolSpec, features: Tensor, *, sink: str = "keep",
                       bias: str = "own") -> "Contributions":
    """Decompose layer4 features (B, C, h, w) through the attention pool of ``spec``."""
    check_sink(sink)
    _check_choice("bias", bias, BIAS_MODES)
    if features.dim() != 4 or features.shape[1] != spec.num_neurons:
        raise ValueError(f"expected layer4 features (B, {spec.num_neurons}, h, w); got {tuple(features.shape)}")
    h, w = features.shape[-2:]
    pos = spec.positional_embedding
    if (h, w) != (spec.grid_size, spec.grid_size):
        warnings.warn(
            f"feature grid {h}x{w} differs from the model's native {spec.grid_size}x{spec.grid_size}: "
            "the attention pool's positional embedding is interpolated (bicubic, class row kept)",
            stacklevel=3)
        pos = positional_embedding_for(spec, (h, w))
    z = tokens(features, pos)
    attn = class_attention(spec, z)
    coeffs = torch.einsum("bht,btn->bhn", attn, z)
    return Contributions(spec=spec, features=features, positional_embedding=pos, attention=attn,
                         pair_coefficients=coeffs, sink=sink, bias=bias)


def canonical_target(target: Tensor, D: int, B: int, dtype: torch.dtype, device: torch.device,
                     per_image: Optional[bool] = None) -> tuple[Tensor, str]:
    """Directions as (1 or B, D, K) and their kind ('single' (D,) | 'set' (D, K) | 'per_image' (B, D))."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape (D,), (D, K) or (B, D); got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the decomposition is on {device}; move it with "
                         "target.to(...)")
    target = target.to(dtype)
    if target.dim() == 1:
        if target.shape[0] != D:
            raise ValueError(f"target direction has {target.shape[0]} entries; the embedding has D={D}")
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
        return target.unsqueeze(-1), "per_image"
    if not as_set:
        raise ValueError(f"target must be (D,), (D, K) or (B, D) with D={D}, B={B}; got {tuple(target.shape)}")
    return target.unsqueeze(0), "set"


class Contributions:
    """The decomposition of a batch of images.

    Attributes:
        pair_coefficients: s, (B, H, C).
        attention: class-token attention a, (B, H, T); token 0 is the mean token.
        features: layer4 output F, (B, C, h, w).
        embedding: the image embedding rebuilt from the decomposition, (B, D); equals the model's
            ``encode_image`` (unnormalised) to float precision.
        constant: beta, (D,).

    Scores accept a ``target`` of shape (D,) (one direction), (D, K) (K directions) or (B, D) (one direction
    per image); pass ``per_image`` when a 2-D target is ambiguous. With ``normalize=True`` scores are
    divided by ||y|| ||e||, so they add up to the cosine similarity.
    """

    def __init__(self, spec: AttentionPoolSpec, features: Tensor, positional_embedding: Tensor,
                 attention: Tensor, pair_coefficients: Tensor, sink: str = "keep", bias: str = "own"):
        self.spec = spec
        self.features = features
        self.positional_embedding = positional_embedding
        self.attention = attention
        self.pair_coefficients = pair_coefficients
        self.sink = sink
        self.bias = bias
        self._embedding: Optional[Tensor] = None
        self._model_embedding: Optional[Tensor] = None

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.pair_coefficients.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[-2:])

    @property
    def constant(self) -> Tensor:
        return constant_term(self.spec)

    @property
    def embedding(self) -> Tensor:
        """y = beta + sum_h W_o^h W_v^h s_h, (B, D)."""
        if self._embedding is None:
            self._embedding = self.head_contributions().sum(dim=1) + self.constant
        return self._embedding

    @property
    def has_model_reference(self) -> bool:
        """Whether the model's own pool can run on these features (a pool exists and takes this grid)."""
        native = self.grid == (self.spec.grid_size, self.spec.grid_size)
        return self.spec.pool is not None and (native or self.spec.pool_resizes)

    @property
    def model_embedding(self) -> Tensor:
        """The unmodified model's attention-pool output on the same features, (B, D)."""
        if not self.has_model_reference:
            raise RuntimeError("the model's own attention pool cannot run here (no pool in the spec, or it does "
                               f"not accept the {self.grid} grid); compare with .embedding instead")
        if self._model_embedding is None:
            with torch.no_grad():
                self._model_embedding = self.spec.pool(self.features)
        return self._model_embedding

    def _reference_embedding(self) -> Tensor:
        return self.model_embedding if self.has_model_reference else self.embedding

    def pair_contributions(self, heads: Optional[slice] = None) -> Tensor:
        """Dense contributions s[h,n] u[h,n], (B, H, C, D). For small models and tests only."""
        u = pair_directions(self.spec, heads)
        s = self.pair_coefficients if heads is None else self.pair_coefficients[:, heads]
        return s[..., None] * u

    def head_contributions(self) -> Tensor:
        """Per-head output W_o^h W_v^h s_h, (B, H, D), without bias."""
        return head_outputs(self.spec, self.pair_coefficients)

    def neuron_contributions(self, neurons: Optional[Tensor] = None) -> Tensor:
        """Per-neuron output sum_h s[h,n] u[h,n], (B, C', D) for the selected neurons (all by default)."""
        return neuron_contributions(self.spec, self.pair_coefficients, neurons)

    # ---- targets ------------------------------------------------------------------------------------
    def _canonical_target(self, target: Tensor, per_image: Optional[bool]) -> tuple[Tensor, str]:
        s = self.pair_coefficients
        return canonical_target(target, self.spec.output_dim, self.batch_size, s.dtype, s.device, per_image)

    def _scale(self, e: Tensor, normalize: bool) -> Optional[Tensor]:
        """(B, K) divisor that turns dot products into cosines, or None."""
        if not normalize:
            return None
        return self.embedding.norm(dim=-1)[:, None] * e.norm(dim=1)

    @staticmethod
    def _finish(x: Tensor, kind: str, scale: Optional[Tensor]) -> Tensor:
        """x has K as its second axis: (B, K, ...). Divide by scale and drop K for single targets."""
        if scale is not None:
            x = x / scale.view(*scale.shape, *([1] * (x.dim() - 2)))
        return x if kind == "set" else x[:, 0]

    def _bias_parts(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """(head bias W_o^h b_v^h . e  (Bg, H, K), output bias b_o . e  (Bg, K))."""
        hb = torch.einsum("hD,bDk->bhk", head_bias(self.spec), e)
        ob = torch.einsum("D,bDk->bk", self.spec.c_bias, e)
        return hb, ob

    # ---- scores -------------------------------------------------------------------------------------
    def scores(self, target: Tensor, level: str = "pair", normalize: bool = False,
               per_image: Optional[bool] = None) -> Tensor:
        """Additive scores of the image embedding against ``target`` at one granularity.

        Shapes for one direction (a set of K directions inserts K after B):
        pair (B, H, C); head (B, H); neuron (B, C); token (B, T); spatial (B, h, w).

        Completeness: ``scores(...).sum() + bias_score + positional_score (token/spatial: positional is
        inside the token scores) + sink_score`` equals ``y . e`` (or the cosine when normalised).
        """
        _check_choice("level", level, LEVELS)
        e, kind = self._canonical_target(target, per_image)
        g = target_weights(self.spec, e)                                   # (Bg, H, C, K)
        s = self.pair_coefficients
        if level in ("pair", "head", "neuron"):
            if level == "pair":
                out = torch.einsum("bhn,bhnk->bkhn", s, g.expand(s.shape[0], -1, -1, -1))
            elif level == "head":
                out = torch.einsum("bhn,bhnk->bkh", s, g.expand(s.shape[0], -1, -1, -1))
            else:
                out = torch.einsum("bhn,bhnk->bkn", s, g.expand(s.shape[0], -1, -1, -1))
            if self.bias == "split":
                out = out + self._split_bias(e, level, out.shape)
        elif level == "token":
            out = self._token_scores(g)
            out = self._apply_sink(out, token_axis_offset=1)
            if self.bias == "split":
                out = out + self._bias_total(e)[..., None] / out.shape[-1]
        else:
            out = self._spatial_scores(g)
            out = self._apply_sink(out, token_axis_offset=0)
            if self.bias == "split":
                out = out + self._bias_total(e)[..., None] / out.shape[-1]
            out = out.view(*out.shape[:2], *self.grid)
        return self._finish(out, kind, self._scale(e, normalize))

    def _split_bias(self, e: Tensor, level: str, shape: torch.Size) -> Tensor:
        """The paper's convention: b_v spread evenly over the C neurons, b_o over all H*C pairs."""
        hb, ob = self._bias_parts(e)                                       # (Bg, H, K), (Bg, K)
        H, C = self.spec.num_heads, self.spec.num_neurons
        pair = rearrange(hb, "b h k -> b k h 1") / C + ob[:, :, None, None] / (H * C)
        if level == "pair":
            return pair.expand(shape[0], -1, -1, C)
        if level == "head":
            return pair[..., 0] * C
        return pair.sum(dim=2).expand(shape[0], -1, C)

    def _bias_total(self, e: Tensor) -> Tensor:
        """beta . e, (Bg, K)."""
        return torch.einsum("D,bDk->bk", self.constant, e)

    def _token_scores(self, g: Tensor) -> Tensor:
        """(B, K, T): sum_h a[h,t] z_t . g_h, with the mean token's spatial part left at token 0."""
        z = tokens(self.features, self.positional_embedding)
        zg = torch.einsum("btn,bhnk->bkth", z, g)
        return torch.einsum("bkth,bht->bkt", zg, self.attention)

    def _spatial_scores(self, g: Tensor) -> Tensor:
        """(B, K, h*w): spatial share of each cell, the mean token's spatial part spread 1/hw per cell."""
        flat = rearrange(self.features, "b c h w -> b (h w) c")
        fg = torch.einsum("btn,bhnk->bkth", flat, g)
        a = self.attention
        weight = a[:, :, 1:] + a[:, :, :1] / flat.shape[1]                 # (B, H, hw)
        return torch.einsum("bkth,bht->bkt", fg, weight)

    def _sink_replacement(self, scores: Tensor) -> Tensor:
        """Value the sink cell gets under the current mode (scores (..., n_cells) in grid order)."""
        return sink_value(scores.unflatten(-1, self.grid), self.sink)

    def _apply_sink(self, scores: Tensor, token_axis_offset: int) -> Tensor:
        """Replace the attention-sink cell (the last spatial token) per ``self.sink``; the removed part is
        reported by :meth:`sink_score`. ``token_axis_offset`` is 1 for token scores (class token first)."""
        if self.sink == "keep":
            return scores
        out = scores.clone()
        out[..., -1] = self._sink_replacement(scores[..., token_axis_offset:])
        return out

    def sink_score(self, target: Tensor, level: str = "spatial", normalize: bool = False,
                   per_image: Optional[bool] = None) -> Tensor:
        """What ``sink`` removed from the last spatial cell at ``level`` ('spatial' or 'token'); zero for keep.
        Shape (B,) for one direction, (B, K) for a set."""
        _check_choice("level", level, ("spatial", "token"))
        e, kind = self._canonical_target(target, per_image)
        if self.sink == "keep":
            out = torch.zeros(self.batch_size, e.shape[-1], dtype=e.dtype, device=e.device)
        else:
            g = target_weights(self.spec, e)
            raw = self._token_scores(g) if level == "token" else self._spatial_scores(g)
            spatial = raw[..., 1:] if level == "token" else raw
            out = raw[..., -1] - self._sink_replacement(spatial)
        return self._finish(out, kind, self._scale(e, normalize))

    def bias_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """beta . e when ``bias='own'`` (its own term); zero under ``bias='split'``. (B,) or (B, K)."""
        e, kind = self._canonical_target(target, per_image)
        out = self._bias_total(e).expand(self.batch_size, -1)
        if self.bias == "split":
            out = torch.zeros_like(out)
        return self._finish(out, kind, self._scale(e, normalize))

    def positional_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """sum_h sum_t a[h,t] p_t . g_h: the positional embedding's share, (B,) or (B, K). Part of the
        pair/head/neuron/token scores; separate from (and completing) the spatial map."""
        e, kind = self._canonical_target(target, per_image)
        g = target_weights(self.spec, e)
        pg = torch.einsum("tn,bhnk->bkth", self.positional_embedding.to(g.dtype), g)
        out = torch.einsum("bkth,bht->bk", pg.expand(self.batch_size, -1, -1, -1), self.attention)
        return self._finish(out, kind, self._scale(e, normalize))

    def total_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """y . e from the unmodified model's attention pool when it can run (else the rebuilt embedding)."""
        e, kind = self._canonical_target(target, per_image)
        y = self._reference_embedding()
        out = torch.einsum("bD,bDk->bk", y.to(e.dtype), e.expand(self.batch_size, -1, -1))
        return self._finish(out, kind, self._scale(e, normalize))

    def completeness_error(self, target: Optional[Tensor] = None, level: str = "pair",
                           per_image: Optional[bool] = None) -> Tensor:
        """Relative residual between the sum of components at ``level`` and the model's own output.

        Without a target: ||beta + sum s u - y|| / ||y||, shape (B,). With a target: |sum of the level's
        scores + the terms reported beside them - y . e| / (||y|| ||e||), shape (B,) or (B, K).
        """
        y = self._reference_embedding()
        if target is None:
            return (self.embedding - y).norm(dim=-1) / y.norm(dim=-1)
        parts = self.scores(target, level=level, per_image=per_image)
        e, kind = self._canonical_target(target, per_image)
        keep = 1 if kind == "set" else 0
        total = parts.flatten(start_dim=1 + keep).sum(dim=-1)
        total = total + self.bias_score(target, per_image=per_image)
        if level == "spatial":
            total = total + self.positional_score(target, per_image=per_image)
        if level in ("spatial", "token"):
            total = total + self.sink_score(target, level=level, per_image=per_image)
        ref = self.total_score(target, per_image=per_image)
        return (total - ref).abs() / self._finish(self._scale(e, True), kind, None)
