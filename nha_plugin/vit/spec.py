"""What the CLIP-ViT decomposition reads from a model: every weight, as plain tensors.

:func:`vit_spec` reads an open_clip ``VisionTransformer`` (or a CLIP model holding one as ``.visual``) into a
:class:`ViTSpec`. Blocks of both open_clip block types are read: ``"default"`` (``nn.MultiheadAttention``)
and ``"custom"`` (open_clip's own ``Attention``). The module is recognised by its attributes, so this file
imports neither open_clip nor timm. Options that keep the residual stream a sum of per-head terms are read
(layer scale, per-head output scale, q/k LayerNorm, scaled-cosine attention); options that would mix heads
or tokens after the attention (an inner LayerNorm over the concatenated heads, a LayerNorm on the attention
output or MLP hidden layer, attentional pooling, average pooling) are refused with the reason.

Shapes: L layers, H heads of width d, W = H*d the residual width, M the MLP width, D the output width,
N = 1 + gh*gw tokens (the class token is token 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..spec import UnsupportedModelError

__all__ = ["ViTSpec", "ViTLayerSpec", "LayerNormSpec", "vit_spec", "UnsupportedModelError"]


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
        conv_weight: (W, 3, ph, pw) patch embedding (no bias, as in CLIP).
        class_embedding: (W,); positional_embedding: (N, W) at the native grid.
        ln_pre: LayerNorm before block 0 (None when the model has none); ln_post: the final LayerNorm (W,).
        proj: (W, D) output projection P, or None (then D = W).
        image_size: (height, width) the model takes; patch_size (ph, pw).
        module: the image tower the spec was read from (used only to check against the unmodified model).
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


# ---- reading open_clip modules -------------------------------------------------------------------------
def _two(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _scale_vector(module: nn.Module, width: int, ref: Tensor, where: str) -> Tensor:
    """A LayerScale's gain (W,), or ones for nn.Identity."""
    if isinstance(module, nn.Identity):
        return torch.ones(width, dtype=ref.dtype, device=ref.device)
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, Tensor) and gamma.shape == (width,):
        return gamma
    raise UnsupportedModelError(f"{where}: expected open_clip's LayerScale (a (W,) gamma) or nn.Identity; got "
                                f"{type(module).__name__}")


def _refuse_if_norm(module: Optional[nn.Module], where: str, why: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise UnsupportedModelError(f"{where} is {type(module).__name__}, not Identity: {why}. Build the model "
                                    "without that option to use nha_plugin.vit")


def _read_block(block: nn.Module, index: int, width: int) -> ViTLayerSpec:
    where = f"transformer.resblocks[{index}]"
    attn = getattr(block, "attn", None)
    if attn is None or getattr(attn, "in_proj_weight", None) is None:
        raise UnsupportedModelError(f"{where}: expected an attention module with a packed in_proj_weight (3W, W) "
                                    f"(nn.MultiheadAttention or open_clip Attention); got {type(attn).__name__}")
    W = width
    wqkv = attn.in_proj_weight
    if wqkv.shape != (3 * W, W):
        raise UnsupportedModelError(f"{where}.attn.in_proj_weight: expected {(3 * W, W)}; got {tuple(wqkv.shape)}")
    H = int(attn.num_heads)
    d = W // H
    bqkv = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(3 * W, dtype=wqkv.dtype,
                                                                                device=wqkv.device)
    q_norm = k_norm = logit_scale = None
    W_o = attn.out_proj.weight
    b_o = attn.out_proj.bias if attn.out_proj.bias is not None else torch.zeros(W, dtype=W_o.dtype,
                                                                                device=W_o.device)
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError(f"{where}.attn uses bias_k/bias_v or add_zero_attn (extra key/value "
                                        "tokens); CLIP never does and the decomposition does not model them")
    else:
        _refuse_if_norm(getattr(attn, "ln_inner", None), f"{where}.attn.ln_inner (inner_norm / scale_attn_inner)",
                        "a LayerNorm over the concatenated heads mixes heads, so per-head terms do not add up")
        if not isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity):
            q_norm = LayerNormSpec.from_module(attn.ln_q, d, f"{where}.attn.ln_q")
            k_norm = LayerNormSpec.from_module(attn.ln_k, d, f"{where}.attn.ln_k")
        if getattr(attn, "logit_scale", None) is not None:
            # the model clamps before exponentiating; reproduce both from the parameter
            logit_scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp().reshape(H)
        if getattr(attn, "head_scale", None) is not None:
            # a per-head output scale is linear: fold it into that head's columns of W_o
            W_o = W_o * attn.head_scale.reshape(H, 1).expand(H, d).reshape(1, W)
    _refuse_if_norm(getattr(block, "ln_attn", None), f"{where}.ln_attn (scale_attn)",
                    "a LayerNorm on the attention output mixes heads and tokens' shares")
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(f"{where} is a cross-attention block; an image tower's blocks self-attend")
    mlp = block.mlp
    _refuse_if_norm(getattr(mlp, "ln", None), f"{where}.mlp.ln (scale_fc)",
                    "a LayerNorm on the MLP hidden layer makes neurons' outputs depend on each other")
    act = getattr(mlp, "gelu", None)
    if act is None or not hasattr(mlp, "c_fc") or not hasattr(mlp, "c_proj"):
        raise UnsupportedModelError(f"{where}.mlp: expected open_clip's MLP (c_fc, gelu, c_proj); got "
                                    f"{list(dict(mlp.named_children()))}")
    c_fc, c_proj = mlp.c_fc, mlp.c_proj
    zeros = lambda n: torch.zeros(n, dtype=wqkv.dtype, device=wqkv.device)  # noqa: E731
    return ViTLayerSpec(
        ln_1=LayerNormSpec.from_module(block.ln_1, W, f"{where}.ln_1"),
        W_q=wqkv[:W].view(H, d, W), W_k=wqkv[W:2 * W].view(H, d, W), W_v=wqkv[2 * W:].view(H, d, W),
        b_q=bqkv[:W].view(H, d), b_k=bqkv[W:2 * W].view(H, d), b_v=bqkv[2 * W:].view(H, d),
        W_o=W_o, b_o=b_o, ls_1=_scale_vector(block.ls_1, W, wqkv, f"{where}.ls_1"),
        ln_2=LayerNormSpec.from_module(block.ln_2, W, f"{where}.ln_2"),
        c_fc=c_fc.weight, c_fc_bias=c_fc.bias if c_fc.bias is not None else zeros(c_fc.weight.shape[0]),
        activation=act,
        c_proj=c_proj.weight, c_proj_bias=c_proj.bias if c_proj.bias is not None else zeros(W),
        ls_2=_scale_vector(block.ls_2, W, wqkv, f"{where}.ls_2"),
        q_norm=q_norm, k_norm=k_norm, logit_scale=logit_scale)


def _image_tower(model: Union[nn.Module, ViTSpec]) -> nn.Module:
    visual = getattr(model, "visual", model)
    if hasattr(visual, "attnpool") or type(visual).__name__ in ("ModifiedResNet", "ResNet"):
        raise UnsupportedModelError(
            f"expected a CLIP-ViT (open_clip VisionTransformer); got {type(visual).__name__}, a CLIP-ResNet: use "
            "nha_plugin.decompose(model, images) / nha_plugin.NeuronHeadAttribution for CLIP-ResNets")
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")
    missing = [a for a in needed if not hasattr(visual, a)]
    if missing:
        raise UnsupportedModelError(
            f"expected an open_clip VisionTransformer (or a CLIP model whose .visual is one); got "
            f"{type(visual).__name__} without {', '.join(missing)}. Load the model with open_clip or "
            "nha_plugin.load_clip")
    return visual


def vit_spec(model: Union[nn.Module, ViTSpec]) -> ViTSpec:
    """Read a CLIP-ViT's image tower into a :class:`ViTSpec` (tensors are the model's own parameters).

    Args:
        model: an open_clip CLIP model with a ViT image tower, the tower itself (``model.visual``), or a
            ViTSpec (returned unchanged).

    Returns:
        ViTSpec.

    Raises:
        UnsupportedModelError: for CLIP-ResNets, attentional pooling, pool types other than the class token,
            active patch dropout or dropout (train mode), and the head-mixing options listed in the module doc.
    """
    if isinstance(model, ViTSpec):
        return model
    visual = _image_tower(model)
    name = type(visual).__name__
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{name} uses attentional pooling (CoCa-style attn_pool); the decomposition "
                                    "covers class-token pooling only")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"{name} pools with pool_type={visual.pool_type!r}; only 'tok' (the class "
                                    "token, as in CLIP) is supported")
    if visual.training:
        active = [n for n, m in visual.named_modules()
                  if (isinstance(m, nn.Dropout) and m.p > 0) or (hasattr(m, "prob") and m.prob > 0)
                  or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)]
        if active:
            raise UnsupportedModelError(f"{name} is in train mode with active dropout/patch dropout "
                                        f"({', '.join(active[:3])}): call model.eval() before decomposing")
    W = visual.class_embedding.shape[0]
    conv = visual.conv1
    if getattr(conv, "bias", None) is not None:
        raise UnsupportedModelError("visual.conv1 has a bias; CLIP's patch embedding has none")
    ln_pre = None if isinstance(visual.ln_pre, nn.Identity) else LayerNormSpec.from_module(visual.ln_pre, W, "ln_pre")
    blocks = [_read_block(b, i, W) for i, b in enumerate(visual.transformer.resblocks)]
    if not blocks:
        raise UnsupportedModelError(f"{name} has no residual blocks")
    spec = ViTSpec(
        blocks=blocks, conv_weight=conv.weight, class_embedding=visual.class_embedding,
        positional_embedding=visual.positional_embedding, ln_pre=ln_pre,
        ln_post=LayerNormSpec.from_module(visual.ln_post, W, "ln_post"), proj=getattr(visual, "proj", None),
        image_size=_two(visual.image_size), patch_size=_two(conv.kernel_size), module=visual)
    if spec.positional_embedding.shape != (spec.tokens, W):
        raise UnsupportedModelError(f"positional_embedding is {tuple(spec.positional_embedding.shape)}; expected "
                                    f"{(spec.tokens, W)} for a {spec.grid} grid plus the class token")
    return spec


def select_layers(spec: ViTSpec, layers: Optional[Sequence[int]]) -> tuple[int, ...]:
    """Validate a layer subset (None = all layers) and return it sorted, negative indices resolved."""
    L = spec.layers
    if layers is None:
        return tuple(range(L))
    out = sorted({int(i) + L if int(i) < 0 else int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < L]
    if bad:
        raise ValueError(f"layers {list(layers)} out of range: the model has L={L} layers (0..{L - 1})")
    return tuple(out)
