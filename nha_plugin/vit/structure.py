"""The common form every CLIP-ViT reader produces, and the pieces the readers share.

:class:`ViTSpec` holds a CLIP-ViT image tower's weights as plain tensors (the model's own parameters or views of
them), whatever library built the model; :mod:`nha_plugin.vit.spec` reads a model into one (open_clip,
transformers and timm each have a reader module). Readers share: reading a LayerNorm (:meth:`LayerNormSpec.
from_module`) or a layer scale (:func:`scale_vector`), refusing a head-mixing option (:func:`refuse_if_norm`),
folding a bias after the output projection into LN_post's shift (:func:`fold_output_bias`), the train-mode
check (:func:`check_eval_mode`) and :class:`LibraryTower`, the face a transformers or timm model shows the rest
of the package (its own forward, its blocks).

Shapes: L layers, H heads of width d, W = H*d the residual width, M the MLP width, D the output width,
N = 1 + gh*gw tokens (the class token is token 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..spec import UnsupportedModelError

__all__ = ["LayerNormSpec", "ViTLayerSpec", "ViTSpec", "LibraryTower", "UnsupportedModelError", "pair",
           "scale_vector", "refuse_if_norm", "bias_or_zeros", "fold_patch_bias", "fold_output_bias",
           "stochastic_modules", "check_eval_mode"]


@dataclass
class LayerNormSpec:
    """A LayerNorm over the last axis: ``gamma * (x - mean) / std + beta`` with ``std = sqrt(var + eps)``.

    Attributes:
        gamma: (n,) gain (ones when the norm has no affine parameters).
        beta: (n,) shift (zeros when absent).
        eps: the variance floor.
    """

    gamma: Tensor
    beta: Tensor
    eps: float

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std (``sqrt(var + eps)``, biased variance) of ``x`` over its last axis, each ``x.shape[:-1]``."""
        mean = x.mean(dim=-1)
        var = (x - mean[..., None]).pow(2).mean(dim=-1)
        return mean, torch.sqrt(var + self.eps)

    def normalize(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """``gamma * (x - mean) / std + beta`` with given statistics (frozen or not), same shape as ``x``."""
        return (x - mean[..., None]) / std[..., None] * self.gamma + self.beta

    def __call__(self, x: Tensor) -> Tensor:
        return self.normalize(x, *self.stats(x))

    @classmethod
    def from_module(cls, module: nn.Module, width: int, where: str) -> "LayerNormSpec":
        if not isinstance(module, nn.LayerNorm):
            raise UnsupportedModelError(f"{where}: expected an nn.LayerNorm; got {type(module).__name__}. Only "
                                        "LayerNorm is supported there (its per-token statistics can be frozen)")
        if tuple(module.normalized_shape) != (width,):
            raise UnsupportedModelError(f"{where}: expected a LayerNorm over {width} features; got "
                                        f"normalized_shape={tuple(module.normalized_shape)}")
        ref = next((p for p in (module.weight, module.bias) if p is not None), None)
        kw = dict(dtype=ref.dtype, device=ref.device) if ref is not None else {}
        gamma = module.weight if module.weight is not None else torch.ones(width, **kw)
        beta = module.bias if module.bias is not None else torch.zeros(width, **kw)
        return cls(gamma=gamma, beta=beta, eps=float(module.eps))


@dataclass
class ViTLayerSpec:
    """One residual block: ``x_mid = x + ls_1 * attn(ln_1(x))``; ``x_out = x_mid + ls_2 * mlp(ln_2(x_mid))``.

    Attributes:
        ln_1, ln_2: the block's LayerNorms (W,).
        W_q, W_k, W_v: (H, d, W) per-head projections; ``b_q``, ``b_k``, ``b_v``: (H, d).
        W_o: (W, H*d) output projection (columns h*d:(h+1)*d belong to head h; a per-head output scale, when
            the model has one, is folded in); ``b_o``: (W,).
        ls_1, ls_2: (W,) layer scales (ones when the block has none).
        c_fc: (M, W), ``c_fc_bias`` (M,); ``activation``: elementwise callable; ``c_proj``: (W, M),
            ``c_proj_bias`` (W,).
        q_norm, k_norm: LayerNorms over d applied per head to queries/keys (None when absent).
        logit_scale: (H,) multiplier of cosine attention logits (scaled-cosine attention), None for the
            usual ``q.k / sqrt(d)``.
    """

    ln_1: LayerNormSpec
    W_q: Tensor
    W_k: Tensor
    W_v: Tensor
    b_q: Tensor
    b_k: Tensor
    b_v: Tensor
    W_o: Tensor
    b_o: Tensor
    ls_1: Tensor
    ln_2: LayerNormSpec
    c_fc: Tensor
    c_fc_bias: Tensor
    activation: Callable[[Tensor], Tensor]
    c_proj: Tensor
    c_proj_bias: Tensor
    ls_2: Tensor
    q_norm: Optional[LayerNormSpec] = None
    k_norm: Optional[LayerNormSpec] = None
    logit_scale: Optional[Tensor] = None

    @property
    def heads(self) -> int:
        return self.W_q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W_q.shape[1]

    @property
    def W_o_heads(self) -> Tensor:
        """W_o split per head, (H, W, d): ``W_o_heads[h] @ o_h`` is head h's output."""
        H, d = self.heads, self.head_dim
        return self.W_o.view(self.W_o.shape[0], H, d).permute(1, 0, 2)

    def mlp(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """MLP on already-normalised inputs (..., W): returns (post-activation hidden (..., M), output (..., W))."""
        hidden = self.activation(x @ self.c_fc.T + self.c_fc_bias)
        return hidden, hidden @ self.c_proj.T + self.c_proj_bias


@dataclass
class ViTSpec:
    """Weights of a CLIP-ViT image tower.

    Attributes:
        blocks: the L :class:`ViTLayerSpec` in order.
        conv_weight: (W, 3, ph, pw) patch embedding (no bias, as in CLIP; a patch bias is folded into the
            patch rows of the positional embedding).
        class_embedding: (W,); positional_embedding: (N, W) at the native grid.
        ln_pre: LayerNorm before block 0 (None when the model has none); ln_post: the final LayerNorm (W,)
            (a bias after the projection, when the model has one, is folded into its shift).
        proj: (W, D) output projection P, or None (then D = W).
        image_size: (height, width) the model takes; patch_size (ph, pw).
        module: the image tower the spec was read from (used only to check against the unmodified model):
            open_clip's ``VisionTransformer`` itself, or a :class:`LibraryTower` whose forward is the library's
            own image embedding.
        block_modules: the model's L residual block modules, in order (where a Captum layer or a hook goes).
        library: which library built the model: "open_clip", "transformers" or "timm".
    """

    blocks: list
    conv_weight: Tensor
    class_embedding: Tensor
    positional_embedding: Tensor
    ln_pre: Optional[LayerNormSpec]
    ln_post: LayerNormSpec
    proj: Optional[Tensor]
    image_size: tuple
    patch_size: tuple
    module: Optional[nn.Module] = field(default=None, repr=False)
    class_index: int = 0
    block_modules: tuple = field(default=(), repr=False)
    library: str = "open_clip"

    @property
    def layers(self) -> int:
        """L, the number of residual blocks."""
        return len(self.blocks)

    num_layers = layers

    @property
    def heads(self) -> int:
        return self.blocks[0].heads

    num_heads = heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].head_dim

    @property
    def width(self) -> int:
        return self.class_embedding.shape[0]

    @property
    def mlp_width(self) -> int:
        return self.blocks[0].c_fc.shape[0]

    @property
    def output_dim(self) -> int:
        return self.proj.shape[1] if self.proj is not None else self.width

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def tokens(self) -> int:
        gh, gw = self.grid
        return 1 + gh * gw

    @property
    def dtype(self) -> torch.dtype:
        return self.class_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.class_embedding.device

    def output_projection(self) -> Tensor:
        """P as a (W, D) matrix (the identity when the model has no projection)."""
        if self.proj is not None:
            return self.proj
        return torch.eye(self.width, dtype=self.dtype, device=self.device)


# ---- shared by the readers ----------------------------------------------------------------------------------
def pair(v) -> tuple[int, int]:
    """An int or a pair as an (int, int) pair."""
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def bias_or_zeros(bias: Optional[Tensor], n: int, ref: Tensor) -> Tensor:
    """``bias`` (n,), or zeros like ``ref`` when the layer has none."""
    return bias if bias is not None else torch.zeros(n, dtype=ref.dtype, device=ref.device)


def scale_vector(module: nn.Module, width: int, ref: Tensor, where: str) -> Tensor:
    """A layer scale's gain (W,) (open_clip's and timm's ``LayerScale`` keep it as ``gamma``), or ones for
    nn.Identity."""
    if isinstance(module, nn.Identity):
        return torch.ones(width, dtype=ref.dtype, device=ref.device)
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, Tensor) and gamma.shape == (width,):
        return gamma
    raise UnsupportedModelError(f"{where}: expected a LayerScale (a (W,) gamma) or nn.Identity; got "
                                f"{type(module).__name__}")


def refuse_if_norm(module: Optional[nn.Module], where: str, why: str) -> None:
    """Refuse an optional module that is present (not None, not nn.Identity), saying why it breaks additivity."""
    if module is not None and not isinstance(module, nn.Identity):
        raise UnsupportedModelError(f"{where} is {type(module).__name__}, not Identity: {why}. Build the model "
                                    "without that option to use nha_plugin.vit")


def fold_patch_bias(positional: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The positional embedding (N, W) with a patch-embedding bias (W,) added to its patch rows (1..N-1).

    The bias is the same at every patch, so it is part of each patch token's constant, like its position; the
    class token (row 0) gets none. Without a bias the embedding itself is returned."""
    if bias is None:
        return positional
    return torch.cat([positional[:1], positional[1:] + bias], dim=0)


def fold_output_bias(ln_post: LayerNormSpec, proj: Tensor, bias: Optional[Tensor], where: str) -> LayerNormSpec:
    """LN_post with a bias b after the projection folded into its shift: ``beta' P = beta P + b``.

    The decomposition splits LN_post's shift over the components by their shares (docs/methods.md §2); a
    constant added after P is split the same way once it is written as a shift, which needs b in the row
    space of P (W >= D and P of full rank, as in every CLIP head). A zero bias changes nothing.

    Args:
        ln_post: the final LayerNorm's spec (W,); proj: P (W, D); bias: (D,) or None.
        where: the bias's name, for errors.

    Returns:
        the LayerNormSpec to use (``ln_post`` itself when there is nothing to fold).

    Raises:
        UnsupportedModelError: b is not of the form s P (it cannot be written as a shift before P).
    """
    if bias is None or not bool((bias != 0).any()):
        return ln_post
    with torch.no_grad():
        P, b = proj.double(), bias.double()
        shift = torch.linalg.lstsq(P.T, b[:, None]).solution[:, 0]            # (W,) minimum-norm s with s P = b
        residual = float((shift @ P - b).norm() / b.norm())
    if residual > 1e-12:
        raise UnsupportedModelError(
            f"{where} is non-zero and the projection ({P.shape[0]} -> {P.shape[1]}) cannot carry it as a shift "
            f"before it (relative residual {residual:.1e}); the decomposition has no term for a bias after the "
            "projection. Decompose the embedding before the head (a model without the bias), or use a head with "
            "at most as many outputs as the residual width")
    return LayerNormSpec(gamma=ln_post.gamma, beta=ln_post.beta + shift.to(ln_post.beta), eps=ln_post.eps)


def stochastic_modules(module: nn.Module) -> list[str]:
    """Names of the sub-modules that draw random numbers in their current mode: dropout (torch's, timm's
    ``DropPath``/``PatchDropout``, open_clip's ``PatchDropout``, the float ``dropout`` of nn.MultiheadAttention
    and transformers' attention) in training mode with a non-zero rate."""
    out = []
    # a LibraryTower's modules are named as in the library's model, not through the wrapper
    parts = module.parts.values() if isinstance(module, LibraryTower) else [module]
    for name, m in (item for part in parts for item in part.named_modules()):
        if not m.training:
            continue
        kind = type(m).__name__
        rates = [getattr(m, "dropout", 0.0)] + [getattr(m, attr, 0.0) for attr, marker in
                                                 (("p", "Dropout"), ("drop_prob", "DropPath"), ("prob", "PatchDropout"))
                                                 if marker in kind]
        if any(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates):
            out.append(name or kind)
    return out


def check_eval_mode(module: Optional[nn.Module], name: str) -> None:
    """Refuse a model whose dropout is active: its own forward is random and batch-dependent, so neither the
    decomposition (computed without dropout) nor a completeness check against that forward would mean anything.
    The caller's modes are left as they are.

    Raises:
        UnsupportedModelError: naming the first active modules and saying to call ``model.eval()``.
    """
    active = stochastic_modules(module) if module is not None else []
    if active:
        raise UnsupportedModelError(
            f"{name} is in training mode with active dropout ({', '.join(active[:3])}"
            f"{', ...' if len(active) > 3 else ''}): its outputs would be random and depend on the batch. Call "
            "model.eval() before decomposing (nha_plugin leaves the model's mode to you)")


class LibraryTower(nn.Module):
    """A transformers or timm CLIP-ViT image tower behind the face the package expects of ``ViTSpec.module``.

    ``tower(images)`` is the library's own image embedding (B, D), computed by the library's modules;
    ``blocks`` are its residual blocks, also reachable as ``transformer.resblocks`` (open_clip's names, which
    code written for open_clip reaches for). The library's modules are held, not copied or changed: the
    tower's parameters are the model's own, and their modes stay the caller's.

    Args:
        parts: the library modules the embedding needs (e.g. ``{"vision_model": ..., "projection": ...}``).
        embed: ``embed(parts, images) -> (B, D)``, the library's forward from those modules.
        blocks: the residual block modules, in order.
        library: "transformers" or "timm".
    """

    def __init__(self, parts: dict, embed: Callable, blocks, library: str):
        super().__init__()
        self.parts = nn.ModuleDict({k: v for k, v in parts.items() if v is not None})
        self.embed = embed
        self.library = library
        # a plain namespace, not a registered module: the blocks are registered once, inside ``parts``
        self.transformer = SimpleNamespace(resblocks=blocks)
        # the wrapper's own flag only (train()/eval() would reach the caller's modules); dropout is checked on
        # the library's modules (check_eval_mode)
        self.training = False

    @property
    def blocks(self):
        """The library's residual blocks (an nn.ModuleList or nn.Sequential), in order."""
        return self.transformer.resblocks

    def forward(self, images: Tensor) -> Tensor:
        """The library's image embedding (B, D) of preprocessed images (B, 3, H, W)."""
        return self.embed(self.parts, images)
