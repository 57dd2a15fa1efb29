"""The ground-truth scene generator: determinism, exact masks, captions that agree with the attributes."""

import numpy as np
import pytest

from nha_plugin import scenes as S
from nha_plugin.scenes import generator as G
from nha_plugin.scenes import objects as O


def _same(a: S.Scene, b: S.Scene) -> bool:
    return (np.array_equal(a.image, b.image) and a.attributes() == b.attributes() and a.captions == b.captions
            and all(np.array_equal(x.mask, y.mask) and x.box == y.box for x, y in zip(a.objects, b.objects)))


def test_vocabulary_sizes():
    assert len(S.COLOURS) >= 6 and len(S.SHAPES) >= 5 and len(S.CATEGORIES) >= 5
    assert {"grass", "gravel", "brick"} <= set(S.BACKGROUNDS)
    assert set(S.POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    assert isinstance(S.COLOURS, tuple) and S.COLOURS[0] in S.COLOUR_RGB
    # plain background colours never coincide with an object colour (masks by colour stay unambiguous)
    assert not set(S.PLAIN_BACKGROUNDS) & set(S.COLOURS)


def test_photos_and_textures_load_offline():
    for c in S.CATEGORIES:
        photo = G._photo(c)
        assert photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) >= 200
    for t in S.TEXTURE_BACKGROUNDS:
        assert G._texture(t).shape == (512, 512, 3)


def test_determinism():
    a, b = S.generate_scene((5, 3)), S.generate_scene((5, 3))
    assert _same(a, b)
    assert _same(S.SceneDataset(10, seed=5)[3], a)
    assert not np.array_equal(S.generate_scene((6, 3)).image, a.image)
    # item i depends only on (seed, i): not on the dataset length or the access order
    ds_small, ds_big = S.SceneDataset(4, seed=9), S.SceneDataset(50, seed=9)
    _ = ds_big[7]
    assert _same(ds_small[2], ds_big[2])
    assert ds_small[-1].meta["index"] == 3
    with pytest.raises(IndexError):
        ds_small[4]


def test_image_format_and_object_count():
    for i in range(30):
        sc = S.generate_scene((1, i))
        assert sc.image.shape == (224, 224, 3) and sc.image.dtype == np.uint8
        assert 1 <= len(sc.objects) <= 3
        assert len({o.position for o in sc.objects}) == len(sc.objects)
        assert sc.background in S.BACKGROUNDS
    assert sc.pil.size == (224, 224)


@pytest.mark.parametrize("shape", S.SHAPES)
def test_shape_mask_is_exact(shape):
    for i, bg in enumerate(S.PLAIN_BACKGROUNDS):
        sc = S.generate_scene((2, i), objects=[{"shape": shape}], n_objects=1, background=bg)
        (obj,) = sc.objects
        # exactly the pixels painted in the object's colour
        painted = np.all(sc.image == np.asarray(obj.rgb, np.uint8), axis=-1)
        assert np.array_equal(obj.mask, painted)
        assert obj.mask.sum() == G._shape_mask(shape, O.SIZE_HALF_EXTENT[obj.size]).sum()
        rows, cols = np.nonzero(obj.mask)
        assert obj.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        # the mask sits at its nominal position (within the jitter plus a shape's asymmetry)
        cy, cx = O.POSITION_CENTRES[obj.position]
        assert abs(rows.mean() - cy) <= O.POSITION_JITTER + 0.25 * O.SIZE_HALF_EXTENT[obj.size]
        assert abs(cols.mean() - cx) <= O.POSITION_JITTER + 1


def test_photo_tile_mask_is_exact():
    for i, cat in enumerate(S.CATEGORIES):
        sc = S.generate_scene((3, i), objects=[{"category": cat, "size": "large"}], n_objects=1, background="grass")
        (obj,) = sc.objects
        tile = G._photo_tile(cat, O.SIZE_HALF_EXTENT["large"])
        assert obj.kind == "photo" and obj.mask.sum() == tile.shape[0] * tile.shape[1]
        x0, y0, x1, y1 = obj.box
        assert (y1 - y0, x1 - x0) == tile.shape[:2]
        assert np.array_equal(sc.image[y0:y1, x0:x1], tile)
        assert obj.mask[y0:y1, x0:x1].all() and obj.mask.sum() == (y1 - y0) * (x1 - x0)


def test_masks_of_overlapping_objects_are_visible_parts():
    for i in range(40):
        sc = S.generate_scene((4, i), n_objects=3, kinds=("shape",), background="white")
        union = np.zeros((224, 224), dtype=int)
        for o in sc.objects:
            union += o.mask
            assert np.all(sc.image[o.mask] == np.asarray(o.rgb, np.uint8))
        assert union.max() <= 1  # disjoint
        # every non-background pixel belongs to exactly one object
        foreground = np.any(sc.image != np.asarray(S.PLAIN_BACKGROUNDS["white"], np.uint8), axis=-1)
        assert np.array_equal(foreground, union == 1)


def test_captions_agree_with_attributes():
    words = set(S.COLOURS) | set(S.SHAPES) | set(S.BACKGROUNDS) | {w for c in S.CATEGORIES for w in c.split()}
    rng = np.random.default_rng(0)
    for i in range(60):
        sc = S.generate_scene((7, i))
        present = set(sc.background.split())
        for o in sc.objects:
            present |= {o.colour, o.shape} if o.kind == "shape" else set(o.category.split())
        sampled = [S.sample_caption(sc, rng) for _ in range(20)]
        for text, facts in S.captions_with_facts(sc) + sampled:
            assert S.facts_hold(facts, sc), text
            assert {w for w in text.split() if w in words} <= present, (text, present)
        assert sc.captions == [t for t, _ in S.captions_with_facts(sc)]
    one = S.generate_scene(0, objects=[{"colour": "yellow", "shape": "star", "position": "left"},
                                       {"category": "cat", "position": "right"}], n_objects=2, background="grass")
    assert "yellow star" in one.captions and "a photo of a cat" in one.captions
    assert "a photo of a yellow object" in one.captions
    assert "a photo of a yellow star on the left and a cat on the right on grass" in one.captions
    # facts can be false: a caption about a different background or object does not hold
    assert not S.facts_hold(((), "brick"), one)
    assert not S.facts_hold(((frozenset({("colour", "red")}),), None), one)


def test_shift_sampler_plants_exact_shares():
    s = S.years(("colour", "red"), shares=(0.1, 0.6), n_per_group=20, seed=3)
    assert s.years == [2018, 2019]
    for year, share in zip(s.years, (0.1, 0.6)):
        group = s.group(year)
        has = [any(o.colour == "red" for o in sc.objects) for sc in group]
        assert np.mean(has) == pytest.approx(share) == s.true_share(year)
        assert has == [sc.meta["has_concept"] for sc in group]
    bg = S.ShiftSampler(("background", "grass"), shares=(0.25,), n_per_group=8, seed=0)
    assert sum(sc.background == "grass" for sc in bg.group(2018)) == 2


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5])
def test_spurious_sampler_strength(strength):
    s = S.SpuriousSampler(("cat", "rocket"), ("grass", "brick"), strength=strength, n=40, seed=1)
    labels = [sc.meta["label"] for sc in s]
    assert labels.count(0) == labels.count(1) == 20
    aligned = 0
    for sc in s:
        cats = [o.category for o in sc.objects if o.category in ("cat", "rocket")]
        assert cats == [s.labels[sc.meta["label"]]]  # exactly one labelled object, the right one
        assert sc.background in s.backgrounds
        aligned += sc.background == s.backgrounds[sc.meta["label"]]
    assert aligned == round(strength * 40)
