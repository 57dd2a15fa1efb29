"""Generated scenes as a segmentation set with exact masks, and the caption forms scenes-rn was trained on."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["SceneSegmentation", "scene_prompts"]


def scene_prompts(names: Sequence[str], background: Sequence[str] = ()) -> Dict[str, List[str]]:
    """The caption forms ``scenes-rn`` was trained on, per class (from the scene generator).

    Args:
        names: object classes, captioned "star", "a star", "a photo of a star", ...
        background: background classes, captioned "something on grass", "a grass background", ...

    Returns:
        class name -> its prompts.
    """
    from ...scenes import BACKGROUND_TEMPLATES, SINGLE_TEMPLATES, single_caption
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
        from ...scenes import BACKGROUNDS, CATEGORIES, SHAPES, SceneDataset
        if background not in ("classes", "ignore"):
            raise ValueError(f"background must be 'classes' or 'ignore'; got {background!r}")
        self.scenes = SceneDataset(n, seed=seed, **scene_kwargs)
        self.seed, self.scene_kwargs = seed, dict(scene_kwargs)
        self.background = background
        self.object_names = tuple(SHAPES) + tuple(CATEGORIES)
        self.background_names = tuple(BACKGROUNDS) if background == "classes" else ()
        self.class_names = self.object_names + self.background_names
        self.no_background = background == "ignore"

    def __len__(self) -> int:
        return len(self.scenes)

    def identity(self) -> dict:
        """What selects these scenes and labels (JSON-able), for run keys: a resumed evaluation refuses other
        scenes."""
        return {"type": "SceneSegmentation", "seed": self.seed, "n": len(self), "background": self.background,
                "scene_kwargs": self.scene_kwargs}

    def prompts(self) -> Dict[str, List[str]]:
        """Per-class prompt lists in the forms scenes-rn was trained on (see :func:`scene_prompts`)."""
        return scene_prompts(self.object_names, self.background_names)

    def label(self, scene) -> np.ndarray:
        """The (H, W) uint8 label of a generated scene: each pixel's visible object (or background)."""
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
