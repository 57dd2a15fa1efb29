"""The caption grammar of generated scenes: from a bare "yellow star" to full sentences ("a photo of a yellow star
on the left and a cat on grass"), each caption with the facts it asserts, so a caption can be checked against any
scene (:func:`facts_hold`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .objects import Facts, ObjectConstraint, Scene, SceneObject

def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def position_phrase(position: str) -> str:
    return {"centre": "in the centre", "top": "at the top", "bottom": "at the bottom"}.get(position, f"on the {position}")


def object_phrase(obj: SceneObject, parts: str) -> Tuple[str, ObjectConstraint]:
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
        phrase = f"{phrase} {position_phrase(obj.position)}"
        facts["position"] = obj.position
    return phrase, frozenset(facts.items())


SINGLE_TEMPLATES = ("{}", "{a}", "a photo of {a}", "a picture of {a}", "an image of {a}", "there is {a}")
BACKGROUND_TEMPLATES = (
    "something on {}",
    "a photo of something on {}",
    "a {} background",
    "a photo with a {} background",
    "{}",
)


def single_caption(phrase: str, template: str) -> str:
    return template.format(phrase, a=article(phrase))


def _sentence(objects: Sequence[SceneObject], parts: Sequence[str], background: Optional[str]) -> Tuple[str, Facts]:
    phrases, constraints = [], []
    for obj, p in zip(objects, parts):
        phrase, c = object_phrase(obj, p)
        phrases.append(article(phrase))
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
            phrase, c = object_phrase(obj, parts)
            out.append((single_caption(phrase, template), ((c,), None)))
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
        phrase, c = object_phrase(obj, parts)
        template = str(rng.choice(SINGLE_TEMPLATES))
        return single_caption(phrase, template), ((c,), None)
    if form == "background":
        return str(rng.choice(BACKGROUND_TEMPLATES)).format(scene.background), ((), scene.background)
    if form == "object+bg":
        phrase, c = object_phrase(obj, str(rng.choice(["full", "colour", "name"])))
        return f"a photo of {article(phrase)} on {scene.background}", ((c,), scene.background)
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

