"""The sliding-window segmentor: resize, crop, per-crop logits of every method, overlaps averaged, argmax.

The image's short side is first resized to ``short_side`` (default the crop size); crop x crop windows (default the
model's input size, stride half of it) cover it, the last window in each direction shifted inwards to end at the
border (as mmsegmentation's slide inference); each crop's grid logits (:func:`.maps.crop_logits`) are upsampled
bilinearly to the crop, overlaps averaged, resized bilinearly to the label's size and argmaxed over classes.

Presets (:data:`PRESETS`): ``"nha"`` (default) shares the output bias by attention and interpolates the sink cell's
cosines; ``"paper"`` reproduces the NAD paper's code: the uniform bias share ``b_o / (H T)``, the sink cell's
contribution vectors interpolated before the cosine, and pairs ranked with the PC0 signs from data (docs/conventions.md).
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ...adapters import get_spec
from ...pool import check_pair_signs
from ...pool_maps import BIAS_SHARES, check_sink
from ...runs import module_fingerprint, tensor_fingerprint
from ...spec import AttentionPoolSpec
from ...stats import spec_fingerprint
from .maps import METHODS, crop_logits, paper_k, top_pairs

__all__ = ["PRESETS", "PRESET_DESCRIPTIONS", "preset_settings", "sliding_windows", "normalisation", "Segmentor",
           "ImageLike"]

# What each preset fixes in the NAD head and neuron maps (the window and k are the same under both).
PRESETS: Dict[str, Dict[str, str]] = {
    "nha": {"bias_share": "attention", "sink": "interpolate", "sink_space": "maps"},
    "paper": {"bias_share": "uniform", "sink": "interpolate", "sink_space": "contributions"},
}
PRESET_DESCRIPTIONS: Dict[str, str] = {
    "nha": "b_o shared by attention (a[h,m] b_o / H); the sink cell's cosines replaced by the mean of its W, N, NW "
           "neighbours' cosines; pair signs +1 unless given",
    "paper": "the NAD paper's code: b_o shared uniformly (b_o / (H T) per token and head); the sink cell's "
             "contribution vectors replaced by the mean of its W, N, NW neighbours' vectors, then the cosine; pairs "
             "ranked by <PC0, t> with the PC0 signs from data; window = the model's input size, stride half of it",
}

ImageLike = Union[Image.Image, np.ndarray]


def sliding_windows(height: int, width: int, crop: int, stride: int) -> List[Tuple[int, int]]:
    """Top-left corners of the crop x crop windows covering an image.

    The last window in each direction is shifted inwards to end at the border, as mmsegmentation's slide inference
    does.

    Args:
        height, width: the image's size, each at least ``crop``.
        crop: window side.
        stride: step between windows (>= 1).

    Returns:
        [(y, x)], rows then columns.
    """
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}; resize its short side to >= {crop}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1; got {stride}")

    def starts(size):
        n = max(size - crop + stride - 1, 0) // stride + 1
        return sorted({min(i * stride, size - crop) for i in range(n)})

    return [(y, x) for y in starts(height) for x in starts(width)]


def normalisation(preprocess) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of the Normalize step of a torchvision preprocess; OpenAI's values when there is none."""
    for t in getattr(preprocess, "transforms", ()):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def preset_settings(preset: str, sink: Optional[str] = None, bias_share: Optional[str] = None,
                    pair_signs: Optional[Tensor] = None) -> Dict[str, str]:
    """The head/neuron-map settings of a preset with the caller's choices applied.

    Args:
        preset: a key of :data:`PRESETS`.
        sink, bias_share: the caller's choice, None for the preset's. Under ``"paper"`` a different value is refused
            (the preset exists to reproduce the paper's code; use ``"nha"`` to vary them).
        pair_signs: the caller's PC0 signs; ``"paper"`` needs them (its pairs are ranked by the signs from data).

    Returns:
        ``{"bias_share", "sink", "sink_space"}``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}; got {preset!r}")
    settings = dict(PRESETS[preset])
    given = {name: value for name, value in (("sink", sink), ("bias_share", bias_share)) if value is not None}
    if preset == "paper":
        other = {name: value for name, value in given.items() if value != settings[name]}
        if other:
            raise ValueError(f"preset='paper' reproduces the paper's code with sink={settings['sink']!r} and "
                             f"bias_share={settings['bias_share']!r}; got {other}: use preset='nha' to vary them")
        if pair_signs is None:
            raise ValueError("preset='paper' ranks pairs by <PC0, t> with the PC0 signs from data (the paper's "
                             "rule): pass pair_signs, e.g. nha_plugin.stats.DatasetStats.load(path).pc0_sign or "
                             "nha_plugin.applications.shift.pc0_signs(coefficients)")
    settings.update(given)
    check_sink(settings["sink"])
    if settings["bias_share"] not in BIAS_SHARES:
        raise ValueError(f"bias_share must be one of {BIAS_SHARES}; got {settings['bias_share']!r}")
    return settings


class Segmentor:
    """Training-free segmentor over class texts; runs one or several methods on the same crops.

    Args:
        model: a CLIP-ResNet (open_clip / OpenAI / timm, whole model or image tower) or its spec.
        text: class directions (P, D), e.g. from :func:`.texts.class_embeddings` (centred).
        methods: names from :data:`.maps.METHODS`.
        k: pairs per class for "nad"/"neurons" (default: the paper's share of H*C, :func:`.maps.paper_k`; clipped to
            H*C with a warning).
        pair_signs: (H, C) PC0 signs (+-1), e.g. ``nha_plugin.stats.DatasetStats.load(path).pc0_sign``; None: +1.
        crop_size: window side in pixels (a multiple of 32; default the model's input size).
        stride: window stride (default half the crop).
        short_side: the image's short side is resized to this first (default the crop size).
        preprocess: the model's preprocess, read only for its normalisation mean/std (OpenAI's when None).
        sink: "interpolate" (the default of both presets), "keep" or "drop" for the NAD head/neuron maps; None:
            the preset's.
        bias_share: the head maps' share of the output bias: "attention" (the nha preset's) or "uniform" (the
            paper's; :func:`nha_plugin.pool_maps.head_maps`); None: the preset's.
        batch_size: crops per forward pass.
        preset: "nha" (default) or "paper" (:data:`PRESETS`, :func:`preset_settings`): "paper" reproduces the NAD
            paper's crop logits (same pairs, same maps) and needs ``pair_signs`` from data; it keeps the window at
            the model's input size with stride half of it (the paper's 384 / 192 for RN50x16; 224 / 112 for
            scenes-rn) and refuses another.

    Example::

        seg = Segmentor(model, text, methods=("nad", "maskclip"), k=417, preprocess=preprocess)
        preds = seg.predict([pil_image])          # [{"nad": (H, W) int64, "maskclip": ...}]
    """

    def __init__(self, model: Union[nn.Module, AttentionPoolSpec], text: Tensor, methods: Sequence[str] = ("nad",), *,
                 k: Optional[int] = None, pair_signs: Optional[Tensor] = None, crop_size: Optional[int] = None,
                 stride: Optional[int] = None, short_side: Optional[int] = None, preprocess=None,
                 sink: Optional[str] = None, bias_share: Optional[str] = None, batch_size: int = 8,
                 preset: str = "nha"):
        self.spec = (model if isinstance(model, AttentionPoolSpec) else get_spec(model)).detached()
        methods = [methods] if isinstance(methods, str) else list(methods)
        unknown = [m for m in methods if m not in METHODS]
        if not methods or unknown:
            raise ValueError(f"unknown or no segmentation methods {unknown or methods}; choose from {list(METHODS)}")
        if text.dim() != 2 or text.shape[1] != self.spec.output_dim:
            raise ValueError(f"text must be (P, D={self.spec.output_dim}); got {tuple(text.shape)}")
        settings = preset_settings(preset, sink, bias_share, pair_signs)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1 crop; got {batch_size}")
        self.methods, self.batch_size, self.preset = methods, int(batch_size), preset
        self.sink, self.bias_share, self.sink_space = settings["sink"], settings["bias_share"], settings["sink_space"]
        self.text = text.to(device=self.spec.device, dtype=self.spec.dtype)
        native = self.spec.image_size or 32 * self.spec.grid_size
        if preset == "paper":
            asked = {"crop_size": (crop_size, native), "stride": (stride, native // 2), "short_side": (short_side, native)}
            other = {name: got for name, (got, want) in asked.items() if got is not None and int(got) != want}
            if other:
                raise ValueError(f"preset='paper' slides the paper's window (crop {native} = the model's input size, "
                                 f"stride {native // 2}, short side {native}); got {other}: use preset='nha'")
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
        self.normalisation = normalisation(preprocess)
        mean, std = self.normalisation
        self.mean = torch.tensor(mean, dtype=self.spec.dtype, device=self.spec.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.spec.dtype, device=self.spec.device).view(1, 3, 1, 1)
        self.pair_signs = None if pair_signs is None else check_pair_signs(pair_signs, self.spec)
        self.k, self.mask = None, None
        if {"nad", "neurons"} & set(methods):
            k = paper_k(self.spec) if k is None else k
            self.k = min(int(k), self.spec.num_heads * self.spec.num_neurons)
            self.mask = top_pairs(self.spec, self.text, int(k), self.pair_signs)

    @property
    def num_classes(self) -> int:
        """P, the number of class texts."""
        return self.text.shape[0]

    def identity(self) -> dict:
        """Every setting that changes this segmentor's predictions, JSON-able, for run keys (the weights apart:
        :meth:`weights_fingerprint`): a resumed evaluation never mixes two segmentors.

        Returns:
            ``{"methods", "k", "pair_signs", "texts", "preset", "sink", "bias_share", "sink_space", "window",
            "normalisation", "dtype"}``; the sign and text tensors as :func:`nha_plugin.runs.tensor_fingerprint`
            (None: no signs given).
        """
        mean, std = self.normalisation
        return {"methods": list(self.methods), "k": self.k,
                "pair_signs": None if self.pair_signs is None else tensor_fingerprint(self.pair_signs),
                "texts": tensor_fingerprint(self.text), "preset": self.preset, "sink": self.sink,
                "bias_share": self.bias_share, "sink_space": self.sink_space,
                "window": {"crop": self.crop_size, "stride": self.stride, "short_side": self.short_side},
                "normalisation": {"mean": list(mean), "std": list(std)}, "dtype": str(self.spec.dtype)}

    def weights_fingerprint(self) -> str:
        """sha256 hex of the image tower's weights (:func:`nha_plugin.runs.module_fingerprint`) when the spec knows
        its module, else of the attention pool's weights alone (:func:`nha_plugin.stats.spec_fingerprint`); floating
        weights are hashed as float32, so fp32 and fp64 copies agree (:meth:`identity` holds the dtype)."""
        tower = self.spec.trunk_module
        parts = ["pool", spec_fingerprint(self.spec)] if tower is None else ["tower", module_fingerprint(tower)]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()

    def resize(self, image: ImageLike) -> Tensor:
        """Short side to ``short_side`` (bicubic, as CLIP's preprocess), normalised.

        Args:
            image: a PIL image or an (H, W, 3) uint8 array.

        Returns:
            (3, H', W') in the spec's dtype and device.
        """
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
        """Logits of every method for normalised crops (B, 3, S, S): ``{method: (B, P, S, S)}`` (the grid logits of
        :func:`.maps.crop_logits` upsampled bilinearly)."""
        feats = self.spec.trunk(crops)
        grids = crop_logits(self.spec, feats, self.text, self.methods, self.mask, self.k, self.sink, self.bias_share,
                            self.sink_space)
        return {m: F.interpolate(g, size=crops.shape[-2:], mode="bilinear", align_corners=False)
                for m, g in grids.items()}

    @torch.no_grad()
    def logits(self, images: Sequence[ImageLike]) -> List[Dict[str, Tensor]]:
        """Sliding-window logits per image at the resized resolution, overlaps averaged; the crops of all ``images``
        are batched together.

        Args:
            images: PIL images or (H, W, 3) uint8 arrays.

        Returns:
            ``[{method: (P, H', W')}]``.
        """
        resized = [self.resize(im) for im in images]
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
        """Class maps per image: the sliding-window logits resized bilinearly, then argmax over classes.

        Args:
            images: PIL images or (H, W, 3) uint8 arrays (a sequence, even of one).
            sizes: (H, W) per image to predict at (default: each image's own size).

        Returns:
            ``[{method: (H, W) int64}]``.
        """
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
