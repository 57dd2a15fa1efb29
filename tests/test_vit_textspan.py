"""TextSpan on CLIP-ViT heads: agreement with text_span on the stacked tensors, exact full-span
reconstruction, mean-ablation against the decomposition's own and a dense sum, resumable collection."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_greedy_picks_agree, assert_pickle_would_run, images_for, scaled_tol,
                      write_malicious_pickle)
from nha_plugin import files, runs, vit
from nha_plugin.text import text_span
from nha_plugin.vit import textspan_heads as TS


@pytest.fixture(scope="module")
def setup(tiny_vit64):
    images = images_for(tiny_vit64, batch=10, seed=3)
    stats = TS.collect_head_statistics(tiny_vit64, images, layers=None, batch_size=4, progress=False)
    texts = [f"text {i}" for i in range(40)]
    T = F.normalize(torch.randn(40, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=-1)
    return tiny_vit64, images, stats, texts, T


def test_statistics_are_the_decomposition(setup):
    model, images, stats, _, _ = setup
    assert stats.layers == [0, 1, 2] and stats.num_layers == 3          # min(4, L) = all three layers
    c = vit.decompose(model, images)
    heads = c.head_contributions()
    assert torch.allclose(stats.contributions, heads, atol=1e-12, rtol=0)
    assert torch.allclose(stats.layer_heads, heads.sum(dim=2), atol=1e-12, rtol=0)
    assert torch.allclose(stats.head_means, heads.mean(dim=0), atol=1e-12, rtol=0)
    with torch.no_grad():
        assert torch.allclose(stats.embedding, model.encode_image(images), atol=1e-10, rtol=0)
    assert TS.resolve_layers(12) == [8, 9, 10, 11] and TS.resolve_layers(12, [-1, 3]) == [3, 11]
    assert TS.resolve_layers(3, 4) == [0, 1, 2] and TS.resolve_layers(3, 1) == [2]
    with pytest.raises(ValueError, match="out of range"):
        TS.resolve_layers(3, [5])


def test_spans_agree_with_text_span_on_stacked_tensors(setup):
    model, images, stats, texts, T = setup
    spans = TS.head_text_spans(stats, T, texts, m=5, rank=80, progress=False)
    assert [(s.layer, s.head) for s in spans] == [(l, h) for l in range(3) for h in range(4)]
    heads = vit.decompose(model, images).head_contributions().detach()
    for s in spans:
        ref = text_span(heads[:, s.layer, s.head], T, texts, m=5, rank=80)
        assert_greedy_picks_agree(s, ref)
        if not torch.equal(s.indices, ref.indices):                      # a near-tie: the spans differ
            continue
        assert s.texts == ref.texts
        assert s.rank == 10                                             # r = 80 clipped to K = 10 images
        # the orthonormal basis reproduces text_span's own reconstruction of the data
        rebuilt = TS.project_onto_span(heads[:, s.layer, s.head], s)
        assert torch.allclose(rebuilt, ref.reconstruction, atol=1e-12, rtol=0)
        assert torch.allclose(s.basis @ s.basis.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
        assert torch.all(torch.diff(s.explained) >= -1e-15) and 0 < float(s.explained[-1]) <= 1 + 1e-12
    assert json.loads(json.dumps(TS.spans_to_json(spans)))[0]["unit"] == "L0H0"


def test_full_span_reconstruction_is_exact(setup):
    model, images, stats, texts, T = setup
    # r = min(80, K, D) = 10 and m = r texts: the span holds every centred contribution
    spans = TS.head_text_spans(stats, T, texts, m=80, rank=80, progress=False)
    assert all(len(s.indices) == 10 for s in spans)
    assert all(abs(float(s.explained[-1]) - 1) < 1e-10 for s in spans)
    y = TS.reconstructed_embeddings(stats, spans, m=None)
    with torch.no_grad():
        ref = model.encode_image(images)
    assert (y - ref).abs().max() < 1e-10
    w = F.normalize(torch.randn(32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=0)
    labels = TS.predict(ref, w)
    report = TS.reconstruction_report(stats, spans, w, labels, ms=(1, 10))
    assert report["original"] == 1.0 and report["textspan"][10] == 1.0 and report["analysed_heads_only"] == 1.0
    # m = 0 is the all-heads mean-ablation
    assert torch.allclose(TS.reconstructed_embeddings(stats, spans, m=0),
                          TS.mean_ablated_embeddings(stats, torch.ones(3, 4, dtype=torch.bool)), atol=1e-12)
    assert set(report["layer_mean_ablated"]) == {0, 1, 2}


def test_reconstruction_with_earlier_layers_ablated(tiny_vit64):
    images = images_for(tiny_vit64, batch=6, seed=4)
    stats = TS.collect_head_statistics(tiny_vit64, images, layers=1, progress=False)
    assert stats.layers == [2] and stats.contributions.shape == (6, 1, 4, 32)
    T = F.normalize(torch.randn(30, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=-1)
    spans = TS.head_text_spans(stats, T, m=6, progress=False)
    c = vit.decompose(tiny_vit64, images)
    heads = c.head_contributions()
    means = heads.mean(dim=0)
    # dense reference: last layer's heads kept exactly (full span), layers 0-1 replaced by their means
    dense = c.embedding_term + c.mlp.sum(dim=1) + heads[:, 2].sum(dim=1) + means[:2].sum(dim=(0, 1))
    assert torch.allclose(TS.reconstructed_embeddings(stats, spans, m=None), dense, atol=1e-10, rtol=0)


def test_mean_ablation_matches_decomposition_and_dense_sum(setup):
    model, images, stats, _, _ = setup
    c = vit.decompose(model, images)
    heads = c.head_contributions()
    means = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    drop = torch.zeros(3, 4, dtype=torch.bool)
    drop[0, 1] = drop[2, 0] = drop[2, 3] = True
    ours = TS.mean_ablated_embeddings(stats, drop, means)
    assert torch.allclose(ours, c.mean_ablated(head_mask=~drop, head_means=means), atol=1e-12, rtol=0)
    dense = c.embedding_term + c.mlp.sum(dim=1)
    for l in range(3):
        for h in range(4):
            dense = dense + (means[l, h] if drop[l, h] else heads[:, l, h])
    assert torch.allclose(ours, dense, atol=1e-10, rtol=0)
    assert torch.allclose(TS.mean_ablated_embeddings(stats, torch.zeros(3, 4, dtype=torch.bool)),
                          model.encode_image(images).detach(), atol=1e-10, rtol=0)


def test_collection_resumes_from_parts(tiny_vit64, tmp_path, monkeypatch):
    images = images_for(tiny_vit64, batch=5, seed=6)
    with pytest.raises(ValueError, match="needs meta"):                   # a function source needs a resume key
        TS.collect_head_statistics(tiny_vit64, lambda a, b: images[a:b], 5, parts_dir=tmp_path / "p", progress=False)
    first = TS.collect_head_statistics(tiny_vit64, lambda a, b: images[a:b], 5, batch_size=2, progress=False,
                                       parts_dir=tmp_path / "p", meta={"images": "seed 6"})
    assert sorted(p.name for p in (tmp_path / "p").glob("part_*")) == [
        "part_00000.part.safetensors", "part_00001.part.safetensors", "part_00002.part.safetensors"]
    (tmp_path / "p" / "part_00001.part.safetensors").unlink()            # a run killed after two batches
    calls = []
    real = TS._batch_parts
    monkeypatch.setattr(TS, "_batch_parts", lambda *a: calls.append(1) or real(*a))
    again = TS.collect_head_statistics(tiny_vit64, lambda a, b: images[a:b], 5, batch_size=2, progress=False,
                                       parts_dir=tmp_path / "p", meta={"images": "seed 6"})
    assert len(calls) == 1
    torch.testing.assert_close(again.contributions, first.contributions, rtol=1e-12, atol=scaled_tol(first.contributions))
    torch.testing.assert_close(again.head_means, first.head_means, rtol=1e-12, atol=scaled_tol(first.head_means))
    with pytest.raises(runs.RunMismatchError, match="config.batch_size: found 2, expected 3"):
        TS.collect_head_statistics(tiny_vit64, images, batch_size=3, progress=False, parts_dir=tmp_path / "p")
    first.save(tmp_path / "s.safetensors")
    loaded = TS.HeadStatistics.load(tmp_path / "s.safetensors")
    for f in dataclasses.fields(first):
        a, b = getattr(loaded, f.name), getattr(first, f.name)
        assert torch.equal(a, b) and a.dtype == b.dtype if isinstance(b, torch.Tensor) else a == b, f.name


def test_textspan_cli(monkeypatch, tmp_path, tiny_vit64):
    import open_clip

    import nha_plugin
    from nha_plugin.cli import vit as vit_cli
    monkeypatch.setattr(nha_plugin.models, "load_clip",
                        lambda *a, **k: (tiny_vit64, None, open_clip.tokenizer.SimpleTokenizer()))
    out = tmp_path / "ts.json"
    assert vit_cli.main(["textspan", "--model", "scenes-vit", "--n", "8", "--layers", "2", "--m", "3", "--ms", "1,3",
                         "--out", str(out), "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["layers"] == [1, 2] and res["protocol"]["rank"] == 8 and len(res["heads"]) == 8
    assert all(len(h["texts"]) == 3 and 0 <= h["variance_explained"] <= 1 + 1e-9 for h in res["heads"])
    acc = res["accuracy"]
    assert set(acc["textspan"]) == {"1", "3"} and set(acc["layer_mean_ablated"]) == {"0", "1", "2"}
    assert "| original |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").exists()


def test_basis_of_a_degenerate_pool_has_no_invented_directions():
    # contributions in a 2-dim subspace, texts: two inside it, the third a copy of the first -> its pick adds
    # nothing, so its basis row must be zero and projections stay inside the data's span
    g = torch.Generator().manual_seed(0)
    e = torch.eye(6, dtype=torch.float64)
    X = torch.randn(12, 2, generator=g, dtype=torch.float64) @ e[:2] + 0.3 * e[4]
    T = torch.stack([e[0], F.normalize(e[0] + e[1], dim=0), e[0], e[3]])
    basis = TS._span_basis(X, T, torch.tensor([0, 1, 2, 3]), rank=3)        # rank(X) = 3 (e0, e1, e4)
    assert torch.allclose(basis[:2] @ basis[:2].T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert basis[2:].abs().max() == 0
    # head_text_spans clips r = 80 to that rank, so e3 (outside the data) is never credited
    stats = TS.HeadStatistics(layers=[0], num_layers=1, contributions=X[:, None, None], layer_heads=X[:, None],
                              embedding=X, head_means=X.mean(0)[None, None])
    span = TS.head_text_spans(stats, T, ["a", "b", "c", "d"], m=20, progress=False)[0]
    assert span.rank == 3 and len(span.indices) == 3 and abs(float(span.explained[-1]) - 1) < 1e-12


def test_parts_of_other_meta_are_refused(tiny_vit64, tmp_path):
    images = images_for(tiny_vit64, batch=2, seed=7)
    TS.collect_head_statistics(tiny_vit64, images, progress=False, parts_dir=tmp_path, meta={"seed": 1})
    with pytest.raises(runs.RunMismatchError, match="data.meta.seed: found 1, expected 2"):
        TS.collect_head_statistics(tiny_vit64, images, progress=False, parts_dir=tmp_path, meta={"seed": 2})


# ---- safe, resumable collection ---------------------------------------------------------------------------
def _assert_same_statistics(a, b) -> None:
    for f in dataclasses.fields(b):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(y, torch.Tensor):
            assert x.dtype == y.dtype, f.name
            torch.testing.assert_close(x, y, rtol=1e-12, atol=scaled_tol(y), msg=f.name)
        else:
            assert x == y, f.name


def test_parts_of_other_images_with_the_same_meta_are_refused(tiny_vit64, tmp_path):
    """The same meta but other images: a function source is caught by the part's stored fingerprint, a tensor by
    the run key; with fresh=True the other images are recomputed, equal to a run without parts."""
    mine, other = images_for(tiny_vit64, batch=4, seed=8), images_for(tiny_vit64, batch=4, seed=9)
    kw = dict(batch_size=2, progress=False, meta={"dataset": "the same words"})
    TS.collect_head_statistics(tiny_vit64, lambda a, b: mine[a:b], 4, parts_dir=tmp_path / "f", **kw)
    with pytest.raises(runs.RunMismatchError, match="part_00000 was computed on other images than images 0..1"):
        TS.collect_head_statistics(tiny_vit64, lambda a, b: other[a:b], 4, parts_dir=tmp_path / "f", **kw)
    changed_late = torch.cat([mine[:2], other[2:]])                      # batch 0 agrees, batch 1 does not
    with pytest.raises(runs.RunMismatchError, match="part_00001 was computed on other images than images 2..3"):
        TS.collect_head_statistics(tiny_vit64, lambda a, b: changed_late[a:b], 4, parts_dir=tmp_path / "f", **kw)
    TS.collect_head_statistics(tiny_vit64, mine, parts_dir=tmp_path / "t", **kw)
    with pytest.raises(runs.RunMismatchError, match="data.images"):
        TS.collect_head_statistics(tiny_vit64, other, parts_dir=tmp_path / "t", **kw)
    fresh = TS.collect_head_statistics(tiny_vit64, lambda a, b: other[a:b], 4, parts_dir=tmp_path / "f",
                                       fresh=True, **kw)
    _assert_same_statistics(fresh, TS.collect_head_statistics(tiny_vit64, other, **kw))


def test_killed_collection_resumes_to_the_same_statistics(tiny_vit64, tmp_path, monkeypatch):
    images = images_for(tiny_vit64, batch=7, seed=10)
    kw = dict(layers=2, batch_size=2, labels=range(7), groups=[i % 3 for i in range(7)], progress=False,
              meta={"images": "seed 10"})
    straight = TS.collect_head_statistics(tiny_vit64, images, **kw)

    def dies_at_batch_2(a, b):
        if a == 4:
            raise KeyboardInterrupt
        return images[a:b]
    with pytest.raises(KeyboardInterrupt):
        TS.collect_head_statistics(tiny_vit64, dies_at_batch_2, 7, parts_dir=tmp_path, **kw)
    done = []
    real = TS._batch_parts
    monkeypatch.setattr(TS, "_batch_parts", lambda model, x, layers: done.append(len(x)) or real(model, x, layers))
    resumed = TS.collect_head_statistics(tiny_vit64, lambda a, b: images[a:b], 7, parts_dir=tmp_path, **kw)
    assert done == [2, 1]                                                # only batches 2 and 3 were decomposed
    _assert_same_statistics(resumed, straight)


def test_statistics_files_are_never_unpickled(tiny_vit64, tmp_path):
    marker = tmp_path / "executed"
    for name in ("s.safetensors", "s.pt"):
        data = write_malicious_pickle(tmp_path / name, marker)
        with pytest.raises(files.CorruptFileError, match=name):
            TS.HeadStatistics.load(tmp_path / name)
    files.save_state(tmp_path / "other.safetensors", {"format": "something else"})
    with pytest.raises(files.CorruptFileError, match="no head statistics"):
        TS.HeadStatistics.load(tmp_path / "other.safetensors")
    assert not marker.exists()
    assert_pickle_would_run(data, marker)


def _textspan(tmp_path, parts, *extra):
    from nha_plugin.cli import vit as vit_cli
    return vit_cli.main(["textspan", "--model", "scenes-vit", "--n", "4", "--batch-size", "2", "--layers", "1",
                         "--m", "2", "--ms", "1,2", "--out", str(tmp_path / "ts.json"), "--quiet",
                         "--cache-dir", str(tmp_path / "c"), "--parts", str(parts), *extra])


@pytest.fixture
def tiny_textspan(monkeypatch, tiny_vit64):
    import open_clip

    import nha_plugin
    monkeypatch.setattr(nha_plugin.models, "load_clip",
                        lambda *a, **k: (tiny_vit64, None, open_clip.tokenizer.SimpleTokenizer()))


def test_textspan_cli_never_unpickles_what_it_finds(tiny_textspan, tmp_path, capsys):
    """A pickle planted under each name the command reads (in an empty parts folder and in a genuine run's) gives
    one line naming it and exit 2; under the old format's names it is ignored; it never runs."""
    marker = tmp_path / "executed"
    assert _textspan(tmp_path, tmp_path / "genuine") == 0
    genuine = {p.name: p.read_bytes() for p in (tmp_path / "genuine").iterdir()}
    assert sorted(genuine) == ["part_00000.part.safetensors", "part_00001.part.safetensors", "run.json"]
    capsys.readouterr()
    for i, name in enumerate([*genuine, "part_00000.pt", "key.json", "ts.json"]):
        for seeded in (False, True):
            parts = tmp_path / f"case{i}{seeded}"
            for other, data in genuine.items() if seeded else ():
                (parts / other).parent.mkdir(exist_ok=True)
                (parts / other).write_bytes(data)
            data = write_malicious_pickle((tmp_path if name == "ts.json" else parts) / name, marker)
            rc = _textspan(tmp_path, parts)
            err = capsys.readouterr().err
            if name in genuine:
                assert rc == 2 and name in err and len(err.strip().splitlines()) == 1, (name, seeded, err)
            else:
                assert rc == 0 and not err, (name, seeded, err)
            assert not marker.exists()
    assert json.loads((tmp_path / "ts.json").read_text())["protocol"]["layers"] == [2]
    assert_pickle_would_run(data, marker)


def test_textspan_cli_resumes_refuses_another_run_and_starts_fresh(tiny_textspan, tmp_path, capsys, monkeypatch):
    assert _textspan(tmp_path / "a", tmp_path / "none") == 0
    straight = json.loads((tmp_path / "a" / "ts.json").read_text())
    calls = []
    real = TS._batch_parts

    def dies_at_batch_1(model, x, layers):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, x, layers)
    monkeypatch.setattr(TS, "_batch_parts", dies_at_batch_1)
    with pytest.raises(KeyboardInterrupt):
        _textspan(tmp_path / "b", tmp_path / "parts")
    monkeypatch.setattr(TS, "_batch_parts", real)
    assert _textspan(tmp_path / "b", tmp_path / "parts") == 0
    resumed = json.loads((tmp_path / "b" / "ts.json").read_text())
    assert resumed["accuracy"] == straight["accuracy"]
    assert [h["texts"] for h in resumed["heads"]] == [h["texts"] for h in straight["heads"]]
    for h, g in zip(resumed["heads"], straight["heads"]):
        np.testing.assert_allclose(h["explained"], g["explained"], rtol=1e-9, atol=1e-12)
    capsys.readouterr()
    assert _textspan(tmp_path / "b", tmp_path / "parts", "--seed", "1") == 2          # other scenes, same folder
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--fresh" in err and "data.meta.data" in err
    assert _textspan(tmp_path / "b", tmp_path / "parts", "--seed", "1", "--fresh") == 0
