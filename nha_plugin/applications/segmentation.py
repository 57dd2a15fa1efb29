"""Training-free semantic segmentation from the neuron x head decomposition (METHODS.md §A), pure torch.

NAD segmentor, for P classes with unit text embeddings t_p (class names x templates, each embedded and normalised,
averaged, renormalised; then centred over the P classes and renormalised: "text centring"):

1. Pair ranking: score[p, h, n] = <PC0[h, n], t_p> with PC0[h, n] = sign[h, n] u[h, n] / ||u[h, n]|| (u from
   :func:`nha_plugin.decomposition.pair_directions`; sign +1 unless a dataset's PC0 signs are given). TopK(p) = the k
   pairs with the largest signed score; ``mask[p, h, n]`` is 1 on them.
2. Head maps, per crop: L[p, m, h] = cos(t_p, c[m, h]) where c[m, h] is the contribution of token m through head h:
   ``a[h, m] W_o^h (W_v^h z_m + b_v^h)`` plus a share of the output bias. b_v^h stays inside each token's value (a
   head's attention weights sum to 1, so its tokens carry W_o^h b_v^h exactly once). The output bias b_o is shared
   in proportion to attention by default, ``a[h, m] b_o / H`` (``bias_share="attention"``), so a[h, m] drops out of
   the cosine; ``"uniform"`` splits it evenly, ``b_o / (H T)``. Either way the H*T entries sum to y exactly. Why the
   default: a trained pool's attention is peaked (scenes-rn: in float32 a[h, m] is exactly 0 for most tokens), and
   under the uniform share those tokens' entries are b_o alone, so their L is the same for every image.
3. Neuron maps: Z[m, n] = raw layer4 activation F_m[n] (no positional embedding).
4. logit[p, m] = (1/k) sum_h L[p, m, h] * (Z @ mask[p, h, :])[m]  (one matmul over all pairs), class token dropped.
   The attention-sink cell (the last spatial token) of L and Z is replaced by the mean of its W, N and NW
   neighbours (``sink="interpolate"``, as the paper does).
5. Grid -> bilinear upsampling to the crop; sliding window (default crop = the model's input size, stride = half),
   overlaps averaged; the short side is first resized to the crop size; logits resized bilinearly to the label's
   size; argmax over classes.

Baselines share the class texts and the sliding window (:data:`METHOD_DESCRIPTIONS`): MaskCLIP for ResNet,
self-self attention, neurons-only, heads-only, and the floor "global" (each crop's zero-shot class painted over it).

Evaluation: :class:`ConfusionMatrix` accumulates mIoU / pixAcc over a dataset with an ignore index and the
PASCAL Context-59 "no background" convention; :func:`evaluate` runs a :class:`Segmentor` over a dataset (resumable).
Datasets: :class:`SceneSegmentation` (generated scenes with exact masks) and
:class:`nha_plugin.datasets.pascal_context.PascalContext59`.

Example::

    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    ds = SceneSegmentation(50, seed=20_000)
    text = class_embeddings(model, tokenizer, ds.prompts())
    seg = Segmentor(model, text, methods=("nad", "maskclip"), k=417, preprocess=preprocess)
    result = evaluate(seg, ds)
    result["methods"]["nad"]["miou"]
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from ..adapters import get_spec
from ..pool import class_attention, pair_directions, pool_output, positional_embedding_for, tokens
from ..pool_maps import BIAS_SHARES, apply_sink, check_sink, head_maps, maskclip_tokens, self_self_tokens, token_cosines
from ..spec import AttentionPoolSpec

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "ORACLE", "ORACLE_DESCRIPTION", "DEFAULT_K", "PAPER_PAIR_SHARE", "paper_k",
           "class_embeddings", "centre_texts", "pair_scores", "top_pairs", "neuron_maps", "nad_logits",
           "crop_logits", "sliding_windows", "Segmentor", "ConfusionMatrix",
           "miou_from_matrices", "bootstrap_miou", "SceneSegmentation", "scene_prompts", "evaluate", "plot_examples",
           "results_markdown"]

DEFAULT_K = 20000
# The paper keeps 20,000 of RN50x16's 48 x 3072 pairs per class; other models default to the same share.
PAPER_PAIR_SHARE = DEFAULT_K / (48 * 3072)


def paper_k(spec: AttentionPoolSpec) -> int:
    """Pairs per class at the paper's share of H*C (20,000 for RN50x16, 417 for scenes-rn)."""
    return max(1, round(PAPER_PAIR_SHARE * spec.num_heads * spec.num_neurons))
METHOD_DESCRIPTIONS: Dict[str, str] = {
    "nad": "NAD: (1/k) sum over the class's top-k pairs (h, n) of Z[m, n] L[p, m, h] (head cosine x neuron activation)",
    "maskclip": "MaskCLIP for ResNet: per-token c_proj(v_proj(F_m)) (no q/k, no positional embedding), cosine with t_p",
    "self-self": "self-self attention: per head softmax(QQ^T/sqrt d)+softmax(KK^T/sqrt d) over all tokens applied to "
                 "V, then c_proj; cosine of each spatial token with t_p",
    "neurons": "neurons only: NAD with L replaced by 1, i.e. (1/k) sum over the top-k pairs of Z[m, n] "
               "(= activations weighted by how many of a neuron's heads are in TopK(p))",
    "heads": "heads only: (1/H) sum_h L[p, m, h], no neuron mask",
    "global": "floor: each crop's zero-shot class (cos of the crop's image embedding with t_p) painted over the crop",
}
METHODS: Tuple[str, ...] = tuple(METHOD_DESCRIPTIONS)
ORACLE = "oracle-majority"
ORACLE_DESCRIPTION = "oracle floor: every pixel gets the image's most frequent ground-truth class (no localisation)"


# ---- class texts ------------------------------------------------------------------------------------------
def centre_texts(text: Tensor) -> Tensor:
    """Text centring: subtract the mean over the P classes, renormalise each row. (P, D) -> (P, D)."""
    if text.shape[0] < 2:
        raise ValueError(f"text centring needs at least 2 classes; got {text.shape[0]} (pass centre=False)")
    return F.normalize(text - text.mean(dim=0, keepdim=True), dim=-1)


def class_embeddings(model: nn.Module, tokenizer: Callable,
                     classes: Union[Sequence[str], Mapping[str, Sequence[str]]],
                     templates: Optional[Sequence[str]] = None, *, centre: bool = True,
                     cache_dir: Union[str, Path, None, bool] = None, progress: bool = False) -> Tensor:
    """Class text embeddings (P, D), float32 on the CPU.

    Each class's prompts are embedded and normalised, averaged, renormalised; with ``centre`` the P rows are then
    centred over the classes and renormalised (the paper's "text centring").

    Args:
        model, tokenizer: a whole CLIP model and its tokenizer (as :func:`nha_plugin.load_clip` returns).
        classes: class names (formatted with ``templates``), or a mapping class name -> its own prompt list.
        templates: format strings with ``{}`` for class names (default ``["a photo of a {}."]``); not used with a
            mapping.
        centre: apply text centring.
        cache_dir, progress: passed to :func:`nha_plugin.text.cache.embed_texts`.
    """
    from ..text.cache import embed_texts
    if isinstance(classes, Mapping):
        prompts = {name: list(p) for name, p in classes.items()}
    else:
        templates = list(templates) if templates else ["a photo of a {}."]
        if any("{}" not in t for t in templates):
            raise ValueError(f"every template needs one '{{}}' for the class name; got {templates[:3]}")
        prompts = {name: [t.format(name) for t in templates] for name in classes}
    if not prompts or any(not p for p in prompts.values()):
        raise ValueError("give at least one class and at least one prompt per class")
    flat = [t for p in prompts.values() for t in p]
    emb = embed_texts(model, tokenizer, flat, None, cache_dir=cache_dir, progress=progress)
    rows, start = [], 0
    for p in prompts.values():
        rows.append(F.normalize(emb[start:start + len(p)].mean(dim=0), dim=-1))
        start += len(p)
    text = torch.stack(rows)
    return centre_texts(text) if centre else text


# ---- pair ranking -----------------------------------------------------------------------------------------
def _check_signs(pair_signs: Optional[Tensor], spec: AttentionPoolSpec) -> Optional[Tensor]:
    if pair_signs is None:
        return None
    H, C = spec.num_heads, spec.num_neurons
    signs = torch.as_tensor(pair_signs)
    if tuple(signs.shape) != (H, C):
        raise ValueError(f"pair_signs must be (H, C) = ({H}, {C}); got {tuple(signs.shape)}")
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("pair_signs must hold only +1 and -1 (the PC0 sign of each pair)")
    return signs


def pair_scores(spec: AttentionPoolSpec, text: Tensor, pair_signs: Optional[Tensor] = None,
                heads_per_chunk: int = 4) -> Tensor:
    """Signed alignment <PC0[h, n], t_p> of every pair with every class, (P, H, C).

    PC0[h, n] = sign[h, n] u[h, n] / ||u[h, n]||; ``pair_signs`` (H, C) of +-1 (e.g.
    ``nha_plugin.stats.DatasetStats.load(path).pc0_sign``), +1 everywhere when None. u is built ``heads_per_chunk``
    heads at a time (the full (H, C, D) table is 453 MB for RN50x16 in fp32)."""
    signs = _check_signs(pair_signs, spec)
    text = text.to(device=spec.device, dtype=spec.dtype)
    out = []
    for h0 in range(0, spec.num_heads, heads_per_chunk):
        u = pair_directions(spec, slice(h0, h0 + heads_per_chunk))                 # (h', C, D)
        out.append(torch.einsum("hnD,pD->phn", u, text) / u.norm(dim=-1).clamp_min(1e-30))
    scores = torch.cat(out, dim=1)
    if signs is not None:
        scores = scores * signs.to(scores)
    return scores


def top_pairs(spec: AttentionPoolSpec, text: Tensor, k: int = DEFAULT_K, pair_signs: Optional[Tensor] = None) -> Tensor:
    """Indicator of each class's top-k pairs by :func:`pair_scores`, (P, H, C) in the spec's dtype.

    ``k`` larger than H*C is clipped to H*C with a warning (then every pair is kept)."""
    H, C = spec.num_heads, spec.num_neurons
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    if k > H * C:
        warnings.warn(f"k={k} exceeds the {H}x{C}={H * C} pairs of this model; using k={H * C} (every pair)",
                      stacklevel=2)
        k = H * C
    scores = pair_scores(spec, text, pair_signs).flatten(1)
    mask = torch.zeros_like(scores)
    mask.scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    return mask.view(-1, H, C)


# ---- per-crop maps ----------------------------------------------------------------------------------------
def neuron_maps(features: Tensor, sink: str = "interpolate") -> Tensor:
    """Z: raw layer4 activations per cell (no positional embedding), sink handled, (B, C, h, w)."""
    return apply_sink(features, sink)


def nad_logits(head_map: Tensor, neuron_map: Tensor, mask: Tensor, k: Optional[int] = None) -> Tensor:
    """logit[b, p, i, j] = (1/k) sum_h L[b, p, h, i, j] (Z @ mask[p, h, :]^T)[b, i, j], (B, P, h, w).

    Args:
        head_map: L (B, P, H, h, w).
        neuron_map: Z (B, C, h, w).
        mask: (P, H, C) indicator of each class's top pairs (any weights work: the sum is weighted by them).
        k: the divisor (default: the number of selected pairs of the first class).
    """
    B, P, H, h, w = head_map.shape
    k = k if k is not None else int(mask[0].sum().item())
    z = rearrange(neuron_map, "b n i j -> b (i j) n")
    zm = (z @ rearrange(mask.to(z), "p h n -> n (p h)")).view(B, h * w, P, H)    # the pairs, in one matmul
    out = (rearrange(head_map, "b p h i j -> b (i j) p h") * zm).sum(-1) / k
    return rearrange(out, "b (i j) p -> b p i j", i=h, j=w)


def crop_logits(spec: AttentionPoolSpec, features: Tensor, text: Tensor, methods: Sequence[str],
                mask: Optional[Tensor] = None, k: Optional[int] = None, sink: str = "interpolate",
                bias_share: str = "attention") -> Dict[str, Tensor]:
    """Grid-level class logits of every requested method for a batch of crops: ``{method: (B, P, h, w)}``.

    Args:
        spec: the attention pool.
        features: layer4 output (B, C, h, w) of the crops.
        text: class directions (P, D).
        methods: names from :data:`METHODS`.
        mask: (P, H, C) top-pair indicator (needed by "nad" and "neurons"); k: its divisor.
        sink: sink handling of the NAD maps ("interpolate" | "keep").
        bias_share: how the head maps share b_o ("attention" | "uniform"; see :func:`head_maps`).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown segmentation method(s) {unknown}; choose from {list(METHODS)}")
    grid = tuple(features.shape[-2:])
    pos = positional_embedding_for(spec, grid)
    text = text.to(device=features.device, dtype=features.dtype)
    if mask is None and any(m in ("nad", "neurons") for m in methods):
        raise ValueError("methods 'nad' and 'neurons' need the top-pair mask (see top_pairs)")
    k = k if k is not None or mask is None else int(mask[0].sum().item())
    out: Dict[str, Tensor] = {}
    L = (head_maps(spec, features, text, positional_embedding=pos, sink=sink, bias_share=bias_share)
         if {"nad", "heads"} & set(methods) else None)
    Z = neuron_maps(features, sink) if {"nad", "neurons"} & set(methods) else None
    for m in methods:
        if m == "nad":
            out[m] = nad_logits(L, Z, mask, k)
        elif m == "heads":
            out[m] = L.mean(dim=2)
        elif m == "neurons":
            out[m] = torch.einsum("bnij,pn->bpij", Z, mask.to(Z).sum(dim=1)) / k
        elif m == "maskclip":
            out[m] = token_cosines(maskclip_tokens(spec, features), text, grid)
        elif m == "self-self":
            out[m] = token_cosines(self_self_tokens(spec, features, pos), text, grid)
        elif m == "global":
            z = tokens(features, pos)
            y = pool_output(spec, torch.einsum("bht,btn->bhn", class_attention(spec, z), z))
            cos = F.normalize(y, dim=-1) @ F.normalize(text, dim=-1).T
            out[m] = cos[:, :, None, None].expand(-1, -1, *grid)
    return out


# ---- sliding window ---------------------------------------------------------------------------------------
def sliding_windows(height: int, width: int, crop: int, stride: int) -> List[Tuple[int, int]]:
    """Top-left corners (y, x) of crop x crop windows covering an image (the last window in each direction is
    shifted inwards to end at the border, as mmsegmentation's slide inference does)."""
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}; resize its short side to >= {crop}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1; got {stride}")

    def starts(size):
        n = max(size - crop + stride - 1, 0) // stride + 1
        return sorted({min(i * stride, size - crop) for i in range(n)})

    return [(y, x) for y in starts(height) for x in starts(width)]


def _normalisation(preprocess) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of the Normalize step of a torchvision preprocess; OpenAI's values when there is none."""
    for t in getattr(preprocess, "transforms", ()):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


ImageLike = Union[Image.Image, np.ndarray]


class Segmentor:
    """Training-free segmentor over class texts; runs one or several methods on the same crops.

    Args:
        model: a CLIP-ResNet (open_clip / OpenAI / timm, whole model or image tower) or its spec.
        text: class directions (P, D), e.g. from :func:`class_embeddings` (centred).
        methods: names from :data:`METHODS`.
        k: pairs per class for "nad"/"neurons" (default 20,000 as in the paper; clipped to H*C with a warning).
        pair_signs: (H, C) PC0 signs (+-1), e.g. ``nha_plugin.stats.DatasetStats.load(path).pc0_sign``; None: +1.
        crop_size: window side in pixels (a multiple of 32; default the model's input size).
        stride: window stride (default half the crop).
        short_side: the image's short side is resized to this first (default the crop size).
        preprocess: the model's preprocess, read only for its normalisation mean/std (OpenAI's when None).
        sink: "interpolate" (default, the paper's) or "keep" for the NAD head/neuron maps.
        bias_share: the head maps' share of the output bias: "attention" (default) or "uniform" (:func:`head_maps`).
        batch_size: crops per forward pass.

    Example::

        seg = Segmentor(model, text, methods=("nad", "maskclip"), k=417, preprocess=preprocess)
        preds = seg.predict([pil_image])          # [{"nad": (H, W) int64, "maskclip": ...}]
    """

    def __init__(self, model: Union[nn.Module, AttentionPoolSpec], text: Tensor, methods: Sequence[str] = ("nad",), *,
                 k: Optional[int] = None, pair_signs: Optional[Tensor] = None, crop_size: Optional[int] = None,
                 stride: Optional[int] = None, short_side: Optional[int] = None, preprocess=None,
                 sink: str = "interpolate", bias_share: str = "attention", batch_size: int = 8):
        self.spec = (model if isinstance(model, AttentionPoolSpec) else get_spec(model)).detached()
        methods = [methods] if isinstance(methods, str) else list(methods)
        unknown = [m for m in methods if m not in METHODS]
        if not methods or unknown:
            raise ValueError(f"unknown or no segmentation methods {unknown or methods}; choose from {list(METHODS)}")
        if text.dim() != 2 or text.shape[1] != self.spec.output_dim:
            raise ValueError(f"text must be (P, D={self.spec.output_dim}); got {tuple(text.shape)}")
        check_sink(sink)
        if bias_share not in BIAS_SHARES:
            raise ValueError(f"bias_share must be one of {BIAS_SHARES}; got {bias_share!r}")
        self.methods, self.sink, self.bias_share, self.batch_size = methods, sink, bias_share, int(batch_size)
        self.text = text.to(device=self.spec.device, dtype=self.spec.dtype)
        native = self.spec.image_size or 32 * self.spec.grid_size
        self.crop_size = int(crop_size or native)
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32 for a CLIP-ResNet; got {self.crop_size}")
        self.stride = int(stride or max(1, self.crop_size // 2))
        self.short_side = int(short_side or self.crop_size)
        if self.short_side < self.crop_size:
            raise ValueError(f"short_side ({self.short_side}) must be at least the crop size ({self.crop_size})")
        if self.crop_size // 32 != self.spec.grid_size:
            warnings.warn(f"crop {self.crop_size} px gives a {self.crop_size // 32}x{self.crop_size // 32} grid; the "
                          f"model's native grid is {self.spec.grid_size}x{self.spec.grid_size}: the attention pool's "
                          "positional embedding is interpolated (bicubic, class row kept)", stacklevel=2)
        mean, std = _normalisation(preprocess)
        self.mean = torch.tensor(mean, dtype=self.spec.dtype, device=self.spec.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.spec.dtype, device=self.spec.device).view(1, 3, 1, 1)
        self.k, self.mask = None, None
        if {"nad", "neurons"} & set(methods):
            k = paper_k(self.spec) if k is None else k
            self.k = min(int(k), self.spec.num_heads * self.spec.num_neurons)
            self.mask = top_pairs(self.spec, self.text, int(k), pair_signs)

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def _resize(self, image: ImageLike) -> Tensor:
        """Short side to ``short_side`` (bicubic, as CLIP's preprocess), as a normalised (3, H', W') tensor."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        scale = self.short_side / min(image.size)
        size = (max(self.short_side, round(image.width * scale)), max(self.short_side, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].to(self.spec.dtype).div_(255)
        return ((x.to(self.spec.device) - self.mean) / self.std)[0]

    @torch.no_grad()
    def crop_logits(self, crops: Tensor) -> Dict[str, Tensor]:
        """Normalised crops (B, 3, S, S) -> ``{method: (B, P, S, S)}`` (grid logits upsampled bilinearly)."""
        feats = self.spec.trunk(crops)
        grids = crop_logits(self.spec, feats, self.text, self.methods, self.mask, self.k, self.sink, self.bias_share)
        return {m: F.interpolate(g, size=crops.shape[-2:], mode="bilinear", align_corners=False)
                for m, g in grids.items()}

    @torch.no_grad()
    def logits(self, images: Sequence[ImageLike]) -> List[Dict[str, Tensor]]:
        """Sliding-window logits per image, ``[{method: (P, H', W')}]`` at the resized resolution (overlaps averaged).
        Crops of all ``images`` are batched together."""
        resized = [self._resize(im) for im in images]
        jobs = [(i, y, x) for i, r in enumerate(resized)
                for y, x in sliding_windows(r.shape[1], r.shape[2], self.crop_size, self.stride)]
        P, S = self.num_classes, self.crop_size
        sums = [{m: torch.zeros(P, *r.shape[1:], dtype=self.spec.dtype, device=self.spec.device) for m in self.methods}
                for r in resized]
        counts = [torch.zeros(r.shape[1:], dtype=self.spec.dtype, device=self.spec.device) for r in resized]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            crops = torch.stack([resized[i][:, y:y + S, x:x + S] for i, y, x in chunk])
            out = self.crop_logits(crops)
            for b, (i, y, x) in enumerate(chunk):
                for m in self.methods:
                    sums[i][m][:, y:y + S, x:x + S] += out[m][b]
                counts[i][y:y + S, x:x + S] += 1
        return [{m: s[m] / c for m in self.methods} for s, c in zip(sums, counts)]

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike], sizes: Optional[Sequence[Tuple[int, int]]] = None
                ) -> List[Dict[str, np.ndarray]]:
        """Class maps per image, ``[{method: (H, W) int64}]`` at each image's own size (or ``sizes[i]`` = (H, W)):
        the sliding-window logits are resized bilinearly, then argmax over classes."""
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            raise TypeError("predict takes a sequence of images; wrap a single image in a list")
        preds = []
        for i, logit in enumerate(self.logits(images)):
            im = images[i]
            size = sizes[i] if sizes is not None else ((im.height, im.width) if isinstance(im, Image.Image)
                                                        else tuple(im.shape[:2]))
            row = {}
            for m, lg in logit.items():
                if tuple(lg.shape[-2:]) != tuple(size):
                    lg = F.interpolate(lg[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
                row[m] = lg.argmax(dim=0).cpu().numpy()
            preds.append(row)
        return preds


# ---- evaluation -------------------------------------------------------------------------------------------
class ConfusionMatrix:
    """Dataset-level confusion matrix for semantic segmentation (rows: ground truth, columns: prediction).

    Args:
        num_classes: K predicted classes (0..K-1).
        ignore_index: label value never scored (255 as in mmsegmentation).
        no_background: the PASCAL Context-59 convention: raw label 0 (background) is ignored and raw label l >= 1 is
            class l - 1 (mmsegmentation's ``reduce_zero_label``).

    ``summary()`` gives pixAcc = sum(diag) / labelled pixels, per-class IoU = diag / (row + column - diag) and mIoU
    = the mean IoU over classes whose union is non-empty (classes neither present nor predicted are skipped, as
    mmsegmentation's nanmean does), plus mAcc (mean per-class recall over classes present).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, no_background: bool = False):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.no_background = bool(no_background)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reduce(self, label: np.ndarray) -> np.ndarray:
        """Raw labels -> class indices (int64) with ignored pixels set to ``ignore_index``."""
        lab = np.asarray(label).astype(np.int64)
        if self.no_background:
            lab = np.where((lab == 0) | (lab == self.ignore_index), self.ignore_index, lab - 1)
        return lab

    def update(self, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
        """Add one image: ``pred`` (H, W) class indices, ``label`` (H, W) raw labels. Returns the image's own
        (K, K) confusion matrix."""
        pred, lab = np.asarray(pred).astype(np.int64), self.reduce(label)
        if pred.shape != lab.shape:
            raise ValueError(f"prediction {pred.shape} and label {lab.shape} differ in size")
        valid = lab != self.ignore_index
        bad = lab[valid & ((lab < 0) | (lab >= self.num_classes))]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside 0..{self.num_classes - 1} (after the no-background "
                             f"shift: {self.no_background}); set ignore_index or num_classes accordingly")
        if pred[valid].size and (pred[valid].min() < 0 or pred[valid].max() >= self.num_classes):
            raise ValueError(f"predictions must be class indices in 0..{self.num_classes - 1}")
        K = self.num_classes
        image = np.bincount(lab[valid] * K + pred[valid], minlength=K * K).reshape(K, K)
        self.matrix += image
        return image

    def summary(self) -> Dict[str, object]:
        """``{"miou", "pixacc", "macc", "iou": per-class list (None where the union is empty), "pixels"}``."""
        m = self.matrix.astype(np.float64)
        diag, gt = np.diag(m), m.sum(axis=1)
        iou = _iou(m)
        acc = np.where(gt > 0, diag / np.maximum(gt, 1), np.nan)
        total = m.sum()
        return {"miou": float(miou_from_matrices(m)),
                "pixacc": float(diag.sum() / total) if total else float("nan"),
                "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
                "iou": [None if np.isnan(v) else float(v) for v in iou], "pixels": int(total)}


def _iou(m: np.ndarray) -> np.ndarray:
    """Per-class IoU of confusion matrices (..., K, K); NaN where the union is empty."""
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(axis=-1) + m.sum(axis=-2) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, diag / np.where(union > 0, union, 1), np.nan)


def miou_from_matrices(m: np.ndarray) -> np.ndarray:
    """mIoU of confusion matrices (..., K, K): the mean IoU over classes with a non-empty union; shape (...)."""
    iou = _iou(np.asarray(m, dtype=np.float64))
    valid = ~np.isnan(iou)
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(-1), np.where(valid, iou, 0).sum(-1) / np.maximum(valid.sum(-1), 1), np.nan)


def bootstrap_miou(per_image: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """mIoU of ``n_boot`` bootstrap resamples of the images, (n_boot,). ``per_image`` (N, K, K) holds each image's
    confusion matrix (:func:`evaluate` with ``per_image=True``). The same ``seed`` draws the same resamples, so
    two methods' arrays are paired (compare them elementwise for a paired bootstrap)."""
    per_image = np.asarray(per_image)
    N, K = per_image.shape[0], per_image.shape[-1]
    idx = np.random.default_rng(seed).integers(0, N, size=(n_boot, N))
    weights = np.stack([np.bincount(row, minlength=N) for row in idx]).astype(np.float64)   # (n_boot, N)
    return miou_from_matrices((weights @ per_image.reshape(N, K * K).astype(np.float64)).reshape(n_boot, K, K))


def scene_prompts(names: Sequence[str], background: Sequence[str] = ()) -> Dict[str, List[str]]:
    """The caption forms ``scenes-rn`` was trained on: objects as "star", "a star", "a photo of a star", ...,
    backgrounds as "something on grass", "a grass background", ... (from the scene generator)."""
    from ..scenes import BACKGROUND_TEMPLATES, SINGLE_TEMPLATES, single_caption
    out = {n: [single_caption(n, t) for t in SINGLE_TEMPLATES] for n in names}
    out.update({b: [t.format(b) for t in BACKGROUND_TEMPLATES] for b in background})
    return out


class SceneSegmentation:
    """Generated scenes as a segmentation set: ``ds[i]`` -> (PIL image 224x224, label (224, 224) uint8).

    Classes are the object names the generator draws (5 shapes, 5 photo categories; a shape's colour is an
    attribute, not a class). Objects are painted in order, so each pixel's label is the visible (top) object.

    Args:
        n, seed: the scenes of ``SceneDataset(n, seed)`` (use a seed never used in training; scenes-rn trained on
            seed 0 and evaluated on 1000-1002).
        background: "classes" (default): the 6 backgrounds (white, black, gray, grass, gravel, brick) are classes
            too, every pixel is labelled (16 classes, label = class index); "ignore": the Context-59 convention,
            label 0 = background (ignored), 1..10 = the object classes (``no_background`` is True).
        **scene_kwargs: passed to the generator (e.g. ``n_objects=2``).
    """

    def __init__(self, n: int, seed: int = 20_000, background: str = "classes", **scene_kwargs):
        from ..scenes import BACKGROUNDS, CATEGORIES, SHAPES, SceneDataset
        if background not in ("classes", "ignore"):
            raise ValueError(f"background must be 'classes' or 'ignore'; got {background!r}")
        self.scenes = SceneDataset(n, seed=seed, **scene_kwargs)
        self.background = background
        self.object_names = tuple(SHAPES) + tuple(CATEGORIES)
        self.background_names = tuple(BACKGROUNDS) if background == "classes" else ()
        self.class_names = self.object_names + self.background_names
        self.no_background = background == "ignore"

    def __len__(self) -> int:
        return len(self.scenes)

    def prompts(self) -> Dict[str, List[str]]:
        """Per-class prompt lists in the forms scenes-rn was trained on (see :func:`scene_prompts`)."""
        return scene_prompts(self.object_names, self.background_names)

    def label(self, scene) -> np.ndarray:
        offset = 1 if self.no_background else 0
        if self.no_background:
            lab = np.zeros(scene.image.shape[:2], dtype=np.uint8)
        else:
            lab = np.full(scene.image.shape[:2], self.class_names.index(scene.background), dtype=np.uint8)
        for obj in scene.objects:              # masks are the visible parts: no two objects share a pixel
            lab[obj.mask] = self.object_names.index(obj.name) + offset
        return lab

    def __getitem__(self, i: int) -> Tuple[Image.Image, np.ndarray]:
        scene = self.scenes[i]
        return Image.fromarray(scene.image), self.label(scene)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _segmentor_identity(seg: Segmentor) -> dict:
    """Everything that changes a segmentor's predictions, so a resumed evaluation never mixes two settings."""
    def digest(t: Optional[Tensor]) -> Optional[str]:
        return None if t is None else hashlib.sha256(t.detach().cpu().double().numpy().tobytes()).hexdigest()[:16]
    spec = seg.spec
    return {"k": seg.k, "mask": digest(seg.mask), "text": digest(seg.text), "sink": seg.sink,
            "bias_share": seg.bias_share, "window": [seg.crop_size, seg.stride, seg.short_side],
            "weights": digest(torch.cat([spec.v_weight.flatten(), spec.c_weight.flatten(), spec.q_weight.flatten()]))}


def evaluate(segmentor: Segmentor, dataset, *, n: Optional[int] = None, no_background: Optional[bool] = None,
             ignore_index: int = 255, oracle: bool = True, show: int = 6, images_per_step: int = 4,
             state_path: Union[str, Path, None] = None, config: Optional[Mapping] = None, save_every: int = 20,
             per_image: bool = False, progress: bool = True) -> Dict[str, object]:
    """mIoU / pixAcc / mAcc of every method of ``segmentor`` over ``dataset``, from dataset-level confusion matrices.

    Args:
        segmentor: a :class:`Segmentor` whose texts are ``dataset.class_names`` in order.
        dataset: ``len`` + ``ds[i] -> (PIL image, raw label (H, W))``, with ``class_names`` and ``no_background``.
        n: score the first n images (all by default).
        no_background: override ``dataset.no_background`` (Context-59: label 0 ignored, l -> l - 1).
        ignore_index: label never scored.
        oracle: also score :data:`ORACLE` (each image's most frequent true class everywhere; needs no model).
        show: keep the first ``show`` images with their labels and predictions (``result["examples"]``).
        images_per_step: images whose crops are batched together.
        state_path: a file to checkpoint to every ``save_every`` images; a later call with the same ``config``
            resumes from it (a different config starts afresh).
        config: what identifies the run (model, dataset, methods, k, ...), stored with the state.
        per_image: also return each image's confusion matrix, ``result["per_image"][method]`` (n, K, K) int32 (for
            :func:`bootstrap_miou`; n*K*K*4 bytes per method).
        progress: tqdm bar.

    Returns:
        ``{"methods": {name: {"miou", "pixacc", "macc", "iou": [...], "pixels"}}, "n": int, "class_names": [...],
        "examples": [{"image", "label", "pred": {name: (H, W)}}]}`` (examples hold numpy arrays).
    """
    from tqdm.auto import tqdm
    total = len(dataset) if n is None else min(int(n), len(dataset))
    nb = dataset.no_background if no_background is None else no_background
    K = len(dataset.class_names)
    if K != segmentor.num_classes:
        raise ValueError(f"the segmentor has {segmentor.num_classes} class texts but the dataset "
                         f"{K} classes; build the texts from dataset.class_names")
    names = list(segmentor.methods) + ([ORACLE] if oracle else [])
    fp = _fingerprint({"config": dict(config or {}), "segmentor": _segmentor_identity(segmentor), "methods": names,
                       "n": total, "no_background": nb, "ignore_index": ignore_index, "per_image": per_image})
    cms = {m: ConfusionMatrix(K, ignore_index, nb) for m in names}
    images: Dict[str, List[np.ndarray]] = {m: [] for m in names}
    examples: List[dict] = []
    start = 0
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fp:
            start = int(state["next"])
            for m in names:
                cms[m].matrix = state["confusion"][m].copy()
            examples = state["examples"]
            images = state["per_image"]
    bar = tqdm(total=total, initial=start, desc="segmenting", unit="img", disable=not progress)
    unsaved = 0
    for s in range(start, total, images_per_step):
        items = [dataset[i] for i in range(s, min(s + images_per_step, total))]
        preds = segmentor.predict([im for im, _ in items], sizes=[lab.shape for _, lab in items])
        for (im, lab), pred in zip(items, preds):
            if oracle:
                red = cms[ORACLE].reduce(lab)
                valid = red[red != ignore_index]
                pred[ORACLE] = np.full(lab.shape, np.bincount(valid).argmax() if valid.size else 0, dtype=np.int64)
            for m in names:
                matrix = cms[m].update(pred[m], lab)
                if per_image:
                    images[m].append(matrix.astype(np.int32))
            if len(examples) < show:
                examples.append({"image": np.asarray(im), "label": cms[names[0]].reduce(lab).astype(np.int16),
                                 "pred": {m: pred[m].astype(np.int16) for m in names}})
        bar.update(len(items))
        unsaved += len(items)
        if state_path is not None and (unsaved >= save_every or s + len(items) == total):
            _atomic_torch_save({"fingerprint": fp, "next": s + len(items), "examples": examples, "per_image": images,
                                "confusion": {m: cms[m].matrix for m in names}}, state_path)
            unsaved = 0
    bar.close()
    out = {"methods": {m: cms[m].summary() for m in names}, "n": total, "class_names": list(dataset.class_names),
           "no_background": nb, "ignore_index": ignore_index, "examples": examples}
    if per_image:
        out["per_image"] = {m: np.stack(images[m]) if images[m] else np.zeros((0, K, K), np.int32) for m in names}
    return out


# ---- reporting --------------------------------------------------------------------------------------------
def _palette(k: int) -> np.ndarray:
    """(k + 1, 3) float RGB; the last row (black) is for ignored pixels."""
    import matplotlib
    if k <= 20:
        # tab20 holds 10 hues, each dark then light: take the dark ones first so neighbouring classes differ in hue
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        cols = np.asarray([matplotlib.colormaps["tab20"](i)[:3] for i in order[:k]])
    else:
        cols = np.random.default_rng(0).uniform(0.15, 1.0, size=(k, 3))
    return np.vstack([cols, np.zeros((1, 3))])


def plot_examples(examples: Sequence[dict], class_names: Sequence[str], path: Union[str, Path],
                  ignore_index: int = 255, scores: Optional[Mapping[str, float]] = None) -> Path:
    """A grid, one row per example: image, ground truth, each method's prediction (same class colours; ignored
    pixels black); a legend of the classes below. Written atomically; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    path = Path(path)
    methods = list(examples[0]["pred"])
    K = len(class_names)
    pal = _palette(K)

    def colour(lab):
        lab = np.asarray(lab).astype(np.int64)
        return pal[np.where((lab < 0) | (lab >= K) | (lab == ignore_index), K, lab)]

    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.9 * cols, 1.9 * len(examples) + 0.9), squeeze=False)
    for r, ex in enumerate(examples):
        panels = [ex["image"], colour(ex["label"])] + [colour(ex["pred"][m]) for m in methods]
        titles = ["image", "ground truth"] + [m if not scores else f"{m} ({100 * scores[m]:.1f})" for m in methods]
        for c, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    if K <= 30:
        handles = [Patch(color=pal[i], label=name) for i, name in enumerate(class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, K), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if K <= 30 else 0, 1, 1))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def results_markdown(result: Mapping, title: str, protocol: Sequence[str] = ()) -> str:
    """A markdown table (method | mIoU | pixAcc | mAcc | definition), best mIoU first, plus per-class IoU."""
    rows = sorted(result["methods"].items(), key=lambda kv: -kv[1]["miou"])
    lines = [f"# {title}", ""] + [f"- {p}" for p in protocol] + ["", "| method | mIoU | pixAcc | mAcc | definition |",
                                                                     "|---|---|---|---|---|"]
    desc = dict(METHOD_DESCRIPTIONS, **{ORACLE: ORACLE_DESCRIPTION})
    for m, s in rows:
        lines.append(f"| {m} | {100 * s['miou']:.1f} | {100 * s['pixacc']:.1f} | {100 * s['macc']:.1f} | "
                     f"{desc.get(m, '')} |")
    names = result["class_names"]
    lines += ["", "Per-class IoU (%):", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for m, s in rows:
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.0f}" for v in s["iou"]) + " |")
    return "\n".join(lines) + "\n"
