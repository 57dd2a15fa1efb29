"""The exact decomposition of a CLIP-ViT image embedding into layers, heads, tokens and MLPs.

The class token's residual stream after the last block is a sum of 2L+1 components::

    x_L[0] = e[0] + sum_l (attn_l[0] + mlp_l[0])
    attn_l[0] = ls_1 * (b_o + sum_h W_o^h sum_i a^{l,h}[0,i] v^{l,h}_i),   v^{l,h}_i = W_v^h LN_1(x_i) + b_v^h

and the output is ``M = LN_post(x_L[0]) @ P``. With LN_post's per-image mean mu and std sigma frozen, a
component c that takes the share ``s`` of the mean and of LN_post's shift maps to
``Map(c, s) = (gamma * (c - s mu) / sigma + s beta) @ P``; the shares add up to 1, so the mapped components
add up to M exactly (docs/methods.md §2). Shares: 1/K for the embedding and for each MLP, K = 2L+1; an
attention layer's 1/K split evenly over its N*H (token, head) entries, and so is its ``b_o``:

    entry(l, h, i) = Map(a^{l,h}[0,i] ls_1 * W_o^h v^{l,h}_i + ls_1 * b_o / (N H),  1 / (K N H))

Scores against a target e never build the (B, L, H, N, D) table: with ``u = gamma * (P e)`` and
``g_{l,h} = (W_o^h)^T (ls_1 * u)`` (d,), the entry's score is ``a^{l,h}[0,i] (v^{l,h}_i . g_{l,h}) / sigma`` plus
its shares, O(L H N d) per image and target.

Precision: the forward pass (the residual stream, every block's attention and values) runs in the model's dtype,
as the model runs it; the decomposition's own maths (head outputs, the class token's stream rebuilt from its
components, LN_post's statistics, the output and every score) runs in float64 for a float64 model and in float32
otherwise (:func:`nha_plugin.pool.working_dtype`), from those low-precision intermediates. The components then add
up to :attr:`ViTContributions.embedding` to float32 rounding, and what a completeness error or convergence delta
still shows for a bf16 / fp16 model is the model's own rounding of its stream, LN_post and projection.

Completeness is measured against the unmodified image tower; for a spec without one, against torch's own layers
(``F.layer_norm``, ``F.multi_head_attention_forward``) run from the spec's weights, or NaN with a warning where
those cannot express a block (q/k LayerNorm, scaled-cosine attention).

This module imports only torch (and the spec/trace steps); it knows nothing of open_clip.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pool import canonical_target, finish_scores, working_dtype
from .spec import LayerNormSpec, ViTSpec, select_layers, vit_spec
from .trace import embed, model_output, run_block, validate_images

__all__ = ["ViTContributions", "decompose", "LEVELS"]

LEVELS = ("component", "layer", "head", "token", "spatial")


def decompose(model, images: Tensor, *, token_layers: Union[str, Sequence[int], None] = "all",
              grad: bool = False) -> "ViTContributions":
    """Run the ViT from its weights and decompose its image embedding exactly.

    Args:
        model: an open_clip CLIP-ViT (whole model or ``model.visual``) or a :class:`ViTSpec`.
        images: (B, 3, H, W) preprocessed, in the model's dtype and device.
        token_layers: layers whose per-token values are kept for "token"/"spatial" scores and
            :meth:`ViTContributions.token_contributions`: ``"all"`` (default), a list of layer indices, or None
            (none: component/layer/head levels only). Memory: B*N*W values per kept layer, the size of the
            residual stream; for ViT-H-14 keep e.g. the last 4 layers.
        grad: keep the autograd graph (off by default).

    Returns:
        ViTContributions, in float64 for a float64 model and float32 otherwise (see the module doc).

    Precision: against the model's own ``encode_image`` the relative completeness error is ~1e-16 (fp64), ~1e-7
    (fp32), and for bf16 / fp16 models the model's own rounding of its forward pass, which grows with depth:
    below ``(L + 1) * eps`` for L blocks (eps = 7.8e-3 for bf16, 9.8e-4 for fp16; measured on the tiny 3-block
    test ViT, 8 images: up to 9.2e-3 and 1.2e-3, i.e. a little above one eps).
    """
    spec = vit_spec(model)
    validate_images(images, spec)
    kept = select_layers(spec, None if token_layers == "all" else (token_layers or ()))
    work = working_vit_spec(spec, detach=not grad)
    dtype, cls = work.dtype, spec.class_index
    with torch.set_grad_enabled(grad):
        x = embed(spec, images)                                  # the stream runs in the model's dtype
        # rows are copied: a view would keep each layer's whole (B, H, N, N) attention / (B, N, W) stream alive
        cls_embedding = x[:, cls].to(dtype, copy=True)
        attention, head_out, mlp, values = [], [], [], {}
        for l, layer in enumerate(spec.blocks):
            out = run_block(layer, x)
            a = out.attn[:, :, cls].to(dtype, copy=True)                                # (B, H, N)
            v = out.values.to(dtype)
            attention.append(a)
            head_out.append(torch.einsum("bhn,bhnd->bhd", a, v))
            mlp.append(out.mlp_out[:, cls].to(dtype, copy=True))
            if l in kept:
                values[l] = v
            x = out.x_out
        head_out, mlp = torch.stack(head_out, 1), torch.stack(mlp, 1)
        # the class token's final stream rebuilt from its components in the working dtype: LN_post's statistics
        # and the output are then those of exactly the sum the components make up
        stream = cls_embedding + mlp.sum(dim=1)
        for l, layer in enumerate(work.blocks):
            stream = stream + (torch.einsum("hwd,bhd->bw", layer.W_o_heads, head_out[:, l]) + layer.b_o) * layer.ls_1
        mean, std = work.ln_post.stats(stream)
        output = work.ln_post.normalize(stream, mean, std)
        output = output @ work.proj if work.proj is not None else output
    return ViTContributions(work, images=images, embedding_stream=cls_embedding, mlp_stream=mlp,
                            head_outputs=head_out, attention=torch.stack(attention, 1),
                            values=values, post_mean=mean, post_std=std, output=output, model_spec=spec)


def working_vit_spec(spec: ViTSpec, detach: bool = True) -> ViTSpec:
    """The spec with the tensors the decomposition reads (per block W_o, b_o, ls_1; ln_post; proj; the class
    embedding, which sets ``dtype``) in :func:`nha_plugin.pool.working_dtype`, detached unless ``detach=False``.
    The rest (q/k/v, MLPs, LayerNorms 1 and 2, the module) is the model's, untouched: the forward pass runs
    with it in the model's dtype.

    Args:
        spec: the model's :class:`ViTSpec`.
        detach: cut the tensors from autograd (views when the dtype already matches).

    Returns:
        a new :class:`ViTSpec` sharing everything else with ``spec``.
    """
    dtype = working_dtype(spec.dtype)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        return (t.detach() if detach else t).to(dtype)

    ln = spec.ln_post
    return replace(spec, blocks=[replace(b, W_o=cast(b.W_o), b_o=cast(b.b_o), ls_1=cast(b.ls_1)) for b in spec.blocks],
                   ln_post=LayerNormSpec(gamma=cast(ln.gamma), beta=cast(ln.beta), eps=ln.eps),
                   proj=cast(spec.proj), class_embedding=cast(spec.class_embedding))


def reference_output(spec: ViTSpec, images: Tensor) -> Optional[Tensor]:
    """The image embedding (B, D) computed by torch's own layers from the spec's weights (``F.conv2d``,
    ``F.layer_norm``, ``F.multi_head_attention_forward``, ``F.linear``), in the spec's dtype: an independent
    reference for a spec without its module (nothing of :mod:`nha_plugin.vit.trace` is reused). None where a
    block uses what those layers cannot express (q/k LayerNorm, scaled-cosine attention).

    Args:
        spec: the ViT's weights.
        images: (B, 3, H, W) in the spec's dtype.

    Returns:
        (B, D), or None.
    """
    if any(b.q_norm is not None or b.logit_scale is not None for b in spec.blocks):
        return None

    def norm(x: Tensor, ln: LayerNormSpec) -> Tensor:
        return F.layer_norm(x, (spec.width,), ln.gamma, ln.beta, ln.eps)

    with torch.no_grad():
        x = F.conv2d(images, spec.conv_weight, stride=spec.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([spec.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + spec.positional_embedding
        x = norm(x, spec.ln_pre) if spec.ln_pre is not None else x
        for b in spec.blocks:
            h = norm(x, b.ln_1).transpose(0, 1)                                          # (N, B, W)
            attn, _ = F.multi_head_attention_forward(
                h, h, h, spec.width, b.heads, torch.cat([b.W_q, b.W_k, b.W_v]).reshape(-1, spec.width),
                torch.cat([b.b_q, b.b_k, b.b_v]).reshape(-1), None, None, False, 0.0, b.W_o, b.b_o,
                training=False, need_weights=False)
            x = x + attn.transpose(0, 1) * b.ls_1
            x = x + F.linear(b.activation(F.linear(norm(x, b.ln_2), b.c_fc, b.c_fc_bias)), b.c_proj,
                             b.c_proj_bias) * b.ls_2
        out = norm(x[:, spec.class_index], spec.ln_post)
    return out @ spec.proj if spec.proj is not None else out


class ViTContributions:
    """The decomposition of a batch of images through a CLIP-ViT (see the module doc for the conventions).

    Attributes:
        spec: the :class:`ViTSpec`, with the tensors the decomposition reads in the working dtype
            (:func:`working_vit_spec`); model_spec: the spec as the model holds it.
        embedding: (B, D) the output rebuilt from the weights; equals ``model.encode_image`` and the sum of all
            components.
        embedding_term: (B, D) the input embedding's component (patch + class + positional, ln_pre).
        mlp: (B, L, D) each layer's MLP component.
        attention: (B, L, H, N) class-token attention rows.
        head_outputs: (B, L, H, d) ``sum_i a^{l,h}[0,i] v^{l,h}_i``, each head's output before W_o.
        token_layers: the layers whose per-token values are kept (token/spatial levels).
        post_mean, post_std: (B,) LN_post statistics at the class token (frozen).

    Scores accept a ``target`` (D,) (one direction), (D, K) (K directions; K is inserted after B) or (B, D)
    (one direction per image; ``per_image`` resolves B == D). ``normalize=True`` divides by ``||y|| ||e||``,
    so scores add up to the cosine similarity.
    """

    def __init__(self, spec: ViTSpec, *, images: Optional[Tensor], embedding_stream: Tensor, mlp_stream: Tensor,
                 head_outputs: Tensor, attention: Tensor, values: dict, post_mean: Tensor, post_std: Tensor,
                 output: Tensor, model_spec: Optional[ViTSpec] = None):
        self.spec = spec
        self.model_spec = model_spec if model_spec is not None else spec
        self.images = images
        self.embedding_stream = embedding_stream          # (B, W) class token entering block 0
        self.mlp_stream = mlp_stream                      # (B, L, W) after ls_2
        self.head_outputs = head_outputs
        self.attention = attention
        self.values = values
        self.token_layers = tuple(sorted(values))
        self.post_mean = post_mean
        self.post_std = post_std
        self.embedding = output
        self._model_embedding: Optional[Tensor] = None

    # ---- shapes and constants -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def num_components(self) -> int:
        """K = 2L + 1: the embedding, then each layer's attention and MLP."""
        return 2 * self.spec.layers + 1

    def _bcast(self, x: Tensor, ndim: int) -> Tensor:
        """A per-image (B,) tensor viewed to broadcast against a (B, ...) tensor of ``ndim`` dimensions."""
        return x.view(-1, *([1] * (ndim - 1)))

    def _map(self, t: Tensor, share: float) -> Tensor:
        """Frozen-LN_post image of stream components t (B, ..., W) holding ``share`` of the mean/shift: (B, ..., D)."""
        ln = self.spec.ln_post
        mu = self._bcast(self.post_mean, t.dim())
        sigma = self._bcast(self.post_std, t.dim())
        z = ln.gamma * (t - share * mu) / sigma + share * ln.beta
        return z @ self.spec.proj if self.spec.proj is not None else z

    def _head_stream(self, l: int) -> Tensor:
        """Each head's added stream at the class token, without b_o: ``ls_1 * W_o^h o_h``, (B, H, W)."""
        layer = self.spec.blocks[l]
        return torch.einsum("hwd,bhd->bhw", layer.W_o_heads, self.head_outputs[:, l]) * layer.ls_1

    # ---- dense components -----------------------------------------------------------------------------
    @property
    def embedding_term(self) -> Tensor:
        """(B, D) the input embedding's component."""
        return self._map(self.embedding_stream, 1 / self.num_components)

    @property
    def mlp(self) -> Tensor:
        """(B, L, D) each layer's MLP component."""
        return self._map(self.mlp_stream, 1 / self.num_components)

    def head_contributions(self) -> Tensor:
        """(B, L, H, D) each head's component summed over source tokens (its b_o and LN shares included)."""
        H, K = self.spec.heads, self.num_components
        out = [self._map(self._head_stream(l) + self.spec.blocks[l].b_o * self.spec.blocks[l].ls_1 / H, 1 / (K * H))
               for l in range(self.spec.layers)]
        return torch.stack(out, dim=1)

    def attention_layers(self) -> Tensor:
        """(B, L, D) each attention layer's component (its heads summed)."""
        return self.head_contributions().sum(dim=2)

    def _check_token_layers(self, layers: Optional[Sequence[int]]) -> tuple[int, ...]:
        chosen = self.token_layers if layers is None else select_layers(self.spec, layers)
        missing = [l for l in chosen if l not in self.values]
        if missing:
            raise ValueError(f"per-token values of layers {missing} were not kept (kept: {list(self.token_layers)}); "
                             "decompose again with token_layers=... including them")
        return chosen

    def token_contributions(self, layers: Optional[Sequence[int]] = None) -> Tensor:
        """(B, L', H, N, D) per (layer, head, source token) entry, for ``layers`` (default: all kept layers).

        Memory: B*L'*H*N*D values (ViT-H-14, one image, all 32 layers: 134.7M, 539 MB in fp32); restrict
        ``layers`` for big models.
        """
        chosen = self._check_token_layers(layers)
        H, N, K = self.spec.heads, self.spec.tokens, self.num_components
        out = []
        for l in chosen:
            layer = self.spec.blocks[l]
            stream = torch.einsum("hwd,bhnd->bhnw", layer.W_o_heads, self.values[l]) * layer.ls_1
            stream = stream * self.attention[:, l, :, :, None] + layer.b_o * layer.ls_1 / (N * H)
            out.append(self._map(stream, 1 / (K * N * H)))
        return torch.stack(out, dim=1)

    # ---- scores ---------------------------------------------------------------------------------------
    def _target(self, target: Tensor, per_image: Optional[bool]) -> tuple[Tensor, str]:
        return canonical_target(target, self.spec.output_dim, self.batch_size, self.embedding.dtype,
                                self.embedding.device, per_image)

    def _readback(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """u = gamma * (P e) (Bg, W, K) and the per-unit-share constant c0 = beta.(P e) - mu/sigma sum(u), (B, K)."""
        r = torch.einsum("wD,bDk->bwk", self.spec.output_projection(), e)
        u = self.spec.ln_post.gamma[:, None] * r
        c0 = torch.einsum("w,bwk->bk", self.spec.ln_post.beta, r) - (self.post_mean / self.post_std)[:, None] * u.sum(1)
        return u, c0

    def _stream_score(self, t: Tensor, u: Tensor) -> Tensor:
        """t . u / sigma for stream vectors t (B, ..., W): (B, K, ...)."""
        s = torch.einsum("b...w,bwk->bk...", t, u.expand(t.shape[0], -1, -1))
        return s / self._bcast(self.post_std, s.dim())

    def _head_weights(self, l: int, u: Tensor) -> Tensor:
        """g_{l,h} = (W_o^h)^T (ls_1 * u), (Bg, H, d, K)."""
        layer = self.spec.blocks[l]
        return torch.einsum("hwd,bwk->bhdk", layer.W_o_heads, layer.ls_1[:, None] * u)

    def _parts(self, e: Tensor, level: str, layers: tuple) -> tuple[Tensor, Tensor]:
        """(scores (B, K, ...) at ``level``, what lies outside them (B, K)) for canonical directions e."""
        spec, K = self.spec, self.num_components
        H, N, L = spec.heads, spec.tokens, spec.layers
        u, c0 = self._readback(e)
        emb = self._stream_score(self.embedding_stream, u) + c0 / K                    # (B, K)
        mlp = self._stream_score(self.mlp_stream, u) + c0[..., None] / K               # (B, K, L)
        bias = torch.stack([torch.einsum("w,bwk->bk", spec.blocks[l].b_o * spec.blocks[l].ls_1, u)
                            for l in range(L)], dim=-1) / self._bcast(self.post_std, 3)  # (B, K, L) b_o . u / sigma
        heads, weights = [], [self._head_weights(l, u).expand(self.batch_size, -1, -1, -1) for l in range(L)]
        for l in range(L):
            hs = torch.einsum("bhd,bhdk->bkh", self.head_outputs[:, l], weights[l])
            heads.append(hs / self._bcast(self.post_std, 3) + (bias[:, :, l, None] + c0[..., None] / K) / H)
        heads = torch.stack(heads, dim=2)                                              # (B, K, L, H)
        if level in ("component", "layer"):
            layer_scores = torch.stack([heads.sum(-1), mlp], dim=-1).flatten(2)        # attn_0, mlp_0, attn_1, ...
            return torch.cat([emb[..., None], layer_scores], dim=-1), torch.zeros_like(emb)
        rest = emb + mlp.sum(-1)
        if level == "head":
            return heads, rest
        tokens = []
        for l in layers:
            vs = torch.einsum("bhnd,bhdk->bkhn", self.values[l], weights[l]) * self.attention[:, None, l]
            share = (bias[:, :, l, None, None] + c0[..., None, None] / K) / (N * H)
            tokens.append(vs / self._bcast(self.post_std, 4) + share)
        tokens = (torch.stack(tokens, dim=2) if tokens else
                  emb.new_zeros(*emb.shape, 0, H, N))                                 # (B, K, L', H, N)
        others = [l for l in range(L) if l not in layers]
        rest = rest + heads[:, :, others].sum(dim=(-1, -2))
        if level == "token":
            return tokens, rest
        cls = spec.class_index
        rest = rest + tokens[..., cls].sum(dim=(-1, -2))
        spatial = torch.cat([tokens[..., :cls], tokens[..., cls + 1:]], dim=-1).sum(dim=(2, 3))
        return spatial.view(*spatial.shape[:2], *spec.grid), rest

    def _scale(self, e: Tensor, normalize: bool) -> Optional[Tensor]:
        """(B, K) divisor turning dot products into cosines, or None."""
        return self.embedding.norm(dim=-1)[:, None] * e.norm(dim=1) if normalize else None

    def scores(self, target: Tensor, level: str = "component", normalize: bool = False,
               per_image: Optional[bool] = None, layers: Optional[Sequence[int]] = None) -> Tensor:
        """Additive scores of the image embedding against ``target`` at one granularity.

        Shapes for one direction (a set of K directions inserts K after B):
        ``"component"`` / ``"layer"`` (B, 2L+1) in the order [embedding, attn_0, mlp_0, attn_1, mlp_1, ...];
        ``"head"`` (B, L, H); ``"token"`` (B, L', H, N) over the kept token layers (or ``layers``);
        ``"spatial"`` (B, gh, gw), the patch tokens' entries summed over those layers and heads.

        Completeness: ``scores(...).sum() + rest_score(target, level)`` equals ``y . e`` (or the cosine when
        normalised); at component/layer level the rest is zero.
        """
        return self.scores_and_rest(target, level, normalize, per_image, layers)[0]

    def rest_score(self, target: Tensor, level: str = "spatial", normalize: bool = False,
                   per_image: Optional[bool] = None, layers: Optional[Sequence[int]] = None) -> Tensor:
        """What the scores at ``level`` leave out, (B,) or (B, K): the embedding and MLP components (head,
        token, spatial levels), the heads of layers outside the token layers (token, spatial), and the class
        token's own entries (spatial). Zero at component/layer level."""
        return self.scores_and_rest(target, level, normalize, per_image, layers)[1]

    def scores_and_rest(self, target: Tensor, level: str = "component", normalize: bool = False,
                        per_image: Optional[bool] = None,
                        layers: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
        """``(scores(...), rest_score(...))`` computed in one pass (the two share all their work)."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}; got {level!r}")
        e, kind = self._target(target, per_image)
        out, rest = self._parts(e, level, self._check_token_layers(layers) if level in ("token", "spatial") else ())
        scale = self._scale(e, normalize)
        return finish_scores(out, kind, scale), finish_scores(rest, kind, scale)

    # ---- the unmodified model and completeness ------------------------------------------------------------
    @property
    def model_embedding(self) -> Tensor:
        """What completeness is measured against, (B, D), independent of this decomposition: the unmodified image
        tower's output on the same images; for a spec without its module, torch's own layers run from the
        spec's weights (:func:`reference_output`); NaN, with a warning, where neither can run (no images kept, or
        blocks those layers cannot express)."""
        if self._model_embedding is None:
            ref = None
            if self.images is not None:
                ref = model_output(self.spec, self.images)
                ref = reference_output(self.model_spec, self.images) if ref is None else ref
            if ref is None:
                warnings.warn("no independent reference for this ViT decomposition (the spec has no module, and "
                              "its blocks use q/k LayerNorm or scaled-cosine attention, or no images were kept): "
                              "completeness errors are NaN. Decompose the open_clip model itself to check them",
                              stacklevel=3)
                ref = torch.full_like(self.embedding, float("nan"))
            self._model_embedding = ref.detach()
        return self._model_embedding

    def completeness_error(self, target: Optional[Tensor] = None, level: str = "layer",
                           per_image: Optional[bool] = None) -> Tensor:
        """Relative residual between the sum of the components at ``level`` and the model's own output.

        Without a target: ``||sum of dense components - y|| / ||y||``, (B,) (``"token"``/``"spatial"`` build the
        token table of the kept layers). With a target: ``|sum of scores + rest_score - y . e| / (||y|| ||e||)``,
        (B,) or (B, K).
        """
        y = self.model_embedding
        if target is None:
            if level not in LEVELS:
                raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}; got {level!r}")
            heads = self.head_contributions()
            if level in ("token", "spatial"):
                others = [l for l in range(self.spec.layers) if l not in self.token_layers]
                attn = heads[:, others].sum(dim=(1, 2))
                if self.token_layers:
                    attn = attn + self.token_contributions().sum(dim=(1, 2, 3))
            else:
                attn = heads.sum(dim=(1, 2))
            total = self.embedding_term + self.mlp.sum(dim=1) + attn
            return (total - y).norm(dim=-1) / y.norm(dim=-1)
        e, kind = self._target(target, per_image)
        keep = 1 if kind == "set" else 0
        parts, rest = self.scores_and_rest(target, level=level, per_image=per_image)
        total = parts.flatten(start_dim=1 + keep).sum(dim=-1) + rest
        ref = finish_scores(torch.einsum("bD,bDk->bk", y.to(e.dtype), e.expand(self.batch_size, -1, -1)), kind, None)
        return (total - ref).abs() / finish_scores(self._scale(e, True), kind, None)

    # ---- ablation --------------------------------------------------------------------------------------
    def mean_ablated(self, head_mask: Optional[Tensor] = None, head_means: Optional[Tensor] = None,
                     mlp_keep: Optional[Tensor] = None, mlp_means: Optional[Tensor] = None) -> Tensor:
        """The embedding with dropped components replaced by their dataset means, (B, D). Exact (linear).

        Args:
            head_mask: (L, H) bool, True = keep the head; None keeps every head.
            head_means: (L, H, D) mean head contributions (e.g. ``head_contributions().mean(0)`` over a dataset);
                needed when a head is dropped.
            mlp_keep: (L,) bool, True = keep the layer's MLP; None keeps every MLP.
            mlp_means: (L, D) mean MLP components; needed when an MLP is dropped.

        Returns:
            ``y - sum_dropped (c - mean(c))``; keeping everything returns ``embedding`` unchanged.
        """
        L, H, D = self.spec.layers, self.spec.heads, self.spec.output_dim
        out = self.embedding
        for name, keep, means, shape, parts in (
                ("head", head_mask, head_means, (L, H), self.head_contributions),
                ("mlp", mlp_keep, mlp_means, (L,), lambda: self.mlp)):
            if keep is None:
                continue
            keep = torch.as_tensor(keep, dtype=torch.bool, device=out.device)
            if tuple(keep.shape) != shape:
                raise ValueError(f"{'head_mask' if name == 'head' else 'mlp_keep'} must be a bool tensor of shape "
                                 f"{shape} (True = keep); got {tuple(keep.shape)}")
            if bool(keep.all()):
                continue
            label = "head_means" if name == "head" else "mlp_means"
            if means is None or tuple(means.shape) != (*shape, D):
                got = None if means is None else tuple(means.shape)
                raise ValueError(f"{label} must be given as {(*shape, D)} when a component is dropped; got {got}")
            drop = ~keep
            comp = parts()                                                  # (B, L, H, D) or (B, L, D)
            delta = (comp[:, drop] - means.to(comp)[drop]).sum(dim=1)
            out = out - delta
        return out
