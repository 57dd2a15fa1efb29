"""Word pools: the texts that sparse descriptions are written in.

=============  ===========================================================================================
``words``      the 30,000 most frequent English words from ``wordfreq`` (its data ships in the wheel; no
               download). Filter: lower-case ASCII letters only (``str.isascii() and str.isalpha()``), at
               least two letters. This drops numbers, punctuation, contractions ("don't"), tokens with
               digits or accents and single letters; order is by frequency. ``words:10000`` takes fewer.
``imagenet``   the 1,000 ImageNet class names as open_clip ships them (``open_clip.zero_shot_metadata``).
``scenes``     the planted vocabulary of the bundled ``scenes-rn`` model (colours, shapes, categories,
               backgrounds).
a file path    one text per line (blank lines and lines starting with ``#`` skipped); also ``file:PATH``.
=============  ===========================================================================================

Templates: ``"imagenet"`` is the 80 prompt templates of CLIP's ImageNet evaluation (open_clip's
``OPENAI_IMAGENET_TEMPLATES``), turned into ``str.format`` strings with one ``{}``; ``None`` embeds each text
bare. Duplicates are removed from every pool, keeping the first occurrence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["common_words", "imagenet_classes", "imagenet_templates", "scenes_vocabulary", "read_pool",
           "get_pool", "get_templates", "POOLS"]

POOLS = ("words", "imagenet", "scenes")


def _dedupe(texts: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _is_word(w: str) -> bool:
    return len(w) >= 2 and w.isascii() and w.isalpha() and w.islower()


def common_words(n: int = 30000, lang: str = "en") -> list[str]:
    """The ``n`` most frequent ``lang`` words from ``wordfreq`` that pass the filter in the module docstring."""
    if n < 1:
        raise ValueError(f"n must be positive; got {n}")
    try:
        import wordfreq
    except ImportError as e:
        raise ImportError("the 'words' pool needs wordfreq: pip install 'nha-plugin[text]'") from e
    fetch = int(n * 1.3) + 100
    while True:
        raw = wordfreq.top_n_list(lang, fetch)
        words = [w for w in raw if _is_word(w)]
        if len(words) >= n or len(raw) < fetch:
            break
        fetch *= 2
    if len(words) < n:
        raise ValueError(f"wordfreq has only {len(words)} {lang!r} words passing the filter; asked for {n}")
    return _dedupe(words)[:n]


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet class names (open_clip's list, in class-index order)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates as format strings, e.g. ``"a bad photo of a {}."``."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def scenes_vocabulary() -> list[str]:
    """The concepts planted in ``scenes-rn``: colours, shapes, categories, backgrounds."""
    from ..scenes import BACKGROUNDS, CATEGORIES, COLOURS, SHAPES
    return _dedupe([*COLOURS, *SHAPES, *CATEGORIES, *BACKGROUNDS])


def read_pool(path: Union[str, Path]) -> list[str]:
    """One text per line from a UTF-8 file; blank lines and ``#`` comments skipped, duplicates removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list {path} not found; give a text file with one word or phrase per line")
    texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    texts = _dedupe([t for t in texts if t and not t.startswith("#")])
    if not texts:
        raise ValueError(f"word list {path} has no texts")
    return texts


def get_pool(spec: Union[str, Sequence[str]]) -> list[str]:
    """Resolve a pool: ``"words"``, ``"words:N"``, ``"imagenet"``, ``"scenes"``, ``"file:PATH"`` or a path; several
    joined with ``+`` (``"words+scenes"``); a list of strings is returned deduplicated."""
    if not isinstance(spec, str):
        texts = _dedupe([str(t) for t in spec])
        if not texts:
            raise ValueError("the word pool is empty")
        return texts
    out: list[str] = []
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        if name == "words":
            out += common_words(int(arg) if arg else 30000)
        elif name == "imagenet":
            out += imagenet_classes()
        elif name == "scenes":
            out += scenes_vocabulary()
        elif name == "file":
            out += read_pool(arg)
        elif Path(part).is_file():
            out += read_pool(part)
        else:
            raise ValueError(f"unknown word pool {part!r}: use one of {', '.join(POOLS)}, 'words:N', "
                             "'file:PATH' or the path of a text file")
    return _dedupe(out)


def get_templates(spec: Union[None, str, Sequence[str]]) -> Optional[list[str]]:
    """``None``/``"none"`` -> no templates; ``"imagenet"`` -> the 80 CLIP templates; ``"photo"`` ->
    ``["a photo of a {}."]``; a path -> one template per line; a list -> itself. Each must contain ``{}``."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        if spec == "imagenet":
            return imagenet_templates()
        if spec == "photo":
            return ["a photo of a {}."]
        templates = read_pool(spec)
    else:
        templates = list(spec)
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs one '{{}}' for the text; got {bad[:3] or templates!r}")
    return templates
