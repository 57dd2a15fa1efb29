"""scikit-image photo composites: one to three photo tiles (cat, astronaut, coffee cup, rocket, motorcycle) cut
from scikit-image's bundled photos, pasted on textured or plain backgrounds, with exact masks.

A thin view of :mod:`nha_plugin.scenes` restricted to photo objects, so every item is a pure
function of its seed and carries ``.image`` (224, 224, 3) uint8 and ``.objects[i].mask``.

Example:
    >>> from nha_plugin.scenes.photos import PhotoCompositeDataset
    >>> item = PhotoCompositeDataset(4, seed=10_000)[0]
    >>> all(o.kind == "photo" for o in item.objects)
    True
"""
from __future__ import annotations

from .generator import SceneDataset
from .objects import CATEGORIES

__all__ = ["PhotoCompositeDataset", "CLASS_NAMES"]

CLASS_NAMES = tuple(CATEGORIES)


class PhotoCompositeDataset(SceneDataset):
    """``n`` composites of scikit-image photo tiles; item ``i`` depends only on ``(seed, i)``."""

    def __init__(self, n: int, seed: int = 0, **scene_kwargs):
        scene_kwargs.setdefault("kinds", ("photo",))
        super().__init__(n, seed=seed, **scene_kwargs)
