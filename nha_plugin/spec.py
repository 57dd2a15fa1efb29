"""What an adapter hands the decomposition: the attention pool's weights and a way to reach layer4.

The core never imports open_clip, timm or clip. Each adapter reads a model into an
:class:`AttentionPoolSpec`; everything downstream works on the spec alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["AttentionPoolSpec", "UnsupportedModelError", "TrainingModeError", "pool_weights_from_module"]


class UnsupportedModelError(TypeError):
    """Raised when no adapter recognises a model."""


class TrainingModeError(ValueError):
    """Raised when a model is decomposed in training mode: BatchNorm would use the batch's statistics (another
    function than the model's eval output) and overwrite the caller's running statistics. Call ``model.eval()``."""


@dataclass
class AttentionPoolSpec:
    """Weights of a CLIP-ResNet ``AttentionPool2d`` plus a callable that runs the trunk.

    Shapes (C = neurons into the pool, D = embedding width, T = h*w + 1 tokens):

    - ``q_weight``, ``k_weight``, ``v_weight``: ``(C, C)``; biases ``(C,)``
    - ``c_weight``: ``(D, C)``; ``c_bias``: ``(D,)``
    - ``positional_embedding``: ``(T, C)`` at the native grid ``grid_size``
    - ``trunk``: images ``(B, 3, S, S)`` -> layer4 output ``(B, C, h, w)`` (post-ReLU)
    - ``pool``: the model's own attention-pool forward, ``(B, C, h, w) -> (B, D)``; used only to check
      completeness against the unmodified model. ``pool_resizes`` says whether it accepts other grids than
      the native one (timm's does; open_clip's and OpenAI's do not).
    """

    q_weight: Tensor
    q_bias: Tensor
    k_weight: Tensor
    k_bias: Tensor
    v_weight: Tensor
    v_bias: Tensor
    c_weight: Tensor
    c_bias: Tensor
    positional_embedding: Tensor
    num_heads: int
    trunk: Callable[[Tensor], Tensor]
    pool: Optional[Callable[[Tensor], Tensor]] = None
    image_size: Optional[int] = None
    trunk_module: Optional[nn.Module] = None
    layer4: Optional[nn.Module] = None
    source: str = "unknown"
    pool_resizes: bool = False
    extra: dict = field(default_factory=dict)
    WEIGHT_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "c_weight", "c_bias",
                "positional_embedding")

    def __post_init__(self) -> None:
        C = self.q_weight.shape[1]
        if self.q_weight.shape != (C, C) or self.k_weight.shape != (C, C) or self.v_weight.shape != (C, C):
            raise ValueError(
                f"q/k/v weights must be square (C, C); got {tuple(self.q_weight.shape)}, "
                f"{tuple(self.k_weight.shape)}, {tuple(self.v_weight.shape)}")
        if self.c_weight.shape[1] != C:
            raise ValueError(f"c_proj weight must be (D, {C}); got {tuple(self.c_weight.shape)}")
        if C % self.num_heads:
            raise ValueError(f"{C} channels do not split into {self.num_heads} heads")
        if self.positional_embedding.shape[1] != C:
            raise ValueError(f"positional embedding must be (T, {C}); got {tuple(self.positional_embedding.shape)}")
        grid = round((self.positional_embedding.shape[0] - 1) ** 0.5)
        if grid * grid + 1 != self.positional_embedding.shape[0]:
            raise ValueError("positional embedding must have h*w + 1 rows for a square grid")

    def detached(self) -> "AttentionPoolSpec":
        """The same spec with weights detached from autograd (views, no copies)."""
        return replace(self, **{n: getattr(self, n).detach() for n in self.WEIGHT_NAMES})

    @property
    def num_neurons(self) -> int:
        """C, the channels of layer4 that enter the pool."""
        return self.q_weight.shape[1]

    @property
    def head_dim(self) -> int:
        return self.num_neurons // self.num_heads

    @property
    def output_dim(self) -> int:
        """D, the width of the image embedding."""
        return self.c_weight.shape[0]

    @property
    def grid_size(self) -> int:
        return round((self.positional_embedding.shape[0] - 1) ** 0.5)

    @property
    def device(self) -> torch.device:
        return self.q_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q_weight.dtype


def _linear(module: nn.Module) -> tuple[Tensor, Tensor]:
    bias = module.bias if module.bias is not None else torch.zeros_like(module.weight[:, 0])
    return module.weight, bias


def pool_weights_from_module(pool: nn.Module) -> dict:
    """Read q/k/v/c weights, heads and positional embedding from any known attention-pool layout.

    Handles open_clip / OpenAI (``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``, ``positional_embedding``),
    timm (``q``/``k``/``v`` or fused ``qkv``, ``proj``, ``pos_embed``) and ``in_proj_weight`` fusions.
    Values are read from parameters, never from the module's forward, so a pool that calls
    ``scaled_dot_product_attention`` internally decomposes the same way.
    """
    wrapped = getattr(pool, "pool", None)
    if isinstance(wrapped, nn.Module) and hasattr(pool, "hook_pattern"):
        pool = wrapped  # a HookedAttentionPool: read the pool it wraps
    if all(hasattr(pool, n) for n in ("q_proj", "k_proj", "v_proj")):
        (qw, qb), (kw, kb), (vw, vb) = (_linear(getattr(pool, n)) for n in ("q_proj", "k_proj", "v_proj"))
    elif getattr(pool, "q", None) is not None and getattr(pool, "k", None) is not None:
        (qw, qb), (kw, kb), (vw, vb) = (_linear(getattr(pool, n)) for n in ("q", "k", "v"))
    elif getattr(pool, "qkv", None) is not None:
        w, b = _linear(pool.qkv)
        qw, kw, vw = w.chunk(3, dim=0)
        qb, kb, vb = b.chunk(3, dim=0)
    elif getattr(pool, "in_proj_weight", None) is not None:
        qw, kw, vw = pool.in_proj_weight.chunk(3, dim=0)
        b = pool.in_proj_bias if pool.in_proj_bias is not None else torch.zeros_like(pool.in_proj_weight[:, 0])
        qb, kb, vb = b.chunk(3, dim=0)
    else:
        raise UnsupportedModelError(
            f"attention pool {type(pool).__name__} has none of q_proj/k_proj/v_proj, q/k/v, qkv or in_proj_weight")
    C = qw.shape[1]
    if qw.shape[0] != C:
        raise UnsupportedModelError(
            f"attention pool {type(pool).__name__} projects {C} channels to {qw.shape[0]}; "
            "the decomposition needs the CLIP layout (embed_dim == in_features)")
    out = getattr(pool, "c_proj", None) or getattr(pool, "proj", None) or getattr(pool, "out_proj", None)
    if out is None or isinstance(out, nn.Identity):
        cw, cb = torch.eye(C, dtype=qw.dtype, device=qw.device), torch.zeros(C, dtype=qw.dtype, device=qw.device)
    else:
        cw, cb = _linear(out)
    pos = getattr(pool, "positional_embedding", None)
    if pos is None:
        pos = getattr(pool, "pos_embed", None)
    if pos is None:
        raise UnsupportedModelError(f"attention pool {type(pool).__name__} has no positional embedding")
    if getattr(pool, "cls_token", None) is not None:
        raise UnsupportedModelError(
            "attention pool with a learned class token is not the CLIP layout (mean token); not supported")
    heads = getattr(pool, "num_heads", None)
    if heads is None:
        raise UnsupportedModelError(f"attention pool {type(pool).__name__} does not say its num_heads")
    return dict(q_weight=qw, q_bias=qb, k_weight=kw, k_bias=kb, v_weight=vw, v_bias=vb,
                c_weight=cw, c_bias=cb, positional_embedding=pos.reshape(-1, C), num_heads=int(heads))
