"""Generated scenes with exact ground truth: the data the bundled scenes-rn / scenes-vit models are trained on, and
the harness's and applications' default dataset.

    from nha_plugin.scenes import SceneDataset, COLOURS
    scene = SceneDataset(10, seed=1000)[0]        # .image (224, 224, 3) uint8, .objects[i].mask, .captions

Modules: :mod:`.objects` (vocabulary and records), :mod:`.captions` (caption grammar and public templates),
:mod:`.generator` (rendering), :mod:`.samplers` (shift and spurious samplers), :mod:`.photos` (photo-only view).
"""
from .captions import (BACKGROUND_TEMPLATES, SINGLE_TEMPLATES, article, captions_with_facts, facts_hold,
                       object_phrase, position_phrase, sample_caption, single_caption)
from .generator import SceneDataset, generate_scene, render_background
from .objects import (BACKGROUNDS, CATEGORIES, COLOUR_RGB, COLOURS, IMAGE_SIZE, KINDS, PLAIN_BACKGROUNDS, POSITIONS,
                      SHAPES, SIZES, TEXTURE_BACKGROUNDS, Scene, SceneObject)
from .photos import PhotoCompositeDataset
from .samplers import ShiftSampler, SpuriousSampler, years

__all__ = [
    "Scene", "SceneObject", "SceneDataset", "generate_scene", "render_background", "PhotoCompositeDataset", "ShiftSampler",
    "SpuriousSampler", "years", "captions_with_facts", "sample_caption", "facts_hold", "single_caption", "article",
    "object_phrase", "position_phrase",
    "SINGLE_TEMPLATES", "BACKGROUND_TEMPLATES", "IMAGE_SIZE", "COLOURS", "COLOUR_RGB", "SHAPES", "CATEGORIES",
    "BACKGROUNDS", "PLAIN_BACKGROUNDS", "TEXTURE_BACKGROUNDS", "POSITIONS", "SIZES", "KINDS",
]
