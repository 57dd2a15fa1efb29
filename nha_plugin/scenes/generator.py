"""Ground-truth scenes: 224x224 images of 1-3 objects on a background, with exact masks and captions.

Every scene is a pure function of a seed. Objects are coloured geometric shapes or rectangular photo
tiles cut from scikit-image's bundled photos; backgrounds are plain colours or scikit-image's bundled
textures. Each object carries its exact visible mask (later objects occlude earlier ones), its box and
its attributes; captions come from :mod:`nha_plugin.scenes.captions`.

Only numpy, Pillow and scikit-image's offline data are used (no downloads).

Example:
    >>> from nha_plugin.scenes import generate_scene, SceneDataset
    >>> scene = generate_scene(0)
    >>> scene.image.shape, scene.image.dtype
    ((224, 224, 3), dtype('uint8'))
    >>> ds = SceneDataset(100, seed=1)
    >>> ds[5].captions == SceneDataset(100, seed=1)[5].captions
    True
"""

from __future__ import annotations

import functools
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .captions import captions_with_facts
from .objects import (BACKGROUNDS, CATEGORIES, COLOUR_JITTER, COLOUR_RGB, COLOURS, IMAGE_SIZE, KINDS, PHOTO_CROPS,
                      PLAIN_BACKGROUNDS, POSITION_CENTRES, POSITION_JITTER, POSITIONS, SHAPES, SIZE_HALF_EXTENT, SIZES,
                      TEXTURE_BACKGROUNDS, Scene, SceneObject)

@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str, radius: int) -> np.ndarray:
    """(2r+1, 2r+1) bool mask of a shape centred in its square."""
    from skimage.draw import polygon

    n = 2 * radius + 1
    yy, xx = np.mgrid[0:n, 0:n] - radius
    if shape == "circle":
        return (yy**2 + xx**2) <= radius**2
    if shape == "square":
        h = int(round(radius * 0.75))
        return (np.abs(yy) <= h) & (np.abs(xx) <= h)
    if shape == "cross":
        arm = int(round(radius * 0.3))
        ext = int(round(radius * 0.9))
        return ((np.abs(yy) <= arm) & (np.abs(xx) <= ext)) | ((np.abs(xx) <= arm) & (np.abs(yy) <= ext))
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        rr, cc = radius * np.sin(angles), radius * np.cos(angles)
    elif shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        rr, cc = radii * np.sin(angles), radii * np.cos(angles)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.zeros((n, n), dtype=bool)
    r, c = polygon(rr + radius, cc + radius, shape=(n, n))
    mask[r, c] = True
    return mask


@functools.lru_cache(maxsize=None)
def _photo(category: str) -> np.ndarray:
    import skimage.data

    loader, (r0, r1), (c0, c1) = PHOTO_CROPS[category]
    img = getattr(skimage.data, loader)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    return np.ascontiguousarray(img[r0:r1, c0:c1, :3])


@functools.lru_cache(maxsize=None)
def _photo_tile(category: str, half: int) -> np.ndarray:
    """The category's photo resized so that its long side is 2*half+1 pixels, (h, w, 3) uint8."""
    img = _photo(category)
    h, w = img.shape[:2]
    long = 2 * half + 1
    if h >= w:
        size = (max(1, int(round(w * long / h))), long)
    else:
        size = (long, max(1, int(round(h * long / w))))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


@functools.lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """(512, 512, 3) uint8 tinted texture."""
    import skimage.data

    grey = getattr(skimage.data, name)().astype(np.float32)
    tint = np.asarray(TEXTURE_BACKGROUNDS[name], dtype=np.float32)
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)


def render_background(name: str, rng: np.random.Generator) -> np.ndarray:
    if name in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.asarray(PLAIN_BACKGROUNDS[name], np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if name in TEXTURE_BACKGROUNDS:
        tex = _texture(name)
        r0 = int(rng.integers(0, tex.shape[0] - IMAGE_SIZE + 1))
        c0 = int(rng.integers(0, tex.shape[1] - IMAGE_SIZE + 1))
        return tex[r0 : r0 + IMAGE_SIZE, c0 : c0 + IMAGE_SIZE].copy()
    raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")



Spec = Mapping[str, str]


def _rng(seed_or_rng: Union[int, Sequence[int], np.random.Generator]) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _pick(rng: np.random.Generator, options: Iterable[str], banned: Iterable[str] = ()) -> str:
    opts = [o for o in options if o not in set(banned)]
    if not opts:
        raise ValueError(f"no option left after excluding {sorted(set(banned))}")
    return opts[int(rng.integers(len(opts)))]


def generate_scene(
    seed_or_rng: Union[int, Sequence[int], np.random.Generator],
    n_objects: Optional[int] = None,
    objects: Sequence[Spec] = (),
    background: Optional[str] = None,
    exclude: Optional[Mapping[str, Iterable[str]]] = None,
    kinds: Sequence[str] = KINDS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> Scene:
    """Render one scene.

    Args:
        seed_or_rng: an int, a sequence of ints (e.g. ``(seed, index)``) or a numpy Generator.
        n_objects: number of objects (1-3); random (1: 40%, 2: 35%, 3: 25%) when None.
        objects: partial attribute specs forced on the first objects, e.g. ``[{"shape": "star"}]``.
        background: force a background; random among ``backgrounds`` when None.
        exclude: attribute values never drawn at random, e.g. ``{"category": ["cat"]}``
            (values forced through ``objects``/``background`` are still used).
        kinds: object kinds drawn at random ("shape", "photo").
        backgrounds: backgrounds drawn at random.

    Returns:
        A :class:`Scene`; ``objects`` are in painting order (later ones occlude earlier ones).
    """
    rng = _rng(seed_or_rng)
    exclude = {k: set(v) for k, v in (exclude or {}).items()}
    if n_objects is None:
        n_objects = max(len(objects), int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])))
    if not 1 <= n_objects <= len(POSITIONS) or len(objects) > n_objects:
        raise ValueError(f"n_objects must be in 1..{len(POSITIONS)} and >= len(objects); got {n_objects}")
    bg_name = background or _pick(rng, backgrounds, exclude.get("background", ()))
    image = render_background(bg_name, rng)

    specs = [dict(s) for s in objects] + [{} for _ in range(n_objects - len(objects))]
    free_positions = [p for p in POSITIONS if p not in {s.get("position") for s in specs}]
    rng.shuffle(free_positions)
    placed: List[SceneObject] = []
    paint = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int16)  # index of the object on top
    for idx, spec in enumerate(specs):
        kind = spec.get("kind") or ("shape" if "shape" in spec or "colour" in spec else
                                    "photo" if "category" in spec else _pick(rng, kinds, exclude.get("kind", ())))
        position = spec.get("position") or free_positions.pop()
        size = spec.get("size") or _pick(rng, SIZES, exclude.get("size", ()))
        half = SIZE_HALF_EXTENT[size]
        cy, cx = POSITION_CENTRES[position]
        cy += int(rng.integers(-POSITION_JITTER, POSITION_JITTER + 1))
        cx += int(rng.integers(-POSITION_JITTER, POSITION_JITTER + 1))
        obj = SceneObject(kind=kind, position=position, size=size, mask=None, box=(0, 0, 0, 0), centre=(cy, cx))
        if kind == "shape":
            obj.colour = spec.get("colour") or _pick(rng, COLOURS, exclude.get("colour", ()))
            obj.shape = spec.get("shape") or _pick(rng, SHAPES, exclude.get("shape", ()))
            base = np.asarray(COLOUR_RGB[obj.colour])
            obj.rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
            sprite_mask = _shape_mask(obj.shape, half)
            sprite = None
        elif kind == "photo":
            obj.category = spec.get("category") or _pick(rng, CATEGORIES, exclude.get("category", ()))
            sprite = _photo_tile(obj.category, half)
            sprite_mask = np.ones(sprite.shape[:2], dtype=bool)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        h, w = sprite_mask.shape
        r0, c0 = cy - h // 2, cx - w // 2
        # clip the sprite to the canvas
        sr0, sc0 = max(0, -r0), max(0, -c0)
        r0c, c0c = max(0, r0), max(0, c0)
        r1c, c1c = min(IMAGE_SIZE, r0 + h), min(IMAGE_SIZE, c0 + w)
        m = sprite_mask[sr0 : sr0 + r1c - r0c, sc0 : sc0 + c1c - c0c]
        region = image[r0c:r1c, c0c:c1c]
        if sprite is None:
            region[m] = obj.rgb
        else:
            region[m] = sprite[sr0 : sr0 + r1c - r0c, sc0 : sc0 + c1c - c0c][m]
        paint[r0c:r1c, c0c:c1c][m] = idx
        placed.append(obj)

    for idx, obj in enumerate(placed):
        obj.mask = paint == idx
        rows, cols = np.nonzero(obj.mask)
        obj.box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1) if rows.size else (0, 0, 0, 0)
    scene = Scene(image=image, objects=placed, background=bg_name, captions=[])
    scene.captions = [t for t, _ in captions_with_facts(scene)]
    return scene


class SceneDataset:
    """``n`` scenes; item ``i`` depends only on ``(seed, i)`` (and the fixed keyword arguments).

    Args:
        n: number of scenes.
        seed: dataset seed; use a seed never used in training for held-out evaluation.
        **scene_kwargs: passed to :func:`generate_scene` (e.g. ``n_objects=1``).
    """

    def __init__(self, n: int, seed: int = 0, **scene_kwargs):
        self.n, self.seed, self.scene_kwargs = int(n), int(seed), scene_kwargs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} scenes")
        i = i % self.n
        scene = generate_scene((self.seed, i), **self.scene_kwargs)
        scene.meta["index"] = i
        return scene

    def __iter__(self):
        return (self[i] for i in range(self.n))
