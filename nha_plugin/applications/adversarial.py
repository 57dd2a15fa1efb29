"""Semantic adversarial images from second-order neuron descriptions (docs/methods.md §3), with an offline generator.

The paper picks neurons whose second-order direction points from the true class towards a wrong one, takes
words from their sparse text descriptions, has an LLM write scene descriptions with those words and renders
them with a text-to-image model. The selection step is exact here, the generator is an interface:

1. :func:`describe_neurons`: OMP with ``k`` atoms (128 in the paper) of every neuron's PC1 over a word pool
   (reuses :func:`nha_plugin.text.sparse_decompose` and a :class:`~nha_plugin.text.TextDictionary`).
2. :func:`select_adversarial_words`: ``delta = row[wrong] - row[true]`` (the zero-shot classifier's unit class
   rows); a neuron's alignment is ``<PC1_n, delta>`` (PC1 signed so that the neuron's large effects project
   positively); the ``top_neurons`` with the largest positive alignment are kept; a word's score is
   ``sum_n alignment_n * coefficient_{n,word}`` over those neurons (a word written *against* the direction of
   an aligned neuron counts negatively); words with a positive score are ranked by it, class names excluded.
3. An :class:`ImageGenerator` turns words into images. :class:`CompositingGenerator` works offline: it pastes
   planted-scene objects (rendered by :func:`nha_plugin.scenes.generate_scene`, exact masks)
   named by the words into an image, or puts a kept object onto a background a word names.
4. :func:`flip_rates`: how often a classifier's correct decision flips (to the wrong class: targeted; to any
   other class: untargeted) on the generated images; run the same with random renderable words as control.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = ["describe_neurons", "AdversarialWords", "select_adversarial_words", "GeneratedImage", "ImageGenerator",
           "CompositingGenerator", "flip_rates"]


def describe_neurons(pc1: Tensor, dictionary, k: int = 128, *, device=None, progress: bool = False):
    """Sparse text descriptions (OMP, exactly ``k`` atoms) of neurons' unit PC1 directions.

    Args:
        pc1: (M, D) directions (``SecondOrderStats.pc1(...)["pc1"]``).
        dictionary: a :class:`~nha_plugin.text.TextDictionary` (``text.build_dictionary``) of the same model.
        k: atoms per neuron; lowered to ``min(k, D, (N - 1) // 2)`` for a small pool or width: a centred pool of
            N texts spans only N - 1 dimensions, and a code using most of a small pool is neither sparse nor well
            conditioned (its coefficients blow up along near-dependent atoms).

    Returns:
        (codes, k_used): :class:`~nha_plugin.text.SparseCodes` sorted by |coefficient|, and the k used.
    """
    from ..text.omp import sparse_decompose
    k_used = max(1, min(int(k), pc1.shape[1], (len(dictionary) - 1) // 2))
    codes = sparse_decompose(pc1, dictionary.atoms, k=k_used, device=device, progress=progress)
    return codes, k_used


@dataclass
class AdversarialWords:
    """The words that push one image's decision from ``true`` towards ``wrong``.

    Attributes:
        true, wrong: class indices.
        neurons: [(layer, neuron, alignment)] the selected neurons, by decreasing alignment.
        words: [(word, score)] by decreasing score (all positive).
    """

    true: int
    wrong: int
    neurons: List[Tuple[int, int, float]]
    words: List[Tuple[str, float]]


def select_adversarial_words(pcs: Dict[int, Tensor], codes: Dict[int, object], vocabulary: Sequence[str],
                             class_rows: Tensor, true: int, wrong: int, *, top_neurons: int = 20,
                             exclude: Sequence[str] = ()) -> AdversarialWords:
    """Rank words for a (true -> wrong) attack, exactly as described in the module docstring.

    Args:
        pcs: layer -> (M, D) unit PC1 directions.
        codes: layer -> SparseCodes of those directions (same row order), e.g. :func:`describe_neurons`.
        vocabulary: the dictionary's texts (``codes.indices`` index it).
        class_rows: (D, C) the classifier's unit class embeddings (``ZeroShotClassifier.readout``).
        true, wrong: class indices.
        top_neurons: neurons kept (largest positive alignment over all given layers).
        exclude: texts never returned (e.g. the class names: an object of the wrong class is not an attack).
    """
    if true == wrong:
        raise ValueError(f"true and wrong must differ; got {true} for both")
    delta = (class_rows[:, wrong] - class_rows[:, true]).double()
    cand = []
    for layer, pc in pcs.items():
        align = pc.double().to(delta.device) @ delta
        for n in torch.nonzero(align > 0).flatten().tolist():
            cand.append((float(align[n]), int(layer), int(n)))
    cand.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen = cand[:top_neurons]
    banned = set(exclude)
    scores: Dict[str, float] = {}
    for a, layer, n in chosen:
        c = codes[layer]
        for i, coef in zip(c.indices[n].tolist(), c.coefficients[n].tolist()):
            word = vocabulary[i]
            if word not in banned:
                scores[word] = scores.get(word, 0.0) + a * coef
    ranked = sorted(((w, s) for w, s in scores.items() if s > 0), key=lambda t: -t[1])
    return AdversarialWords(true, wrong, [(layer, n, a) for a, layer, n in chosen], ranked)


# ---- generators ------------------------------------------------------------------------------------------
@dataclass
class GeneratedImage:
    """A generated image (H, W, 3) uint8, the words it depicts and, where known, their exact masks (H, W)."""

    image: np.ndarray
    words: List[str]
    masks: Dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class ImageGenerator(Protocol):
    """Words -> an image. ``base`` / ``keep`` optionally give an image to edit and the (H, W) bool mask of what
    must stay (the true object); a text-to-image model may ignore both. ``renderable`` filters the words the
    generator can depict (used to pick control words)."""

    def generate(self, words: Sequence[str], *, base: Optional[np.ndarray] = None,
                 keep: Optional[np.ndarray] = None, seed: int = 0) -> GeneratedImage:
        ...

    def renderable(self, words: Sequence[str]) -> List[str]:
        ...


class CompositingGenerator:
    """Offline generator: pastes planted-scene objects named by words into ``base``.

    A shape word ("star") pastes that shape in a random colour, a colour word ("red") a random shape of that
    colour (never one of ``avoid``), a category word ("cat") its photo tile; a background word ("grass")
    replaces everything outside ``keep`` by that background. Objects go to free positions of the scene grid
    (left/right/top/bottom/centre) not overlapping ``keep``; pixels of ``keep`` are never painted. At most
    ``max_objects`` words are used, in the given order; words it cannot depict are skipped.

    Args:
        max_objects: words used per image.
        size: object size ("small" | "medium" | "large").
        avoid: shape/category names a colour word must not bring in (e.g. the class names).
    """

    def __init__(self, max_objects: int = 2, size: str = "medium", avoid: Sequence[str] = ()):
        from .. import scenes
        if size not in scenes.SIZES:
            raise ValueError(f"size must be one of {scenes.SIZES}; got {size!r}")
        self.max_objects, self.size, self.avoid = int(max_objects), size, set(avoid)
        self._scenes = scenes

    def _spec(self, word: str, rng: np.random.Generator) -> Optional[dict]:
        s = self._scenes
        if word in s.SHAPES:
            return {"shape": word}
        if word in s.CATEGORIES:
            return {"category": word}
        if word in s.COLOURS:
            shapes = [x for x in s.SHAPES if x not in self.avoid] or list(s.SHAPES)
            return {"colour": word, "shape": shapes[int(rng.integers(len(shapes)))]}
        return None

    def renderable(self, words: Sequence[str]) -> List[str]:
        s = self._scenes
        ok = set(s.SHAPES) | set(s.CATEGORIES) | set(s.COLOURS) | set(s.BACKGROUNDS)
        return [w for w in words if w in ok]

    def generate(self, words: Sequence[str], *, base: Optional[np.ndarray] = None,
                 keep: Optional[np.ndarray] = None, seed: int = 0) -> GeneratedImage:
        s = self._scenes
        rng = np.random.default_rng(seed)
        size = s.IMAGE_SIZE
        image = (np.array(base, dtype=np.uint8, copy=True) if base is not None
                 else np.full((size, size, 3), 128, np.uint8))
        if image.shape != (size, size, 3):
            raise ValueError(f"base must be ({size}, {size}, 3) uint8 like the scenes; got {image.shape}")
        keep = np.zeros((size, size), bool) if keep is None else np.asarray(keep, bool)
        occupied = keep.copy()
        used, masks = [], {}
        for word in words:
            if len(used) >= self.max_objects:
                break
            if word in s.BACKGROUNDS:
                if not keep.any() or word in used:
                    continue
                bg = s.render_background(word, rng)       # the scene renderer's own background painter
                outside = ~occupied
                image[outside] = bg[outside]
                used.append(word)
                masks[word] = outside
                continue
            spec = self._spec(word, rng)
            if spec is None:
                continue
            for pos in rng.permutation(s.POSITIONS).tolist():
                scene = s.generate_scene(rng, n_objects=1, objects=[{**spec, "position": pos, "size": self.size}],
                                         background="black")
                m = scene.objects[0].mask
                if (m & occupied).sum() > 0.1 * m.sum():
                    continue
                m = m & ~occupied
                image[m] = scene.image[m]
                occupied |= m
                used.append(word)
                masks[word] = m
                break
        return GeneratedImage(image, used, masks)


# ---- evaluation ------------------------------------------------------------------------------------------
def flip_rates(predict: Callable[[np.ndarray], np.ndarray], originals: np.ndarray, generated: np.ndarray,
               true: Sequence[int], wrong: Sequence[int]) -> dict:
    """Decision flips on generated images, counted over the images whose original was classified correctly.

    Args:
        predict: images (N, H, W, 3) uint8 -> predicted class indices (N,).
        originals, generated: (N, H, W, 3) uint8, generated[i] made from originals[i].
        true, wrong: (N,) the true and the targeted wrong class of each image.

    Returns:
        ``{"n": N, "n_correct": originals classified correctly, "targeted": share of those now predicted as
        ``wrong``, "untargeted": share now predicted as anything but ``true``}`` (NaN rates when n_correct = 0).
    """
    true, wrong = np.asarray(true), np.asarray(wrong)
    p0, p1 = np.asarray(predict(originals)), np.asarray(predict(generated))
    ok = p0 == true
    n_ok = int(ok.sum())
    rate = (lambda m: float(m[ok].mean()) if n_ok else float("nan"))
    return {"n": int(len(true)), "n_correct": n_ok, "targeted": rate(p1 == wrong), "untargeted": rate(p1 != true)}
