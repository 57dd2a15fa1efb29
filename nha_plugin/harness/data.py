"""The benchmark's evaluation items: images, the explained object's mask and its class, from the generated scenes,
the photo composites or ImageNet-Segmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..zoo import images_to_tensor

__all__ = ["BenchItem", "load_benchmark_data", "items_to_tensor"]


@dataclass
class BenchItem:
    """One evaluation image.

    Attributes:
        index: position in the benchmark (also what derives the image's seeds).
        image: (S, S, 3) uint8.
        mask: (S, S) bool mask of the explained object.
        label: its class name.
    """

    index: int
    image: np.ndarray
    mask: np.ndarray
    label: str


def load_benchmark_data(dataset: str, n: int, seed: int, path: Optional[str] = None
                        ) -> Tuple[List[BenchItem], List[str], str]:
    """Items, class names and a one-line description of the data.

    Args:
        dataset: ``scenes`` (generated scenes) | ``photos`` (scikit-image photo composites) | ``imagenet-s``.
        n: number of images.
        seed: dataset seed (scenes and photos; held out from training).
        path: ``gtsegs_ijcv.mat`` for ImageNet-S.

    Returns:
        ``(items, classes, description)``; the target of each scene is the class of its largest object.
    """
    if dataset in ("scenes", "photos"):
        from ..scenes import CATEGORIES, SHAPES, PhotoCompositeDataset, SceneDataset
        if dataset == "scenes":
            ds, classes = SceneDataset(n, seed=seed), list(SHAPES) + list(CATEGORIES)
            desc = f"generated scenes (nha_plugin.scenes), seed {seed} (held out), {n} images"
        else:
            ds, classes = PhotoCompositeDataset(n, seed=seed), list(CATEGORIES)
            desc = f"scikit-image photo composites (nha_plugin.scenes.photos), seed {seed}, {n} images"
        items = []
        for i, scene in enumerate(ds):
            obj = max(scene.objects, key=lambda o: int(o.mask.sum()))
            items.append(BenchItem(i, scene.image, obj.mask, obj.name))
        return items, classes, desc + "; target = class of the largest object"
    if dataset in ("imagenet-s", "imagenet_s", "imagenet-seg"):
        from ..datasets.imagenet_s import load_imagenet_segmentation
        if not path:
            raise ValueError("dataset imagenet-s needs --path to gtsegs_ijcv.mat (the ImageNet-Segmentation file)")
        images, masks = load_imagenet_segmentation(path, n=n, size=224)
        items = [BenchItem(i, im, mk, "object") for i, (im, mk) in enumerate(zip(images, masks))]
        return items, ["object"], f"ImageNet-Segmentation {path}, first {len(items)} images, 224 px"
    raise ValueError(f"unknown dataset {dataset!r}; expected scenes, photos or imagenet-s")


def items_to_tensor(items: Sequence[BenchItem]) -> torch.Tensor:
    """The items' images as a normalised float batch (N, 3, S, S) (CLIP's mean and standard deviation, as the
    bundled models' preprocess; no resizing)."""
    return images_to_tensor(np.stack([it.image for it in items]))
