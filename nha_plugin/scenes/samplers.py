"""Scene samplers with planted dataset-level structure: :class:`ShiftSampler` (a concept whose share shifts across
groups, for the distribution-shift monitor) and :class:`SpuriousSampler` (a label tied to a background, for
spurious-feature removal)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .generator import generate_scene
from .objects import Scene

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
