"""Reading a timm ``VisionTransformer`` built as a CLIP image tower into a ViTSpec.

timm's CLIP towers (``vit_base_patch32_clip_224.openai`` and friends: ``pre_norm=True``, class-token pooling,
a ``head`` Linear holding CLIP's projection) compute::

    x = norm_pre(cat(cls_token, patch_embed(pixels)) + pos_embed)
    x = x + ls1(attn(norm1(x)));  x = x + ls2(mlp(norm2(x)))                 # per Block
    y = head(fc_norm(norm(x)[:, 0]))                                          # one of norm / fc_norm is a LayerNorm

with a packed ``qkv`` projection and the MLP's own activation module (GELU or QuickGELU). Read too: layer scale,
q/k LayerNorm, a patch-embedding bias and ``no_embed_class`` position embeddings (both constants folded into the
positional embedding), no ``norm_pre``, a head without projection (``num_classes=0``, D = W) and a head bias
(folded into LN_post's shift when the head has at most W outputs). Refused, each by name: register tokens, a
distillation token, pooling other than the class token (``avg``, ``map`` attention-pool heads, ...), no final
norm, RoPE / no position embedding, an embedding norm, LayerNorms inside the attention or MLP, gated attention,
and block, attention or MLP classes other than timm's ``Block`` / ``Attention`` / ``Mlp`` (parallel, post-norm
and SwiGLU blocks have another forward). The file does not import timm.
"""
from __future__ import annotations

from torch import Tensor, nn

from .structure import (LayerNormSpec, LibraryTower, UnsupportedModelError, ViTLayerSpec, ViTSpec, bias_or_zeros,
                        fold_output_bias, fold_patch_bias, pair, refuse_if_norm, scale_vector)

__all__ = ["matches", "read"]

NEEDED = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "fc_norm", "head", "global_pool")


def matches(model: nn.Module) -> bool:
    """Whether ``model`` looks like timm's VisionTransformer (its attributes, not its import)."""
    return all(hasattr(model, a) for a in NEEDED)


def _require_class(module: nn.Module, names: tuple, where: str, why: str) -> None:
    if type(module).__name__ not in names:
        raise UnsupportedModelError(f"{where} is {type(module).__name__}; nha_plugin reads timm's "
                                    f"{' / '.join(names)} ({why})")


def _read_block(block: nn.Module, index: int, W: int) -> ViTLayerSpec:
    where = f"blocks[{index}]"
    _require_class(block, ("Block",), where, "pre-norm, attention then MLP; post-norm and parallel blocks differ")
    attn, mlp = block.attn, block.mlp
    _require_class(attn, ("Attention",), f"{where}.attn", "RoPE and other variants change the attention")
    H, d = int(attn.num_heads), int(attn.head_dim)
    if H * d != W:
        raise UnsupportedModelError(f"{where}.attn has {H} heads of {d} = {H * d} features but the residual width "
                                    f"is {W}; only attn_head_dim = W / num_heads is supported")
    refuse_if_norm(getattr(attn, "norm", None), f"{where}.attn.norm (scale_attn_norm)",
                   "a LayerNorm over the concatenated heads mixes heads, so per-head terms do not add up")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where}.attn is gated (a sigmoid gate on the attention output): the gate "
                                    "multiplies heads by an image-dependent factor; build the model without it")
    _require_class(mlp, ("Mlp",), f"{where}.mlp", "fc1, activation, fc2; gated MLPs differ")
    refuse_if_norm(getattr(mlp, "norm", None), f"{where}.mlp.norm (scale_mlp_norm)",
                   "a LayerNorm on the MLP hidden layer makes neurons' outputs depend on each other")
    wqkv = attn.qkv.weight
    bqkv = bias_or_zeros(attn.qkv.bias, 3 * W, wqkv)
    q_norm = k_norm = None
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        q_norm = LayerNormSpec.from_module(attn.q_norm, d, f"{where}.attn.q_norm")
        k_norm = LayerNormSpec.from_module(attn.k_norm, d, f"{where}.attn.k_norm")
    return ViTLayerSpec(
        ln_1=LayerNormSpec.from_module(block.norm1, W, f"{where}.norm1"),
        W_q=wqkv[:W].view(H, d, W), W_k=wqkv[W:2 * W].view(H, d, W), W_v=wqkv[2 * W:].view(H, d, W),
        b_q=bqkv[:W].view(H, d), b_k=bqkv[W:2 * W].view(H, d), b_v=bqkv[2 * W:].view(H, d),
        W_o=attn.proj.weight, b_o=bias_or_zeros(attn.proj.bias, W, wqkv),
        ls_1=scale_vector(block.ls1, W, wqkv, f"{where}.ls1"),
        ln_2=LayerNormSpec.from_module(block.norm2, W, f"{where}.norm2"),
        c_fc=mlp.fc1.weight, c_fc_bias=bias_or_zeros(mlp.fc1.bias, mlp.fc1.weight.shape[0], wqkv),
        activation=mlp.act, c_proj=mlp.fc2.weight, c_proj_bias=bias_or_zeros(mlp.fc2.bias, W, wqkv),
        ls_2=scale_vector(block.ls2, W, wqkv, f"{where}.ls2"), q_norm=q_norm, k_norm=k_norm)


def _refuse_pooling(model: nn.Module, name: str) -> None:
    """Refuse every timm option that changes which tokens exist or how they are pooled."""
    if getattr(model, "reg_token", None) is not None:
        raise UnsupportedModelError(f"{name} has {model.reg_token.shape[1]} register tokens (reg_tokens); the "
                                    "decomposition's token layout is the class token then the patches")
    if model.cls_token is None:
        raise UnsupportedModelError(f"{name} has no class token (class_token=False, global_pool="
                                    f"{model.global_pool!r}); CLIP pools the class token")
    if hasattr(model, "dist_token") or getattr(model, "num_prefix_tokens", 1) != 1:
        raise UnsupportedModelError(f"{name} has {getattr(model, 'num_prefix_tokens', '?')} prefix tokens (a "
                                    "distillation token?); only the class token is supported")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"{name} pools with an attention-pool head (global_pool={model.global_pool!r}: "
                                    f"{type(model.attn_pool).__name__}); only class-token pooling is supported")
    if model.global_pool != "token":
        raise UnsupportedModelError(f"{name} pools with global_pool={model.global_pool!r}; only 'token' (the class "
                                    "token, as in CLIP) is supported: create the model with global_pool='token'")
    if model.pos_embed is None:
        raise UnsupportedModelError(f"{name} has no learned position embedding (pos_embed None, e.g. RoPE); the "
                                    "decomposition needs one added to the tokens")


def _final_norm(model: nn.Module, W: int, name: str) -> LayerNormSpec:
    """The one LayerNorm between the last block and the head: ``norm`` (all tokens) or ``fc_norm`` (the pooled
    class token); at the class token they are the same map."""
    present = [n for n in ("norm", "fc_norm") if not isinstance(getattr(model, n), nn.Identity)]
    if len(present) != 1:
        raise UnsupportedModelError(f"{name} has {'no final norm' if not present else 'both norm and fc_norm'}; "
                                    "CLIP's tower ends in one LayerNorm (create the model with final_norm=True)")
    return LayerNormSpec.from_module(getattr(model, present[0]), W, present[0])


def _embed(parts: nn.ModuleDict, images: Tensor) -> Tensor:
    """timm's own forward: forward_features then forward_head (pool, fc_norm, head)."""
    return parts["model"](images)


def read(model: nn.Module) -> ViTSpec:
    """A timm CLIP ``VisionTransformer`` as a :class:`ViTSpec` of its own parameters (or views of them).

    Returns:
        ViTSpec with ``library="timm"``; its module's forward is ``model(images)``.

    Raises:
        UnsupportedModelError: for the options the module doc lists.
    """
    name = type(model).__name__
    if name != "VisionTransformer":
        raise UnsupportedModelError(f"{name} is not timm's VisionTransformer; its subclasses change the forward "
                                    "(distillation, registers, ...) and are not read")
    _refuse_pooling(model, name)
    W = model.cls_token.shape[-1]
    pe = model.patch_embed
    _require_class(pe, ("PatchEmbed",), "patch_embed", "a strided convolution over patches")
    refuse_if_norm(getattr(pe, "norm", None), "patch_embed.norm (embed_norm_layer)",
                   "a LayerNorm on the patch embeddings is not a sum of per-patch constants")
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != tuple(conv.stride):
        raise UnsupportedModelError(f"patch_embed.proj: expected a Conv2d with stride = kernel; got {conv}")
    pos = model.pos_embed[0]                                                # (N, W), or (N - 1, W) without a cls row
    if model.no_embed_class:
        pos = nn.functional.pad(pos, (0, 0, 1, 0))                          # the class token gets no position
    blocks = model.blocks
    ln_post = _final_norm(model, W, name)
    head = model.head
    proj = None
    if isinstance(head, nn.Linear):
        proj = head.weight.T
        ln_post = fold_output_bias(ln_post, proj, head.bias, "head.bias")
    elif not isinstance(head, nn.Identity):
        raise UnsupportedModelError(f"head is {type(head).__name__}; expected an nn.Linear (CLIP's projection) or "
                                    "nn.Identity (num_classes=0)")
    ln_pre = None if isinstance(model.norm_pre, nn.Identity) else LayerNormSpec.from_module(model.norm_pre, W,
                                                                                            "norm_pre")
    return ViTSpec(
        blocks=[_read_block(b, i, W) for i, b in enumerate(blocks)], conv_weight=conv.weight,
        class_embedding=model.cls_token[0, 0], positional_embedding=fold_patch_bias(pos, conv.bias),
        ln_pre=ln_pre, ln_post=ln_post, proj=proj, image_size=pair(pe.img_size), patch_size=pair(conv.kernel_size),
        module=LibraryTower({"model": model}, _embed, blocks, "timm"), block_modules=tuple(blocks), library="timm")
