"""The scene vocabulary (colours, shapes, photo categories, backgrounds, positions, sizes) and the
:class:`Scene` / :class:`SceneObject` records every generated scene is made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import numpy as np
from PIL import Image

IMAGE_SIZE = 224

COLOUR_RGB: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
COLOURS: Tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# category -> (scikit-image loader name, crop rows, crop cols) of the subject in the photo
PHOTO_CROPS: Dict[str, Tuple[str, Tuple[int, int], Tuple[int, int]]] = {
    "cat": ("chelsea", (0, 300), (60, 400)),
    "astronaut": ("astronaut", (0, 400), (90, 440)),
    "coffee cup": ("coffee", (0, 400), (60, 500)),
    "rocket": ("rocket", (110, 427), (210, 430)),
    "motorcycle": ("stereo_motorcycle", (60, 460), (80, 700)),
}
CATEGORIES: Tuple[str, ...] = tuple(PHOTO_CROPS)
PLAIN_BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# texture -> RGB tint multiplied into the grey texture
TEXTURE_BACKGROUNDS: Dict[str, Tuple[float, float, float]] = {
    "grass": (0.55, 0.95, 0.45),
    "gravel": (0.95, 0.92, 0.85),
    "brick": (1.0, 0.6, 0.5),
}
BACKGROUNDS: Tuple[str, ...] = tuple(PLAIN_BACKGROUNDS) + tuple(TEXTURE_BACKGROUNDS)
# position -> nominal centre (row, col)
POSITION_CENTRES: Dict[str, Tuple[int, int]] = {
    "left": (112, 52),
    "right": (112, 172),
    "top": (52, 112),
    "bottom": (172, 112),
    "centre": (112, 112),
}
# size -> half extent in pixels (shapes: radius of the bounding circle; tiles: half the long side)
SIZE_HALF_EXTENT: Dict[str, int] = {"small": 22, "medium": 32, "large": 42}
POSITIONS: Tuple[str, ...] = tuple(POSITION_CENTRES)
SIZES: Tuple[str, ...] = tuple(SIZE_HALF_EXTENT)
KINDS = ("shape", "photo")
POSITION_JITTER = 8  # max displacement of an object from its nominal position, pixels
COLOUR_JITTER = 15  # max per-channel deviation of a shape's RGB from its nominal colour

# A fact is a constraint a caption asserts: each object constraint must be met by some object of the
# scene, and the background (if given) must match.
ObjectConstraint = FrozenSet[Tuple[str, str]]
Facts = Tuple[Tuple[ObjectConstraint, ...], Optional[str]]


@dataclass
class SceneObject:
    """One object of a scene. ``mask`` is the exact visible mask (H, W) bool; ``box`` is (x0, y0, x1, y1),
    exclusive upper bounds, of that mask. Shapes have ``colour``/``shape``/``rgb``; photo tiles ``category``."""

    kind: str
    position: str
    size: str
    mask: np.ndarray
    box: Tuple[int, int, int, int]
    colour: Optional[str] = None
    shape: Optional[str] = None
    category: Optional[str] = None
    rgb: Optional[Tuple[int, int, int]] = None
    centre: Tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        """The shape or category name ("star", "cat")."""
        return self.shape if self.kind == "shape" else self.category

    def attributes(self) -> Dict[str, str]:
        keys = ("kind", "colour", "shape", "category", "position", "size")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Scene:
    """A generated scene. ``image`` is (224, 224, 3) uint8; ``captions`` agree with the attributes."""

    image: np.ndarray
    objects: List[SceneObject]
    background: str
    captions: List[str]
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)

    def attributes(self) -> Dict[str, object]:
        return {"background": self.background, "objects": [o.attributes() for o in self.objects]}

