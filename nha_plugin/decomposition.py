"""The exact neuron x head decomposition of CLIP-ResNet's attention pool, as one object per batch.

:class:`Contributions` holds the pair coefficients s (B, H, C) and the class attention of a batch; the identity
``y = beta + sum_{h,n} s[h,n] u[h,n]`` it rests on, and the algebra behind it, are in :mod:`nha_plugin.pool`.

Scores against a target direction e never need u: ``g[h,n] = (W_o^h^T e) . W_v^h[:, n]`` and the pair
score is ``s * g``. Every reported component (pairs, heads, neurons, tokens, spatial cells, positional,
bias, attention-sink residual) sums back to ``y . e`` exactly; :meth:`Contributions.completeness_error`
measures it against the model's own attention pool. The ``stack_*_contributions`` methods give heads, neurons
and pairs as labelled stacks with the component axis first, as TransformerLens's ``ActivationCache`` does.

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

from .pool import (class_attention, constant_term, head_bias, head_outputs, head_split, neuron_contributions,
                   pair_coefficients, pair_directions, positional_embedding_for, target_weights, tokens)
from .pool_maps import apply_sink, check_sink
from .spec import AttentionPoolSpec

__all__ = ["Contributions", "decompose_features", "canonical_target", "finish_scores", "LEVELS", "BIAS_MODES"]

LEVELS = ("pair", "head", "neuron", "token", "spatial")
BIAS_MODES = ("own", "split")
# s (B, H, C) against target weights g (B, H, C, K), summed to each level's components
_COEFFICIENT_SUMS = {"pair": "bhn,bhnk->bkhn", "head": "bhn,bhnk->bkh", "neuron": "bhn,bhnk->bkn"}


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def decompose_features(spec: AttentionPoolSpec, features: Tensor, *, sink: str = "keep",
                       bias: str = "own") -> "Contributions":
    """Decompose layer4 features through the attention pool of ``spec``.

    Args:
        spec: the model's attention pool.
        features: layer4 output F (B, C, h, w); another grid than the native one interpolates the positional
            embedding (with a warning).
        sink, bias: see :data:`nha_plugin.pool_maps.SINK_MODES` and :data:`BIAS_MODES`.

    Returns:
        :class:`Contributions` holding the attention (B, H, T) and the pair coefficients (B, H, C).
    """
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
    coeffs = pair_coefficients(attn, z)
    return Contributions(spec=spec, features=features, positional_embedding=pos, attention=attn,
                         pair_coefficients=coeffs, sink=sink, bias=bias)


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


def finish_scores(x: Tensor, kind: str, scale: Optional[Tensor]) -> Tensor:
    """Scores (B, K, ...) in the caller's layout: divided by the cosine divisor ``scale`` (B, K) when given, and
    without the K axis unless the target was a set (``kind`` from :func:`canonical_target`)."""
    if scale is not None:
        x = x / scale.view(*scale.shape, *([1] * (x.dim() - 2)))
    return x if kind == "set" else x[:, 0]


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

    Stacks (:meth:`stack_head_contributions`, :meth:`stack_neuron_contributions`,
    :meth:`stack_pair_contributions`) put the component axis first, as TransformerLens does, with labels
    ``'H3'``, ``'N17'``, ``'H3N17'``: vectors (P, B, D) without a target, the level's scores (P, B) or (P, B, K)
    with one. Like the scores they take the bias per ``bias``: under ``'own'`` they sum to the embedding minus
    :attr:`constant` (to ``y . e`` minus :meth:`bias_score`), under ``'split'`` to the embedding itself.
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
            raw = self._token_scores(g) if level == "token" else self._spatial_scores(g)
            out, rest = self._sunk(raw, level)                             # token (B, K, T) | spatial (B, K, h, w)
            if split:
                cells = out.shape[-1] if level == "token" else out.shape[-2] * out.shape[-1]
                out = out + (beta / cells).view(*beta.shape, *([1] * (out.dim() - 2)))
            else:
                rest = rest + beta
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
            g = target_weights(self.spec, e)
            out = self._sunk(self._token_scores(g) if level == "token" else self._spatial_scores(g), level)[1]
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
        """y . e from the unmodified model's attention pool when it can run (else the rebuilt embedding)."""
        e, kind = self._canonical_target(target, per_image)
        y = self._reference_embedding()
        out = torch.einsum("bD,bDk->bk", y.to(e.dtype), e.expand(self.batch_size, -1, -1))
        return finish_scores(out, kind, self._scale(e, normalize))

    def completeness_error(self, target: Optional[Tensor] = None, level: str = "pair",
                           per_image: Optional[bool] = None) -> Tensor:
        """Relative residual between the sum of components at ``level`` and the model's own output.

        Without a target: ||beta + sum s u - y|| / ||y||, shape (B,). With a target: |sum of the level's
        scores + :meth:`rest_score` - y . e| / (||y|| ||e||), shape (B,) or (B, K).
        """
        y = self._reference_embedding()
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
