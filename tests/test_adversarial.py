"""Adversarial word selection, the compositing generator and flip rates."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nha_plugin.applications import adversarial as adv
from nha_plugin import scenes
from nha_plugin.text import SparseCodes, TextDictionary, prepare_dictionary


def _dictionary(n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return TextDictionary(texts=[f"w{i}" for i in range(n)], embeddings=emb, atoms=prepare_dictionary(emb))


def test_describe_neurons_is_sklearn_omp():
    sklearn = pytest.importorskip("sklearn.linear_model")
    words = _dictionary()
    g = torch.Generator().manual_seed(1)
    pc1 = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=1)
    codes, k = adv.describe_neurons(pc1, words, k=128)
    assert k == 16                                                  # capped at D
    codes, k = adv.describe_neurons(pc1, words, k=6)
    ref = sklearn.orthogonal_mp(words.atoms.numpy().T, pc1.numpy().T, n_nonzero_coefs=6)   # (N, B)
    for b in range(5):
        support = np.nonzero(ref[:, b])[0]
        assert sorted(codes.indices[b].tolist()) == sorted(support.tolist())
        np.testing.assert_allclose(codes.dense(40)[b].numpy(), ref[:, b], atol=1e-8)


def test_select_adversarial_words_hand_case():
    # D = 3; class rows e0 (true), e1 (wrong): delta = e1 - e0
    rows = torch.eye(3)[:, :2]
    pcs = {4: torch.tensor([[0.0, 1.0, 0.0],        # alignment +1
                            [1.0, 0.0, 0.0],        # -1: never chosen
                            [0.0, 0.6, 0.8]]),      # +0.6
           5: torch.tensor([[-0.6, 0.0, 0.8]])}     # +0.6 (ties broken by layer, neuron)
    vocab = ["cat", "grass", "red", "star", "brick"]
    codes = {4: SparseCodes(torch.tensor([[1, 2], [0, 3], [2, 4]]),
                            torch.tensor([[0.5, 0.25], [0.9, 0.9], [-1.0, 0.5]]), torch.zeros(3), torch.ones(3)),
             5: SparseCodes(torch.tensor([[0, 4]]), torch.tensor([[2.0, 1.0]]), torch.zeros(1), torch.ones(1))}
    sel = adv.select_adversarial_words(pcs, codes, vocab, rows, 0, 1, top_neurons=3, exclude=["cat"])
    assert [(lay, n) for lay, n, _ in sel.neurons] == [(4, 0), (4, 2), (5, 0)]
    scores = dict(sel.words)
    # grass: 1*0.5; red: 1*0.25 + 0.6*(-1.0) < 0 (dropped); brick: 0.6*0.5 + 0.6*1.0; cat excluded
    assert list(scores) == ["brick", "grass"]
    assert scores["brick"] == pytest.approx(0.9) and scores["grass"] == pytest.approx(0.5)
    top1 = adv.select_adversarial_words(pcs, codes, vocab, rows, 0, 1, top_neurons=1)
    assert [w for w, _ in top1.words] == ["grass", "red"]
    with pytest.raises(ValueError, match="differ"):
        adv.select_adversarial_words(pcs, codes, vocab, rows, 1, 1)


def test_compositing_generator_pastes_requested_objects():
    base = scenes.generate_scene(3, n_objects=1, objects=[{"shape": "circle", "position": "centre"}],
                                 background="white")
    keep = base.objects[0].mask
    gen = adv.CompositingGenerator(max_objects=3, avoid=["circle"])
    assert isinstance(gen, adv.ImageGenerator)
    out = gen.generate(["red", "unknownword", "cat", "star", "grass"], base=base.image, keep=keep, seed=1)
    assert out.words == ["red", "cat", "star"]                      # max_objects reached before "grass"
    assert np.array_equal(out.image[keep], base.image[keep])         # the kept object is untouched
    pasted = np.zeros_like(keep)
    for word, m in out.masks.items():
        assert m.sum() > 100 and not (m & keep).any() and not (m & pasted).any()
        assert (out.image[m] != base.image[m]).any(axis=1).mean() > 0.9
        pasted |= m
    assert np.array_equal(out.image[~pasted], base.image[~pasted])   # nothing else changed
    red = out.image[out.masks["red"]].astype(int)
    assert np.abs(red - np.array(scenes.COLOUR_RGB["red"])).max() <= 15
    cat_tile = out.image[out.masks["cat"]]
    assert cat_tile.std() > 10                                      # a photo, not a flat colour
    # a background word replaces everything outside the kept object
    bg = adv.CompositingGenerator().generate(["gravel"], base=base.image, keep=keep, seed=2)
    assert bg.words == ["gravel"] and np.array_equal(bg.masks["gravel"], ~keep)
    assert np.array_equal(bg.image[keep], base.image[keep]) and bg.image[~keep].std() > 5
    assert gen.renderable(["cat", "dog", "grass", "red"]) == ["cat", "grass", "red"]


def test_flip_rates_on_stub_classifier():
    # the stub reads the class from the first pixel's red value
    predict = lambda ims: ims[:, 0, 0, 0].astype(int)              # noqa: E731
    img = lambda c: np.full((4, 4, 3), c, np.uint8)                 # noqa: E731
    originals = np.stack([img(0), img(0), img(1), img(2), img(0)])
    generated = np.stack([img(5), img(0), img(3), img(9), img(7)])
    true, wrong = [0, 0, 0, 2, 0], [5, 5, 5, 9, 5]
    r = adv.flip_rates(predict, originals, generated, true, wrong)
    # correct originals: 0, 1, 3, 4 -> new predictions 5 (targeted), 0 (none), 9 (targeted), 7 (untargeted)
    assert r == {"n": 5, "n_correct": 4, "targeted": 0.5, "untargeted": 0.75}
    none = adv.flip_rates(predict, originals, generated, [1, 1, 0, 0, 1], wrong)
    assert none["n_correct"] == 0 and np.isnan(none["targeted"])
