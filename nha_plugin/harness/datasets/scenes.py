"""Ground-truth scenes: 224x224 images of 1-3 objects on a background, with exact masks and captions.

Every scene is a pure function of a seed. Objects are coloured geometric shapes or rectangular photo
tiles cut from scikit-image's bundled photos; backgrounds are plain colours or scikit-image's bundled
textures. Each object carries its exact visible mask (later objects occlude earlier ones), its box and
its attributes; captions are built from the attributes, from a bare "yellow star" to full sentences
("a photo of a yellow star on the left and a cat on grass").

Only numpy, Pillow and scikit-image's offline data are used (no downloads).

Example:
    >>> from nha_plugin.harness.datasets.scenes import generate_scene, SceneDataset
    >>> scene = generate_scene(0)
    >>> scene.image.shape, scene.image.dtype
    ((224, 224, 3), dtype('uint8'))
    >>> ds = SceneDataset(100, seed=1)
    >>> ds[5].captions == SceneDataset(100, seed=1)[5].captions
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

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
_PHOTO_CROPS: Dict[str, Tuple[str, Tuple[int, int], Tuple[int, int]]] = {
    "cat": ("chelsea", (0, 300), (60, 400)),
    "astronaut": ("astronaut", (0, 400), (90, 440)),
    "coffee cup": ("coffee", (0, 400), (60, 500)),
    "rocket": ("rocket", (110, 427), (210, 430)),
    "motorcycle": ("stereo_motorcycle", (60, 460), (80, 700)),
}
CATEGORIES: Tuple[str, ...] = tuple(_PHOTO_CROPS)
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
_JITTER = 8  # max displacement of an object from its nominal position, pixels
_COLOUR_JITTER = 15  # max per-channel deviation of a shape's RGB from its nominal colour

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


# ----------------------------------------------------------------------------------------------------
# cached sprites


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

    loader, (r0, r1), (c0, c1) = _PHOTO_CROPS[category]
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


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    if name in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.asarray(PLAIN_BACKGROUNDS[name], np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if name in TEXTURE_BACKGROUNDS:
        tex = _texture(name)
        r0 = int(rng.integers(0, tex.shape[0] - IMAGE_SIZE + 1))
        c0 = int(rng.integers(0, tex.shape[1] - IMAGE_SIZE + 1))
        return tex[r0 : r0 + IMAGE_SIZE, c0 : c0 + IMAGE_SIZE].copy()
    raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")


# ----------------------------------------------------------------------------------------------------
# captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_phrase(position: str) -> str:
    return {"centre": "in the centre", "top": "at the top", "bottom": "at the bottom"}.get(position, f"on the {position}")


def _object_phrase(obj: SceneObject, parts: str) -> Tuple[str, ObjectConstraint]:
    """parts: "full" (colour+shape or category), "colour", "name", "size" (size+full), each optionally
    with "+pos". Returns the noun phrase and the constraint it asserts."""
    with_pos = parts.endswith("+pos")
    parts = parts.replace("+pos", "")
    facts: Dict[str, str] = {}
    if obj.kind == "shape":
        if parts == "colour":
            phrase, facts = f"{obj.colour} object", {"colour": obj.colour}
        elif parts == "name":
            phrase, facts = obj.shape, {"shape": obj.shape}
        else:
            phrase, facts = f"{obj.colour} {obj.shape}", {"colour": obj.colour, "shape": obj.shape}
    else:
        phrase, facts = obj.category, {"category": obj.category}
    if parts == "size":
        phrase = f"{obj.size} {phrase}"
        facts["size"] = obj.size
    if with_pos:
        phrase = f"{phrase} {_position_phrase(obj.position)}"
        facts["position"] = obj.position
    return phrase, frozenset(facts.items())


_SINGLE_TEMPLATES = ("{}", "{a}", "a photo of {a}", "a picture of {a}", "an image of {a}", "there is {a}")
_BACKGROUND_TEMPLATES = (
    "something on {}",
    "a photo of something on {}",
    "a {} background",
    "a photo with a {} background",
    "{}",
)


def _single_caption(phrase: str, template: str) -> str:
    return template.format(phrase, a=_article(phrase))


def _sentence(objects: Sequence[SceneObject], parts: Sequence[str], background: Optional[str]) -> Tuple[str, Facts]:
    phrases, constraints = [], []
    for obj, p in zip(objects, parts):
        phrase, c = _object_phrase(obj, p)
        phrases.append(_article(phrase))
        constraints.append(c)
    text = "a photo of " + " and ".join(phrases)
    if background is not None:
        text += f" on {background}"
    return text, (tuple(constraints), background)


def captions_with_facts(scene: Scene) -> List[Tuple[str, Facts]]:
    """The scene's fixed caption list, each with the facts it asserts (see :func:`facts_hold`)."""
    out: List[Tuple[str, Facts]] = []
    objs = scene.objects
    for obj in objs:
        for parts, template in (
            ("full", "{}"),
            ("full", "a photo of {a}"),
            ("colour", "a photo of {a}"),
            ("name", "a photo of {a}"),
            ("full+pos", "{a}"),
        ):
            if obj.kind == "photo" and parts in ("colour", "name"):
                continue
            phrase, c = _object_phrase(obj, parts)
            out.append((_single_caption(phrase, template), ((c,), None)))
    out.append((f"a photo of something on {scene.background}", ((), scene.background)))
    out.append(_sentence(objs, ["full+pos"] * len(objs), scene.background))
    out.append(_sentence(objs, ["full"] * len(objs), None))
    # dedupe (e.g. two identical shapes) while keeping order
    seen, unique = set(), []
    for text, facts in out:
        if text not in seen:
            seen.add(text)
            unique.append((text, facts))
    return unique


def sample_caption(scene: Scene, rng: np.random.Generator) -> Tuple[str, Facts]:
    """One random caption of the scene with the facts it asserts; forms are weighted so that colour,
    shape/category, background and full sentences are all frequent (used for training)."""
    objs = scene.objects
    form = rng.choice(["colour", "name", "full", "background", "pos", "sentence", "object+bg"],
                      p=[0.14, 0.26, 0.16, 0.12, 0.06, 0.14, 0.12])
    obj = objs[int(rng.integers(len(objs)))]
    if form in ("colour", "name", "full", "pos"):
        parts = {"colour": "colour", "name": "name", "full": str(rng.choice(["full", "size"])), "pos": "full+pos"}[form]
        phrase, c = _object_phrase(obj, parts)
        template = str(rng.choice(_SINGLE_TEMPLATES))
        return _single_caption(phrase, template), ((c,), None)
    if form == "background":
        return str(rng.choice(_BACKGROUND_TEMPLATES)).format(scene.background), ((), scene.background)
    if form == "object+bg":
        phrase, c = _object_phrase(obj, str(rng.choice(["full", "colour", "name"])))
        return f"a photo of {_article(phrase)} on {scene.background}", ((c,), scene.background)
    k = int(rng.integers(1, len(objs) + 1))
    chosen = [objs[i] for i in sorted(rng.choice(len(objs), size=k, replace=False))]
    parts = [str(rng.choice(["full", "full+pos", "size", "colour", "name"])) for _ in chosen]
    bg = scene.background if rng.random() < 0.6 else None
    return _sentence(chosen, parts, bg)


def facts_hold(facts: Facts, scene: Scene) -> bool:
    """Whether every constraint of a caption's facts is met by the scene."""
    constraints, background = facts
    if background is not None and background != scene.background:
        return False
    for c in constraints:
        if not any(all(getattr(o, k) == v for k, v in c) for o in scene.objects):
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# generation

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
    image = _background(bg_name, rng)

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
        cy += int(rng.integers(-_JITTER, _JITTER + 1))
        cx += int(rng.integers(-_JITTER, _JITTER + 1))
        obj = SceneObject(kind=kind, position=position, size=size, mask=None, box=(0, 0, 0, 0), centre=(cy, cx))
        if kind == "shape":
            obj.colour = spec.get("colour") or _pick(rng, COLOURS, exclude.get("colour", ()))
            obj.shape = spec.get("shape") or _pick(rng, SHAPES, exclude.get("shape", ()))
            base = np.asarray(COLOUR_RGB[obj.colour])
            obj.rgb = tuple(int(v) for v in np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255))
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


def _concept_spec(concept: Tuple[str, str]) -> Tuple[List[Dict[str, str]], Optional[str]]:
    attr, value = concept
    if attr == "background":
        return [], value
    return [{attr: value}], None


class ShiftSampler:
    """Groups ("years") whose share of one concept shifts, for the distribution-shift monitor.

    In group ``g`` exactly ``round(shares[g] * n_per_group)`` scenes contain the concept (which scenes is
    a seeded permutation); the others never do.

    Args:
        concept: ``(attribute, value)``, e.g. ``("category", "cat")``, ``("colour", "red")``,
            ``("background", "grass")``.
        shares: the planted share of the concept in each group.
        years: group labels (default 2018, 2019, ...).
        n_per_group: scenes per group.
        seed: sampler seed.
        **scene_kwargs: passed to :func:`generate_scene`.

    Example:
        >>> s = ShiftSampler(("colour", "red"), shares=(0.1, 0.5), n_per_group=20, seed=3)
        >>> [s.true_share(y) for y in s.years]
        [0.1, 0.5]
    """

    def __init__(self, concept: Tuple[str, str] = ("category", "cat"), shares: Sequence[float] = (0.05, 0.15, 0.3, 0.5),
                 years: Optional[Sequence[int]] = None, n_per_group: int = 200, seed: int = 0, **scene_kwargs):
        self.concept = tuple(concept)
        self.shares = [float(s) for s in shares]
        self.years = list(years) if years is not None else list(range(2018, 2018 + len(self.shares)))
        if len(self.years) != len(self.shares):
            raise ValueError(f"expected one share per year; got {len(self.shares)} shares for {len(self.years)} years")
        self.n_per_group, self.seed, self.scene_kwargs = int(n_per_group), int(seed), scene_kwargs

    def _g(self, year) -> int:
        return self.years.index(year)

    def _has(self, g: int) -> np.ndarray:
        k = int(round(self.shares[g] * self.n_per_group))
        perm = np.random.default_rng((self.seed, g, 1)).permutation(self.n_per_group)
        has = np.zeros(self.n_per_group, dtype=bool)
        has[perm[:k]] = True
        return has

    def has_concept(self, year) -> np.ndarray:
        """(n_per_group,) bool: which scenes of ``year`` carry the planted concept (without rendering them)."""
        return self._has(self._g(year))

    def true_share(self, year) -> float:
        return float(self._has(self._g(year)).mean())

    def scene(self, year, i: int) -> Scene:
        g = self._g(year)
        attr, value = self.concept
        if self._has(g)[i]:
            objects, bg = _concept_spec(self.concept)
            scene = generate_scene((self.seed, g, 0, i), objects=objects, background=bg, **self.scene_kwargs)
        else:
            scene = generate_scene((self.seed, g, 0, i), exclude={attr: [value]}, **self.scene_kwargs)
        scene.meta.update(year=year, index=i, has_concept=bool(self._has(g)[i]))
        return scene

    def group(self, year) -> List[Scene]:
        return [self.scene(year, i) for i in range(self.n_per_group)]

    def __iter__(self):
        """Yields ``(year, scenes)``."""
        return ((y, self.group(y)) for y in self.years)


def years(concept: Tuple[str, str] = ("category", "cat"), shares: Sequence[float] = (0.05, 0.15, 0.3, 0.5),
          start: int = 2018, n_per_group: int = 200, seed: int = 0, **scene_kwargs) -> ShiftSampler:
    """A :class:`ShiftSampler` whose groups are consecutive years from ``start``."""
    return ShiftSampler(concept, shares, list(range(start, start + len(shares))), n_per_group, seed, **scene_kwargs)


class SpuriousSampler:
    """A labelled set with a planted label <-> background correlation, for spurious-feature removal.

    Scene ``i`` has label ``i % len(labels)``: one object carries ``(attribute, labels[label])`` and no
    other object carries any label value. With probability ``strength`` (exactly: a seeded permutation
    picks ``round(strength * n)`` scenes) the background is ``backgrounds[label]`` ("aligned"); otherwise
    it is one of the other listed backgrounds. ``strength = 1/len(labels)`` plants no correlation.

    Args:
        labels: label values of ``attribute``.
        backgrounds: the background each label is tied to (same length as ``labels``).
        strength: share of aligned scenes.
        n: number of scenes.
        seed: sampler seed.
        attribute: "category", "shape" or "colour".

    Example:
        >>> s = SpuriousSampler(("cat", "rocket"), ("grass", "brick"), strength=0.9, n=10, seed=0)
        >>> s[0].meta["label"], s[0].objects[0].category in ("cat", "rocket")
        (0, True)
    """

    def __init__(self, labels: Sequence[str] = ("cat", "rocket"), backgrounds: Sequence[str] = ("grass", "brick"),
                 strength: float = 0.9, n: int = 400, seed: int = 0, attribute: str = "category", **scene_kwargs):
        if len(labels) != len(backgrounds) or len(labels) < 2:
            raise ValueError(f"expected >= 2 labels and one background per label; got {labels} and {backgrounds}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1]; got {strength}")
        self.labels, self.backgrounds = list(labels), list(backgrounds)
        self.strength, self.n, self.seed, self.attribute = float(strength), int(n), int(seed), attribute
        self.scene_kwargs = scene_kwargs
        perm = np.random.default_rng((self.seed, 1)).permutation(self.n)
        self.aligned = np.zeros(self.n, dtype=bool)
        self.aligned[perm[: int(round(self.strength * self.n))]] = True

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} scenes")
        label = i % len(self.labels)
        rng = np.random.default_rng((self.seed, 0, i))
        if self.aligned[i]:
            bg = self.backgrounds[label]
        else:
            others = [b for j, b in enumerate(self.backgrounds) if j != label]
            bg = others[int(rng.integers(len(others)))]
        scene = generate_scene(rng, objects=[{self.attribute: self.labels[label]}], background=bg,
                               exclude={self.attribute: self.labels}, **self.scene_kwargs)
        scene.meta.update(index=i, label=label, aligned=bool(self.aligned[i]))
        return scene

    def __iter__(self):
        return (self[i] for i in range(self.n))
