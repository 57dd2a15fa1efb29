"""A CLIP-ViT forward pass computed from a :class:`~nha_plugin.vit.spec.ViTSpec`, keeping every intermediate.

:func:`trace` recomputes ``encode_image`` from the spec's tensors (never by calling the model's modules) and
records the residual stream, LayerNorm statistics, attention probabilities and MLP neurons of every block.
:func:`embed` and :func:`run_block` are the two steps it is made of; the decomposition streams through them
keeping only what it needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..images import check_image_batch
from .spec import ViTLayerSpec, ViTSpec, vit_spec
from .structure import check_eval_mode

__all__ = ["ViTTrace", "BlockOutput", "trace", "embed", "run_block", "validate_images"]


def validate_images(images: Tensor, spec: ViTSpec) -> None:
    """Raise a ValueError/TypeError that says what to do when ``images`` cannot go through the ViT."""
    check_image_batch(images, device=spec.device, dtype=spec.dtype)
    if tuple(images.shape[-2:]) != tuple(spec.image_size):
        raise ValueError(f"this ViT takes {spec.image_size[0]}x{spec.image_size[1]} images (its positional "
                         f"embedding has {spec.tokens} tokens); got {tuple(images.shape[-2:])}. Resize with the "
                         "model's preprocess")


def embed(spec: ViTSpec, images: Tensor) -> Tensor:
    """Patch + class + positional embedding, then ln_pre: the stream entering block 0, (B, N, W)."""
    patches = F.conv2d(images, spec.conv_weight, stride=spec.patch_size)            # (B, W, gh, gw)
    patches = patches.flatten(2).transpose(1, 2)                                    # (B, gh*gw, W)
    cls = spec.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + spec.positional_embedding.to(patches.dtype)
    return spec.ln_pre(x) if spec.ln_pre is not None else x


@dataclass
class BlockOutput:
    """Everything one block computes. Shapes: (B, N) statistics, (B, H, N, N) attention, (B, H, N, d) values,
    (B, N, M) hidden, (B, N, W) streams. ``attn_out`` is the attention branch after out_proj and ls_1 (what is
    added to the stream); ``mlp_out`` the MLP branch after ls_2."""

    ln1_mean: Tensor
    ln1_std: Tensor
    values: Tensor
    attn: Tensor
    attn_out: Tensor
    x_mid: Tensor
    ln2_mean: Tensor
    ln2_std: Tensor
    mlp_hidden: Tensor
    mlp_out: Tensor
    x_out: Tensor


def _per_head(normed: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(B, N, W) inputs through per-head weights (H, d, W) and biases (H, d): (B, H, N, d), as one matmul."""
    H, d, W = weight.shape
    out = normed @ weight.reshape(H * d, W).T + bias.reshape(H * d)
    return out.view(*normed.shape[:2], H, d).transpose(1, 2)


def attention_pattern(layer: ViTLayerSpec, normed: Tensor) -> Tensor:
    """Attention probabilities (B, H, N, N), rows = queries, from LayerNorm-1 outputs (B, N, W)."""
    q = _per_head(normed, layer.W_q, layer.b_q)
    k = _per_head(normed, layer.W_k, layer.b_k)
    if layer.logit_scale is not None:
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * layer.logit_scale.view(1, -1, 1, 1)
    else:
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    return torch.softmax(logits, dim=-1)


def run_block(layer: ViTLayerSpec, x: Tensor) -> BlockOutput:
    """One residual block on the stream ``x`` (B, N, W)."""
    m1, s1 = layer.ln_1.stats(x)
    normed = layer.ln_1.normalize(x, m1, s1)
    attn = attention_pattern(layer, normed)
    values = _per_head(normed, layer.W_v, layer.b_v)
    mixed = (attn @ values).transpose(1, 2).flatten(2)                              # (B, N, H*d)
    attn_out = (mixed @ layer.W_o.T + layer.b_o) * layer.ls_1
    x_mid = x + attn_out
    m2, s2 = layer.ln_2.stats(x_mid)
    hidden, mlp = layer.mlp(layer.ln_2.normalize(x_mid, m2, s2))
    mlp_out = mlp * layer.ls_2
    return BlockOutput(ln1_mean=m1, ln1_std=s1, values=values, attn=attn, attn_out=attn_out, x_mid=x_mid,
                       ln2_mean=m2, ln2_std=s2, mlp_hidden=hidden, mlp_out=mlp_out, x_out=x_mid + mlp_out)


def pool_and_project(spec: ViTSpec, x_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ln_post at the class token and the projection P: (mean (B,), std (B,), output (B, D))."""
    cls = x_out[:, spec.class_index]
    mean, std = spec.ln_post.stats(cls)
    pooled = spec.ln_post.normalize(cls, mean, std)
    return mean, std, (pooled @ spec.proj if spec.proj is not None else pooled)


@dataclass
class ViTTrace:
    """Every intermediate of one forward pass (lists are indexed by layer l = 0..L-1).

    Attributes:
        embedding: (B, N, W) stream entering block 0 (after ln_pre if present).
        x_in: L x (B, N, W) stream entering block l; ``x_out`` (B, N, W) after the last block.
        ln1_mean, ln1_std, ln2_mean, ln2_std: L x (B, N); std includes eps (``sqrt(var + eps)``).
        attn: L x (B, H, N, N) attention probabilities (rows = queries).
        x_mid: L x (B, N, W) stream after block l's attention residual.
        mlp_hidden: L x (B, N, M) post-activation MLP neurons.
        post_mean, post_std: (B,) ln_post statistics at the class token.
        output: (B, D) the image embedding, equal to ``model.encode_image(images)`` (unnormalised).
    """

    embedding: Tensor
    x_in: list
    ln1_mean: list
    ln1_std: list
    attn: list
    x_mid: list
    ln2_mean: list
    ln2_std: list
    mlp_hidden: list
    x_out: Tensor
    post_mean: Tensor
    post_std: Tensor
    output: Tensor

    @property
    def layers(self) -> int:
        return len(self.x_in)


def trace(spec, images: Tensor, grad: bool = False) -> ViTTrace:
    """Run the ViT from its spec and keep every intermediate.

    Args:
        spec: a :class:`ViTSpec`, or a model :func:`vit_spec` accepts.
        images: (B, 3, H, W) preprocessed, in the spec's dtype and device.
        grad: keep the autograd graph (off by default).

    Returns:
        ViTTrace. Memory: O(L * B * N * (3W + M + H*N)) values; for big models trace a few images at a time.
    """
    spec = vit_spec(spec)
    validate_images(images, spec)
    with torch.set_grad_enabled(grad):
        x = embed(spec, images)
        rec = {k: [] for k in ("x_in", "ln1_mean", "ln1_std", "attn", "x_mid", "ln2_mean", "ln2_std",
                               "mlp_hidden")}
        emb = x
        for layer in spec.blocks:
            out = run_block(layer, x)
            rec["x_in"].append(x)
            for k in ("ln1_mean", "ln1_std", "attn", "x_mid", "ln2_mean", "ln2_std", "mlp_hidden"):
                rec[k].append(getattr(out, k))
            x = out.x_out
        mean, std, output = pool_and_project(spec, x)
    return ViTTrace(embedding=emb, x_out=x, post_mean=mean, post_std=std, output=output, **rec)


def model_output(spec: ViTSpec, images: Tensor) -> Optional[Tensor]:
    """The unmodified image tower's own output on ``images`` (B, D), or None when the spec has no module.

    The one place the library's own forward runs (completeness checks compare against it): a model put in
    training mode with active dropout since its spec was read is refused here, as :func:`vit_spec` refuses it.
    """
    if spec.module is None:
        return None
    check_eval_mode(spec.module, type(spec.module).__name__)
    with torch.no_grad():
        out = spec.module(images)
    return out[0] if isinstance(out, tuple) else out
