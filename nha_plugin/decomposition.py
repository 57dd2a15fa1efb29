"""The exact neuron x head decomposition of CLIP-ResNet's attention pool, as one object per batch.

:class:`Contributions` holds the pair coefficients s (B, H, C) and the class attention of a batch; the identity
``y = beta + sum_{h,n} s[h,n] u[h,n]`` it rests on, and the algebra behind it, are in :mod:`nha_plugin.pool`.

Scores against a target direction e never need u: ``g[h,n] = (W_o^h^T e) . W_v^h[:, n]`` and the pair
score is ``s * g``. Every reported component (pairs, heads, neurons, tokens, spatial cells, positional,
bias, attention-sink residual) sums back to ``y . e`` exactly; :meth:`Contributions.completeness_error`
measures it against the model's own attention pool (or, where that cannot run, against torch's own multi-head
attention run from the pool's parameters: :func:`nha_plugin.pool.reference_pool_output`).

Precision: the decomposition's own maths (tokens, attention, pair coefficients, scores, maps) runs in float64 for
a float64 model and in float32 otherwise (:func:`nha_plugin.pool.working_dtype`), from the layer4 features the
trunk computed in the model's dtype; the model is not modified. Against the model's own output the relative
completeness error is then ~1e-16 (fp64), ~1e-7 (fp32), and for bf16 / fp16 models the model's own rounding of
its pool, bounded by the dtype's machine epsilon (bf16 7.8e-3, fp16 9.8e-4; tested in test_decomposition.py).
The ``stack_*_contributions`` methods give heads, neurons and pairs as labelled stacks with the component axis first, as TransformerLens's ``ActivationCache`` does.

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

from .pool import (canonical_target, class_attention, constant_term, finish_scores, head_bias, head_outputs,
                   head_split, neuron_contributions, pair_coefficients, pair_directions, positional_embedding_for,
                   reference_pool_output, target_weights, tokens, working_spec)
from .pool_maps import apply_sink, check_sink
from .spec import AttentionPoolSpec

__all__ = ["Contributions", "decompose_features", "check_bias", "LEVELS", "BIAS_MODES"]

LEVELS = ("pair", "head", "neuron", "token", "spatial")
BIAS_MODES = ("own", "split")
# s (B, H, C) against target weights g (B, H, C, K), summed to each level's components
_COEFFICIENT_SUMS = {"pair": "bhn,bhnk->bkhn", "head": "bhn,bhnk->bkh", "neuron": "bhn,bhnk->bkn"}


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_bias(bias: str) -> None:
    """Refuse a bias mode outside :data:`BIAS_MODES` with a message that lists them."""
    _check_choice("bias", bias, BIAS_MODES)


def decompose_features(spec: AttentionPoolSpec, features: Tensor, *, sink: str = "keep",
                       bias: str = "own") -> "Contributions":
    """Decompose layer4 features through the attention pool of ``spec``.

    Args:
        spec: the model's attention pool.
        features: layer4 output F (B, C, h, w) in the model's dtype; another grid than the native one
            interpolates the positional embedding (with a warning).
        sink, bias: see :data:`nha_plugin.pool_maps.SINK_MODES` and :data:`BIAS_MODES`.

    Returns:
        :class:`Contributions` holding the attention (B, H, T) and the pair coefficients (B, H, C), computed in
        :func:`nha_plugin.pool.working_dtype` (float32 for bf16 / fp16 features, which float32 holds exactly).
    """
    check_sink(sink)
    check_bias(bias)
    if features.dim() != 4 or features.shape[1] != spec.num_neurons:
        raise ValueError(f"expected layer4 features (B, {spec.num_neurons}, h, w); got {tuple(features.shape)}")
    h, w = features.shape[-2:]
    model_spec, spec = spec, working_spec(spec)
    features = features.to(spec.dtype)
    pos = spec.positional_embedding
    if (h, w) != (spec.grid_size, spec.grid_size):
        warnings.warn(
            f"feature grid {h}x{w} differs from the model's native {spec.grid_size}x{spec.grid_size}: "
            "the attention pool's positional embedding is interpolated (bicubic, class row kept)",
            stacklevel=3)
        pos = positional_embedding_for(spec, (h, w))
    z = tokens(features, pos)
    attn = class_attention(spec, z)
    coeffs = pair_coefficients(attn, z)
    return Contributions(spec=model_spec, features=features, positional_embedding=pos, attention=attn,
                         pair_coefficients=coeffs, sink=sink, bias=bias)


def _head_bias_shares(spec: AttentionPoolSpec) -> Tensor:
    """The paper's split of beta over heads, (H, D): head h takes W_o^h b_v^h and b_o / H; each of its C pairs a
    C-th of that (so b_v^h is spread evenly over the neurons and b_o over all H*C pairs)."""
    return head_bias(spec) + spec.c_bias / spec.num_heads


def _selection(chosen, size: int, name: str) -> Tensor:
    """(n,) long indices of the chosen components, all ``size`` of them when None; refuses any out of range."""
    if chosen is None:
        return torch.arange(size)
    idx = torch.as_tensor(chosen, dtype=torch.long).flatten().cpu()
    bad = idx[(idx < 0) | (idx >= size)]
    if bad.numel():
        raise ValueError(f"{name} must be indices in 0..{size - 1} (the model has {size}); got {bad.tolist()}")
    return idx


class Contributions:
    """The decomposition of a batch of images.

    Args:
        spec: the model's attention pool (in the model's dtype; :attr:`spec` holds it in the working dtype).
        features, positional_embedding, attention, pair_coefficients: F (B, C, h, w), p (T, C), a (B, H, T),
            s (B, H, C); cast to :func:`nha_plugin.pool.working_dtype` of the spec's dtype.
        sink, bias: see :data:`nha_plugin.pool_maps.SINK_MODES` and :data:`BIAS_MODES`.

    Attributes:
        spec: the attention pool with its weights in the working dtype (float32 for a bf16 / fp16 model).
        model_spec: the spec as given (the model's dtype; its ``pool`` is the model's own).
        pair_coefficients: s, (B, H, C).
        attention: class-token attention a, (B, H, T); token 0 is the mean token.
        features: layer4 output F, (B, C, h, w).
        embedding: the image embedding rebuilt from the decomposition, (B, D); equals the model's
            ``encode_image`` (unnormalised) to float precision.
        constant: beta, (D,).

    Scores accept a ``target`` of shape (D,) (one direction), (D, K) (K directions) or (B, D) (one direction
    per image); pass ``per_image`` when a 2-D target is ambiguous. With ``normalize=True`` scores are
    divided by ||y|| ||e||, so they add up to the cosine similarity.

    Stacks (:meth:`stack_head_contributions`, :meth:`stack_neuron_contributions`,
    :meth:`stack_pair_contributions`) put the component axis first, as TransformerLens does, with labels
    ``'H3'``, ``'N17'``, ``'H3N17'``: vectors (P, B, D) without a target, the level's scores (P, B) or (P, B, K)
    with one. Like the scores they take the bias per ``bias``: under ``'own'`` they sum to the embedding minus
    :attr:`constant` (to ``y . e`` minus :meth:`bias_score`), under ``'split'`` to the embedding itself.
    """

    def __init__(self, spec: AttentionPoolSpec, features: Tensor, positional_embedding: Tensor,
                 attention: Tensor, pair_coefficients: Tensor, sink: str = "keep", bias: str = "own"):
        self.model_spec, self.spec = spec, working_spec(spec)
        dtype = self.spec.dtype
        self.features = features.to(dtype)
        self.positional_embedding = positional_embedding.to(dtype)
        self.attention = attention.to(dtype)
        self.pair_coefficients = pair_coefficients.to(dtype)
        self.sink = sink
        self.bias = bias
        self._embedding: Optional[Tensor] = None
        self._reference: Optional[Tensor] = None

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
        """The unmodified model's attention-pool output on the same features, (B, D), in the model's dtype."""
        if not self.has_model_reference:
            raise RuntimeError("the model's own attention pool cannot run here (no pool in the spec, or it does "
                               f"not accept the {self.grid} grid); use .reference_embedding (torch's own multi-head "
                               "attention run from the pool's parameters) instead")
        return self.reference_embedding

    @property
    def reference_embedding(self) -> Tensor:
        """What completeness is measured against, (B, D), independent of this module's maths: the model's own pool
        on the same features where it can run (:attr:`has_model_reference`), else torch's own multi-head attention
        run from the pool's parameters with the positional embedding at this grid
        (:func:`nha_plugin.pool.reference_pool_output`). Both run in the model's dtype, as the model would."""
        if self._reference is None:
            model_dtype = self.model_spec.dtype
            with torch.no_grad():
                if self.has_model_reference:
                    ref = self.model_spec.pool(self.features.to(model_dtype))
                else:
                    ref = reference_pool_output(self.model_spec.detached(), self.features, self.positional_embedding)
            self._reference = ref.detach()
        return self._reference

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

    def _bias_total(self, e: Tensor) -> Tensor:
        """beta . e, (Bg, K)."""
        return torch.einsum("D,bDk->bk", self.constant, e)

    # ---- scores -------------------------------------------------------------------------------------
    def scores(self, target: Tensor, level: str = "pair", normalize: bool = False,
               per_image: Optional[bool] = None) -> Tensor:
        """Additive scores of the image embedding against ``target`` at one granularity.

        Shapes for one direction (a set of K directions inserts K after B):
        pair (B, H, C); head (B, H); neuron (B, C); token (B, T); spatial (B, h, w).

        Completeness: ``scores(...).sum() + rest_score(target, level)`` equals ``y . e`` (or the cosine when
        normalised); the rest is ``bias_score + positional_score (spatial only: positional is inside the other
        levels' scores) + sink_score (token/spatial)``.
        """
        _check_choice("level", level, LEVELS)
        e, kind = self._canonical_target(target, per_image)
        return finish_scores(self._parts(e, level, with_rest=False)[0], kind, self._scale(e, normalize))

    def rest_score(self, target: Tensor, level: str = "spatial", normalize: bool = False,
                   per_image: Optional[bool] = None) -> Tensor:
        """What the scores at ``level`` leave out of ``y . e``, (B,) or (B, K): :meth:`bias_score`, plus
        :meth:`positional_score` at spatial level, plus :meth:`sink_score` at token and spatial levels."""
        return self.scores_and_rest(target, level, normalize, per_image)[1]

    def scores_and_rest(self, target: Tensor, level: str = "pair", normalize: bool = False,
                        per_image: Optional[bool] = None) -> tuple[Tensor, Tensor]:
        """``(scores(...), rest_score(...))`` computed in one pass (the two share the target weights and maps)."""
        _check_choice("level", level, LEVELS)
        e, kind = self._canonical_target(target, per_image)
        out, rest = self._parts(e, level, with_rest=True)
        scale = self._scale(e, normalize)
        return finish_scores(out, kind, scale), finish_scores(rest, kind, scale)

    def _parts(self, e: Tensor, level: str, with_rest: bool) -> tuple[Tensor, Optional[Tensor]]:
        """(scores (B, K, ...) at ``level``, the terms beside them (B, K) or None unless ``with_rest``) for
        canonical directions e (Bg, D, K). The spatial rest holds the positional term, which costs as much as the
        map itself: scores alone skip it."""
        g = target_weights(self.spec, e)                                   # (Bg, H, C, K)
        beta = self._bias_total(e).expand(self.batch_size, -1)            # (B, K)
        split = self.bias == "split"
        if level in _COEFFICIENT_SUMS:
            out = torch.einsum(_COEFFICIENT_SUMS[level], self.pair_coefficients, g.expand(self.batch_size, -1, -1, -1))
            out, rest = (out + self._split_bias(e, level), torch.zeros_like(beta)) if split else (out, beta)
        else:
            out, rest = self._sunk(self._map(e, g, level), level)          # token (B, K, T) | spatial (B, K, h, w)
            rest = rest if split else rest + beta
        if not with_rest:
            return out, None
        return out, (rest + self._positional(e, g) if level == "spatial" else rest)

    def _split_bias(self, e: Tensor, level: str) -> Tensor:
        """Each pair, head or neuron's share of beta . e under ``bias='split'``, broadcastable to its scores."""
        head = torch.einsum("hD,bDk->bkh", _head_bias_shares(self.spec), e)   # (Bg, K, H)
        if level == "head":
            return head
        C = self.spec.num_neurons
        return head[..., None] / C if level == "pair" else head.sum(dim=-1, keepdim=True) / C

    def _map(self, e: Tensor, g: Tensor, level: str) -> Tensor:
        """The token map (B, K, T) or spatial map (B, K, h*w) before sink handling.

        token:   sum_h a[h,t] z_t . g_h, the mean token's spatial part left at token 0;
        spatial: sum_h (a[h,t] + a[h,0] / hw) F_t . g_h, the mean token's spatial part spread 1/hw per cell.

        Under ``bias='split'`` every token also takes its bias share as the NAD paper's code gives it,
        ``sum_h a[h,t] (W_o^h b_v^h) . e + b_o . e / T`` (a token's value bias weighted by its attention, the output
        bias evenly); the spatial map spreads the mean token's share 1/hw per cell like its features, so each cell
        gets ``sum_h (a[h,t] + a[h,0] / hw) (W_o^h b_v^h) . e + b_o . e / hw``. Either way the map sums to the
        level's share of ``y . e`` exactly."""
        a = self.attention
        if level == "token":
            x, weight = tokens(self.features, self.positional_embedding), a     # (B, T, C), (B, H, T)
        else:
            x = rearrange(self.features, "b c h w -> b (h w) c")
            weight = a[:, :, 1:] + a[:, :, :1] / x.shape[1]                        # (B, H, hw)
        per_head = torch.einsum("btn,bhnk->bkth", x, g)                             # (B, K, T | hw, H)
        if self.bias != "split":
            return torch.einsum("bkth,bht->bkt", per_head, weight)
        value_bias = torch.einsum("hD,bDk->bkh", head_bias(self.spec), e)         # (Bg, K, H)
        out = torch.einsum("bkth,bht->bkt", per_head + value_bias[:, :, None], weight)
        return out + (self.spec.c_bias @ e / x.shape[1])[..., None]

    def _sunk(self, raw: Tensor, level: str) -> tuple[Tensor, Tensor]:
        """A token map (B, K, T) or spatial map (B, K, h*w) with the attention-sink cell (the last spatial one)
        handled per ``sink``, spatial maps as grids (B, K, h, w); and what that removed from the cell, (B, K)."""
        cells = (raw[..., 1:] if level == "token" else raw).unflatten(-1, self.grid)
        sunk = apply_sink(cells, self.sink)
        removed = cells[..., -1, -1] - sunk[..., -1, -1]
        return (torch.cat([raw[..., :1], sunk.flatten(start_dim=-2)], dim=-1) if level == "token" else sunk), removed

    def _positional(self, e: Tensor, g: Tensor) -> Tensor:
        """sum_h sum_t a[h,t] p_t . g_h, (B, K)."""
        pg = torch.einsum("tn,bhnk->bkth", self.positional_embedding.to(g.dtype), g)
        return torch.einsum("bkth,bht->bk", pg.expand(self.batch_size, -1, -1, -1), self.attention)

    def sink_score(self, target: Tensor, level: str = "spatial", normalize: bool = False,
                   per_image: Optional[bool] = None) -> Tensor:
        """What ``sink`` removed from the last spatial cell at ``level`` ('spatial' or 'token'); zero for keep.
        Shape (B,) for one direction, (B, K) for a set."""
        _check_choice("level", level, ("spatial", "token"))
        e, kind = self._canonical_target(target, per_image)
        if self.sink == "keep":
            out = torch.zeros(self.batch_size, e.shape[-1], dtype=e.dtype, device=e.device)
        else:
            out = self._sunk(self._map(e, target_weights(self.spec, e), level), level)[1]
        return finish_scores(out, kind, self._scale(e, normalize))

    def bias_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """beta . e when ``bias='own'`` (its own term); zero under ``bias='split'``. (B,) or (B, K)."""
        e, kind = self._canonical_target(target, per_image)
        out = self._bias_total(e).expand(self.batch_size, -1)
        if self.bias == "split":
            out = torch.zeros_like(out)
        return finish_scores(out, kind, self._scale(e, normalize))

    def positional_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """sum_h sum_t a[h,t] p_t . g_h: the positional embedding's share, (B,) or (B, K). Part of the
        pair/head/neuron/token scores; separate from (and completing) the spatial map."""
        e, kind = self._canonical_target(target, per_image)
        out = self._positional(e, target_weights(self.spec, e))
        return finish_scores(out, kind, self._scale(e, normalize))

    def total_score(self, target: Tensor, normalize: bool = False, per_image: Optional[bool] = None) -> Tensor:
        """y . e of :attr:`reference_embedding` (the model's own pool where it can run, else torch's multi-head
        attention from the pool's parameters), (B,) or (B, K)."""
        e, kind = self._canonical_target(target, per_image)
        y = self.reference_embedding
        out = torch.einsum("bD,bDk->bk", y.to(e.dtype), e.expand(self.batch_size, -1, -1))
        return finish_scores(out, kind, self._scale(e, normalize))

    def completeness_error(self, target: Optional[Tensor] = None, level: str = "pair",
                           per_image: Optional[bool] = None) -> Tensor:
        """Relative residual between the sum of components at ``level`` and an independent reference y
        (:attr:`reference_embedding`: the model's own pool, or torch's multi-head attention where that cannot
        run), so a fault in the decomposition's maths shows at every resolution.

        Without a target: ||beta + sum s u - y|| / ||y||, shape (B,). With a target: |sum of the level's
        scores + :meth:`rest_score` - y . e| / (||y|| ||e||), shape (B,) or (B, K).

        Bound: ~1e-16 for a float64 model, ~1e-7 for float32; for bf16 / fp16 models the maths runs in float32 and
        what remains is the model's own rounding of its pool output, below the dtype's machine epsilon
        (bf16 7.8e-3, fp16 9.8e-4; measured on the tiny test ResNet, 8 images: up to 2.2e-3 and 2.9e-4).
        """
        y = self.reference_embedding
        if target is None:
            return (self.embedding - y).norm(dim=-1) / y.norm(dim=-1)
        parts, rest = self.scores_and_rest(target, level=level, per_image=per_image)
        e, kind = self._canonical_target(target, per_image)
        keep = 1 if kind == "set" else 0
        total = parts.flatten(start_dim=1 + keep).sum(dim=-1) + rest
        ref = self.total_score(target, per_image=per_image)
        return (total - ref).abs() / finish_scores(self._scale(e, True), kind, None)

    # ---- labelled stacks, component axis first (TransformerLens's layout) ---------------------------------
    def stack_head_contributions(self, target: Optional[Tensor] = None, return_labels: bool = False, *,
                                 per_image: Optional[bool] = None):
        """Each head's part of the embedding, labelled ``'H0'``, ``'H1'``, ...

        Args:
            target: None for vectors, else a target as for :meth:`scores` (then the stack is
                ``scores(target, "head")`` with the head axis first).
            return_labels: also return the labels.
            per_image: as for :meth:`scores`.

        Returns:
            (H, B, D), or (H, B) / (H, B, K) with a target; with ``return_labels``, ``(stack, labels)``.
        """
        if target is not None:
            stack = self.scores(target, level="head", per_image=per_image).movedim(-1, 0)
        else:
            stack = self.head_contributions().movedim(1, 0)
            if self.bias == "split":
                stack = stack + _head_bias_shares(self.spec)[:, None].to(stack)
        labels = [f"H{h}" for h in range(self.spec.num_heads)]
        return (stack, labels) if return_labels else stack

    def stack_neuron_contributions(self, target: Optional[Tensor] = None, neurons=None, return_labels: bool = False,
                                   *, per_image: Optional[bool] = None):
        """Each neuron's part of the embedding (summed over heads), labelled ``'N17'``.

        Args:
            target: None for vectors, else a target as for :meth:`scores` (then ``scores(target, "neuron")``).
            neurons: indices (a sequence or tensor) of the neurons to stack; all C by default.
            return_labels: also return the labels.
            per_image: as for :meth:`scores`.

        Returns:
            (C', B, D), or (C', B) / (C', B, K) with a target; with ``return_labels``, ``(stack, labels)``.
        """
        C = self.spec.num_neurons
        idx = _selection(neurons, C, "neurons")
        if target is not None:
            stack = self.scores(target, level="neuron", per_image=per_image)[..., idx].movedim(-1, 0)
        else:
            stack = self.neuron_contributions(idx).movedim(1, 0)
            if self.bias == "split":
                stack = stack + (_head_bias_shares(self.spec).sum(dim=0) / C).to(stack)
        labels = [f"N{n}" for n in idx.tolist()]
        return (stack, labels) if return_labels else stack

    def stack_pair_contributions(self, target: Optional[Tensor] = None, heads=None, neurons=None,
                                 return_labels: bool = False, *, per_image: Optional[bool] = None):
        """Pair contributions ``s[h,n] u[h,n]``, head-major, labelled ``'H3N17'``.

        Without a target only the selected pairs' directions are built, (H', C', D); all H*C pairs of a large
        model are big (RN50x16: 453 MB of directions, times B), so select ``heads``/``neurons`` or give a target
        (then nothing of size D per pair is built).

        Args:
            target: None for vectors, else a target as for :meth:`scores` (then ``scores(target, "pair")``).
            heads, neurons: indices (sequences or tensors) to stack; all by default.
            return_labels: also return the labels.
            per_image: as for :meth:`scores`.

        Returns:
            (P, B, D) with P = H' * C', or (P, B) / (P, B, K) with a target; with ``return_labels``,
            ``(stack, labels)``.
        """
        C = self.spec.num_neurons
        hs, ns = _selection(heads, self.spec.num_heads, "heads"), _selection(neurons, C, "neurons")
        if target is not None:
            scores = self.scores(target, level="pair", per_image=per_image)[..., hs, :][..., ns]
            stack = scores.flatten(start_dim=-2).movedim(-1, 0)
        else:
            s = self.pair_coefficients[:, hs][:, :, ns]                          # (B, H', C')
            wo, wv = head_split(self.spec)
            u = torch.einsum("Dhj,hjn->hnD", wo[:, hs], wv[hs][..., ns]).to(s)   # (H', C', D)
            stack = torch.einsum("bhn,hnD->hnbD", s, u)
            if self.bias == "split":
                stack = stack + (_head_bias_shares(self.spec)[hs] / C)[:, None, None].to(stack)
            stack = stack.flatten(0, 1)
        labels = [f"H{h}N{n}" for h in hs.tolist() for n in ns.tolist()]
        return (stack, labels) if return_labels else stack
