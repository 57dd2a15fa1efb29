"""TextSpan on CLIP-ViT heads: agreement with text_span on the stacked tensors, exact full-span
reconstruction, mean-ablation against the decomposition's own and a dense sum, resumable collection."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_greedy_picks_agree, images_for, scaled_tol
from nha_plugin import vit
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
    assert sorted(p.name for p in (tmp_path / "p").glob("part_*.pt")) == ["part_00000.pt", "part_00001.pt",
                                                                        "part_00002.pt"]
    (tmp_path / "p" / "part_00001.pt").unlink()                          # a run killed after two batches
    calls = []
    real = TS._batch_parts
    monkeypatch.setattr(TS, "_batch_parts", lambda *a: calls.append(1) or real(*a))
    again = TS.collect_head_statistics(tiny_vit64, lambda a, b: images[a:b], 5, batch_size=2, progress=False,
                                       parts_dir=tmp_path / "p", meta={"images": "seed 6"})
    assert len(calls) == 1
    torch.testing.assert_close(again.contributions, first.contributions, rtol=1e-12, atol=scaled_tol(first.contributions))
    torch.testing.assert_close(again.head_means, first.head_means, rtol=1e-12, atol=scaled_tol(first.head_means))
    with pytest.raises(ValueError, match="another run"):
        TS.collect_head_statistics(tiny_vit64, images, batch_size=3, progress=False, parts_dir=tmp_path / "p")
    first.save(tmp_path / "s.pt")
    assert torch.equal(TS.HeadStatistics.load(tmp_path / "s.pt").embedding, first.embedding)


def test_textspan_cli(monkeypatch, tmp_path, tiny_vit64):
    import open_clip

    import nha_plugin
    from nha_plugin.cli import vit as vit_cli
    monkeypatch.setattr(nha_plugin, "load_clip",
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


def test_parts_of_other_images_are_refused(tiny_vit64, tmp_path):
    images = images_for(tiny_vit64, batch=2, seed=7)
    TS.collect_head_statistics(tiny_vit64, images, progress=False, parts_dir=tmp_path, meta={"seed": 1})
    with pytest.raises(ValueError, match="another run"):
        TS.collect_head_statistics(tiny_vit64, images, progress=False, parts_dir=tmp_path, meta={"seed": 2})
