"""Reading a Hugging Face transformers CLIP image tower into a ViTSpec.

Accepted: ``CLIPModel`` (its ``vision_model`` and ``visual_projection``), ``CLIPVisionModelWithProjection``, and
``CLIPVisionModel`` (no projection: D = W, or pass ``projection=``, e.g. a ``CLIPModel``'s ``visual_projection``).
transformers' CLIP tower is open_clip's with other names::

    x = pre_layrnorm(embeddings(pixels))                      # class token + patches + position_embedding
    x = x + self_attn(layer_norm1(x));  x = x + mlp(layer_norm2(x))          # per CLIPEncoderLayer
    y = visual_projection(post_layernorm(x[:, 0]))

with separate q/k/v projections, scaling ``head_dim ** -0.5`` and the activation ``config.hidden_act``
(``quick_gelu`` for OpenAI's weights). Other encoders behind the same attribute names (SigLIP's attention-pool
head, CLIPSeg, Chinese-CLIP, ...) are refused by their layer class, since their forward has not been checked.

The spec's ``module`` is a :class:`~nha_plugin.vit.structure.LibraryTower` whose forward is transformers' own
``projection(vision_model(pixel_values).pooler_output)``, what ``CLIPModel.get_image_features`` and
``CLIPVisionModelWithProjection(...).image_embeds`` return. The file does not import transformers.

Precision: transformers' "eager" attention takes its softmax in float32 whatever the model's dtype, so a float64
model compared against its own eager forward agrees to ~1e-7 only; the default "sdpa" keeps float64.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .structure import (LayerNormSpec, LibraryTower, UnsupportedModelError, ViTLayerSpec, ViTSpec, bias_or_zeros,
                        fold_output_bias, fold_patch_bias, pair)

__all__ = ["matches", "read", "LAYER_CLASSES"]

#: transformers' CLIP encoder layer classes whose forward this reader reproduces (the attention class
#: differed by implementation in transformers 4.x)
LAYER_CLASSES = ("CLIPEncoderLayer",)
ATTENTION_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")


def _vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The module holding embeddings / pre_layrnorm / encoder / post_layernorm, or None."""
    tower = getattr(model, "vision_model", model)
    tower = getattr(tower, "vision_model", tower)          # transformers 4.x: CLIPVisionModel.vision_model
    needed = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
    return tower if all(hasattr(tower, a) for a in needed) else None


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds as ``vision_model``) a transformers CLIP vision tower."""
    return _vision_tower(model) is not None


def _linear(layer: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(layer, nn.Linear):
        raise UnsupportedModelError(f"{where}: expected an nn.Linear; got {type(layer).__name__}")
    return layer.weight, bias_or_zeros(layer.bias, layer.weight.shape[0], layer.weight)


def _read_layer(layer: nn.Module, index: int, W: int) -> ViTLayerSpec:
    where = f"encoder.layers[{index}]"
    if type(layer).__name__ not in LAYER_CLASSES:
        raise UnsupportedModelError(f"{where} is {type(layer).__name__}; nha_plugin reads transformers' CLIP "
                                    f"layers ({', '.join(LAYER_CLASSES)}), whose forward it reproduces exactly. "
                                    "Load it as a CLIPModel / CLIPVisionModel(WithProjection), or with open_clip")
    attn = layer.self_attn
    if type(attn).__name__ not in ATTENTION_CLASSES:
        raise UnsupportedModelError(f"{where}.self_attn is {type(attn).__name__}; expected one of "
                                    f"{', '.join(ATTENTION_CLASSES)}")
    H = int(attn.num_heads)
    d = W // H
    if H * d != W or float(attn.scale) != d ** -0.5:
        raise UnsupportedModelError(f"{where}.self_attn: expected {H} heads of width W/H = {W}/{H} scaled by "
                                    f"head_dim ** -0.5; got head_dim={getattr(attn, 'head_dim', None)}, "
                                    f"scale={attn.scale}")
    (wq, bq), (wk, bk), (wv, bv) = (_linear(getattr(attn, f"{n}_proj"), f"{where}.self_attn.{n}_proj")
                                    for n in "qkv")
    W_o, b_o = _linear(attn.out_proj, f"{where}.self_attn.out_proj")
    (fc1, fc1_b), (fc2, fc2_b) = _linear(layer.mlp.fc1, f"{where}.mlp.fc1"), _linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    ones = wq.new_ones(W)
    return ViTLayerSpec(
        ln_1=LayerNormSpec.from_module(layer.layer_norm1, W, f"{where}.layer_norm1"),
        W_q=wq.view(H, d, W), W_k=wk.view(H, d, W), W_v=wv.view(H, d, W),
        b_q=bq.view(H, d), b_k=bk.view(H, d), b_v=bv.view(H, d), W_o=W_o, b_o=b_o, ls_1=ones,
        ln_2=LayerNormSpec.from_module(layer.layer_norm2, W, f"{where}.layer_norm2"),
        c_fc=fc1, c_fc_bias=fc1_b, activation=layer.mlp.activation_fn, c_proj=fc2, c_proj_bias=fc2_b, ls_2=ones)


def _embed(parts: nn.ModuleDict, images: Tensor) -> Tensor:
    """transformers' image embedding: the tower's pooler_output (post_layernorm of the class token), projected."""
    out = parts["vision_model"](pixel_values=images)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
    return parts["projection"](pooled) if "projection" in parts else pooled


def read(model: nn.Module, projection: Union[nn.Linear, Tensor, None] = None) -> ViTSpec:
    """A transformers CLIP image tower as a :class:`ViTSpec` of its own parameters.

    Args:
        model: ``CLIPModel``, ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``.
        projection: for a tower without its own projection: an ``nn.Linear(W, D)`` (e.g. ``CLIPModel.
            visual_projection``; a bias is folded into LN_post's shift) or a (W, D) matrix.

    Returns:
        ViTSpec with ``library="transformers"``.

    Raises:
        UnsupportedModelError: a layer class other than transformers' CLIP layer, a projection bias that cannot
            be folded (see :func:`~nha_plugin.vit.structure.fold_output_bias`), or ``projection`` given to a model
            that has one.
    """
    tower = _vision_tower(model)
    own = getattr(model, "visual_projection", None)
    if own is not None and projection is not None:
        raise UnsupportedModelError(f"{type(model).__name__} has its own visual_projection; pass projection= only "
                                    "with a CLIPVisionModel, which has none")
    projection = own if own is not None else projection
    emb = tower.embeddings
    W = emb.class_embedding.shape[0]
    conv = emb.patch_embedding
    layers = tower.encoder.layers
    ln_post = LayerNormSpec.from_module(tower.post_layernorm, W, "post_layernorm")
    proj = bias = None
    embed = _embed
    if isinstance(projection, nn.Linear):
        proj, bias = projection.weight.T, projection.bias
        ln_post = fold_output_bias(ln_post, proj, bias, "visual_projection.bias")
    elif isinstance(projection, Tensor):
        if projection.dim() != 2 or projection.shape[0] != W:
            raise UnsupportedModelError(f"projection must be a (W, D) = ({W}, D) matrix; got "
                                        f"{tuple(projection.shape)}")
        proj = projection
        embed = lambda parts, images: _embed(parts, images) @ proj             # noqa: E731
    elif projection is not None:
        raise UnsupportedModelError(f"projection must be an nn.Linear or a (W, D) tensor; got "
                                    f"{type(projection).__name__}")
    parts = {"vision_model": tower, "projection": projection if isinstance(projection, nn.Module) else None}
    tower_module = LibraryTower(parts, embed, layers, "transformers")
    return ViTSpec(
        blocks=[_read_layer(layer, i, W) for i, layer in enumerate(layers)], conv_weight=conv.weight,
        class_embedding=emb.class_embedding,
        positional_embedding=fold_patch_bias(emb.position_embedding.weight, conv.bias),
        ln_pre=LayerNormSpec.from_module(tower.pre_layrnorm, W, "pre_layrnorm"), ln_post=ln_post, proj=proj,
        image_size=pair(emb.image_size), patch_size=pair(conv.kernel_size), module=tower_module,
        block_modules=tuple(layers), library="transformers")
