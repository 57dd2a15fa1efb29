"""Reading an open_clip ``VisionTransformer`` (or a CLIP model holding one as ``.visual``) into a ViTSpec.

Blocks of both open_clip block types are read: ``"default"`` (``nn.MultiheadAttention``) and ``"custom"``
(open_clip's own ``Attention``). The module is recognised by its attributes, so this file does not import
open_clip. Options that keep the residual stream a sum of per-head terms are read (layer scale, per-head output
scale, q/k LayerNorm, scaled-cosine attention); options that would mix heads or tokens after the attention (an
inner LayerNorm over the concatenated heads, a LayerNorm on the attention output or MLP hidden layer, attentional
pooling, average pooling) are refused with the reason.
"""
from __future__ import annotations

import torch
from torch import nn

from .structure import (LayerNormSpec, UnsupportedModelError, ViTLayerSpec, ViTSpec, bias_or_zeros, pair,
                        refuse_if_norm, scale_vector)

__all__ = ["matches", "read"]

NEEDED = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post")


def matches(model: nn.Module) -> bool:
    """Whether ``model`` (or its ``.visual``) looks like open_clip's VisionTransformer."""
    visual = getattr(model, "visual", model)
    return all(hasattr(visual, a) for a in NEEDED)


def _read_attention(attn: nn.Module, where: str, W: int) -> dict:
    """The per-head attention weights of ``nn.MultiheadAttention`` or open_clip's ``Attention``."""
    if attn is None or getattr(attn, "in_proj_weight", None) is None:
        raise UnsupportedModelError(f"{where}: expected an attention module with a packed in_proj_weight (3W, W) "
                                    f"(nn.MultiheadAttention or open_clip Attention); got {type(attn).__name__}")
    wqkv = attn.in_proj_weight
    if wqkv.shape != (3 * W, W):
        raise UnsupportedModelError(f"{where}.attn.in_proj_weight: expected {(3 * W, W)}; got {tuple(wqkv.shape)}")
    H = int(attn.num_heads)
    d = W // H
    bqkv = bias_or_zeros(attn.in_proj_bias, 3 * W, wqkv)
    out = dict(q_norm=None, k_norm=None, logit_scale=None, W_o=attn.out_proj.weight,
               b_o=bias_or_zeros(attn.out_proj.bias, W, wqkv))
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError(f"{where}.attn uses bias_k/bias_v or add_zero_attn (extra key/value "
                                        "tokens); CLIP never does and the decomposition does not model them")
    else:
        refuse_if_norm(getattr(attn, "ln_inner", None), f"{where}.attn.ln_inner (inner_norm / scale_attn_inner)",
                       "a LayerNorm over the concatenated heads mixes heads, so per-head terms do not add up")
        if not isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity):
            out["q_norm"] = LayerNormSpec.from_module(attn.ln_q, d, f"{where}.attn.ln_q")
            out["k_norm"] = LayerNormSpec.from_module(attn.ln_k, d, f"{where}.attn.ln_k")
        if getattr(attn, "logit_scale", None) is not None:
            # the model clamps before exponentiating; reproduce both from the parameter
            out["logit_scale"] = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp().reshape(H)
        if getattr(attn, "head_scale", None) is not None:
            # a per-head output scale is linear: fold it into that head's columns of W_o
            out["W_o"] = out["W_o"] * attn.head_scale.reshape(H, 1).expand(H, d).reshape(1, W)
    return dict(out, W_q=wqkv[:W].view(H, d, W), W_k=wqkv[W:2 * W].view(H, d, W), W_v=wqkv[2 * W:].view(H, d, W),
                b_q=bqkv[:W].view(H, d), b_k=bqkv[W:2 * W].view(H, d), b_v=bqkv[2 * W:].view(H, d))


def _read_block(block: nn.Module, index: int, W: int) -> ViTLayerSpec:
    where = f"transformer.resblocks[{index}]"
    attn = _read_attention(getattr(block, "attn", None), where, W)
    refuse_if_norm(getattr(block, "ln_attn", None), f"{where}.ln_attn (scale_attn)",
                   "a LayerNorm on the attention output mixes heads and tokens' shares")
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(f"{where} is a cross-attention block; an image tower's blocks self-attend")
    mlp = block.mlp
    refuse_if_norm(getattr(mlp, "ln", None), f"{where}.mlp.ln (scale_fc)",
                   "a LayerNorm on the MLP hidden layer makes neurons' outputs depend on each other")
    act = getattr(mlp, "gelu", None)
    if act is None or not hasattr(mlp, "c_fc") or not hasattr(mlp, "c_proj"):
        raise UnsupportedModelError(f"{where}.mlp: expected open_clip's MLP (c_fc, gelu, c_proj); got "
                                    f"{list(dict(mlp.named_children()))}")
    c_fc, c_proj, ref = mlp.c_fc, mlp.c_proj, attn["W_q"]
    return ViTLayerSpec(
        ln_1=LayerNormSpec.from_module(block.ln_1, W, f"{where}.ln_1"), ls_1=scale_vector(block.ls_1, W, ref,
                                                                                           f"{where}.ls_1"),
        ln_2=LayerNormSpec.from_module(block.ln_2, W, f"{where}.ln_2"),
        c_fc=c_fc.weight, c_fc_bias=bias_or_zeros(c_fc.bias, c_fc.weight.shape[0], ref), activation=act,
        c_proj=c_proj.weight, c_proj_bias=bias_or_zeros(c_proj.bias, W, ref),
        ls_2=scale_vector(block.ls_2, W, ref, f"{where}.ls_2"), **attn)


def read(model: nn.Module) -> ViTSpec:
    """An open_clip CLIP-ViT (whole model or ``model.visual``) as a :class:`ViTSpec` of its own parameters.

    Raises:
        UnsupportedModelError: attentional pooling, pool types other than the class token, a patch bias, and
            the head-mixing options listed in the module doc.
    """
    visual = getattr(model, "visual", model)
    name = type(visual).__name__
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{name} uses attentional pooling (CoCa-style attn_pool); the decomposition "
                                    "covers class-token pooling only")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"{name} pools with pool_type={visual.pool_type!r}; only 'tok' (the class "
                                    "token, as in CLIP) is supported")
    W = visual.class_embedding.shape[0]
    conv = visual.conv1
    if getattr(conv, "bias", None) is not None:
        raise UnsupportedModelError("visual.conv1 has a bias; CLIP's patch embedding has none")
    ln_pre = None if isinstance(visual.ln_pre, nn.Identity) else LayerNormSpec.from_module(visual.ln_pre, W, "ln_pre")
    resblocks = visual.transformer.resblocks
    return ViTSpec(
        blocks=[_read_block(b, i, W) for i, b in enumerate(resblocks)], conv_weight=conv.weight,
        class_embedding=visual.class_embedding, positional_embedding=visual.positional_embedding, ln_pre=ln_pre,
        ln_post=LayerNormSpec.from_module(visual.ln_post, W, "ln_post"), proj=getattr(visual, "proj", None),
        image_size=pair(visual.image_size), patch_size=pair(conv.kernel_size), module=visual,
        block_modules=tuple(resblocks), library="open_clip")
