"""Word pools, templates and the text-embedding cache."""
import json
import os
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F

from nha_plugin import files, text
from nha_plugin.text import cache as cache_mod
from tests.conftest import make_tiny, planted


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
    assert len(files) == 4 and all(f.endswith(".safetensors") for f in files)


def _one_cache_file(directory):
    found = list(directory.glob("text-*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def test_corrupt_or_mismatched_cache_files_are_recomputed_with_a_warning(tiny, tmp_path, monkeypatch):
    """A cache is never an error: unreadable files, planted pickles, and files whose metadata, shape or dtype
    are not what is asked for are recomputed (the right embeddings come back) and overwritten."""
    model, tok = tiny
    words = ["red", "green", "blue"]
    truth = text.embed_texts(model, tok, words, None, cache_dir=False, progress=False)
    text.embed_texts(model, tok, words, None, cache_dir=tmp_path, progress=False)
    path = _one_cache_file(tmp_path)
    good = path.read_bytes()
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(planted(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()                      # the payload works: the assertion below can fail
    key = cache_mod.cache_key(model, tok, words, None)
    meta = {"nha_text_cache": json.dumps(key, sort_keys=True)}
    wrong = {"truncated": lambda: path.write_bytes(good[:-10]),
             "empty": lambda: path.write_bytes(b""),
             "flipped": lambda: path.write_bytes(good[:-3] + bytes([good[-3] ^ 0x55]) + good[-2:]),
             "pickle": lambda: torch.save({"embeddings": planted(marker)}, path),
             "other texts": lambda: files.save_tensors(path, {"embeddings": truth},
                                                       {"nha_text_cache": json.dumps({**key, "texts": "x"})}),
             "wrong rows": lambda: files.save_tensors(path, {"embeddings": truth[:2]}, meta),
             "wrong width": lambda: files.save_tensors(path, {"embeddings": F.normalize(truth[:, :5], dim=1)}, meta),
             "wrong dtype": lambda: files.save_tensors(path, {"embeddings": truth.double()}, meta),
             "not unit": lambda: files.save_tensors(path, {"embeddings": truth * 2}, meta),
             "no embeddings": lambda: files.save_tensors(path, {"other": truth}, meta)}
    calls = []
    real = cache_mod._embed
    monkeypatch.setattr(cache_mod, "_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, plant in wrong.items():
        plant()
        with pytest.warns(UserWarning, match="recomputing") as record:
            got = text.embed_texts(model, tok, words, None, cache_dir=tmp_path, progress=False)
        assert str(path) in str(record[0].message), name
        torch.testing.assert_close(got, truth, atol=1e-6, rtol=0)
        assert got.dtype == torch.float32 and _one_cache_file(tmp_path) == path
        assert text.embed_texts(model, tok, words, None, cache_dir=tmp_path, progress=False).shape == truth.shape
    assert len(calls) == len(wrong)                          # each recomputed once, then read from the cache
    assert not marker.exists()


def test_trimmed_context_equals_encode_text(tiny):
    model, tok = tiny
    texts = ["cat", "a photo of a yellow star on the left and a cat on grass", "coffee cup", "x"]
    trimmed = cache_mod._encode_trimmed(model, tok, texts)
    assert trimmed is not None
    with torch.no_grad():
        full = F.normalize(model.encode_text(tok(texts)).float(), dim=-1)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
