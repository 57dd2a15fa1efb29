"""Word pools, templates and the text-embedding cache."""
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F

from nha_plugin import text
from nha_plugin.text import cache as cache_mod
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(torch.float32), open_clip.get_tokenizer("RN50")


def test_common_words_filter_and_order():
    words = text.common_words(2000)
    assert len(words) == 2000 == len(set(words))
    assert words[:3] == ["the", "to", "and"]
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in words)
    assert "i" not in words and "don't" not in words


def test_imagenet_pool_and_templates_come_from_open_clip():
    classes, templates = text.imagenet_classes(), text.imagenet_templates()
    assert len(classes) == 1000 and classes[0] == "tench"
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert "a photo of a {}." in templates


def test_pool_specs(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my words\nzebra\n\nyellow star\nzebra\n")
    assert text.read_pool(path) == ["zebra", "yellow star"]
    assert text.get_pool(f"file:{path}+scenes")[:3] == ["zebra", "yellow star", "red"]
    scenes = text.get_pool("scenes")
    assert {"red", "star", "coffee cup", "grass"} <= set(scenes)
    assert text.get_pool("words:10") == text.common_words(10)
    with pytest.raises(ValueError, match="unknown word pool"):
        text.get_pool("wrods")
    assert text.get_templates("none") is None
    with pytest.raises(ValueError, match="needs one"):
        text.get_templates(["a photo"])


def test_template_embedding_is_the_normalised_mean(tiny, tmp_path):
    model, tok = tiny
    templates = ["a photo of a {}.", "a drawing of the {}."]
    got = text.embed_texts(model, tok, ["cat", "dog", "star"], templates, cache_dir=False, progress=False)
    with torch.no_grad():
        rows = []
        for w in ["cat", "dog", "star"]:
            e = F.normalize(model.encode_text(tok([t.format(w) for t in templates])).float(), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_cache_is_reused_and_keyed(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real = cache_mod._embed
    monkeypatch.setattr(cache_mod, "_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    words = ["red", "green", "blue", "circle"]
    a = text.embed_texts(model, tok, words, None, cache_dir=tmp_path, progress=False)
    b = text.embed_texts(model, tok, words, None, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and torch.equal(a, b)
    text.embed_texts(model, tok, words, ["a {}."], cache_dir=tmp_path, progress=False)
    text.embed_texts(model, tok, words[:3], None, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3
    other = make_tiny(torch.float32, seed=5)                         # other text weights: other key
    c = text.embed_texts(other, tok, words, None, cache_dir=tmp_path, progress=False)
    assert len(calls) == 4 and not torch.allclose(a, c)
    files = os.listdir(tmp_path)
    assert len(files) == 4 and not any(f.endswith(".tmp") for f in files)


def test_trimmed_context_equals_encode_text(tiny):
    model, tok = tiny
    texts = ["cat", "a photo of a yellow star on the left and a cat on grass", "coffee cup", "x"]
    trimmed = cache_mod._encode_trimmed(model, tok, texts)
    assert trimmed is not None
    with torch.no_grad():
        full = F.normalize(model.encode_text(tok(texts)).float(), dim=-1)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
