"""Spurious-feature removal: worst-group accuracy by hand, a planted background head, the probe vs scikit-learn."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nha_plugin.applications import spurious as S
from nha_plugin.vit.textspan_heads import (HeadStatistics, head_text_spans, mean_ablated_embeddings, predict)
from conftest import assert_argmax_agrees


def test_group_accuracies_hand_counted():
    # groups 0..3; correct flags per image: g0: 1 1 0 (2/3), g1: 0 0 (0/2), g2: 1 (1/1), g3: 1 0 1 1 (3/4)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    preds = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 1, 1])
    res = S.group_accuracies(preds, labels, groups, ["a", "b", "c", "d"])
    assert res["groups"] == {"a": {"accuracy": pytest.approx(2 / 3), "n": 3}, "b": {"accuracy": 0.0, "n": 2},
                             "c": {"accuracy": 1.0, "n": 1}, "d": {"accuracy": 0.75, "n": 4}}
    assert res["worst"] == 0.0 and res["worst_group"] == "b"
    assert res["average"] == pytest.approx((2 / 3 + 0 + 1 + 0.75) / 4)
    assert res["overall"] == pytest.approx(6 / 10)
    with pytest.raises(ValueError, match="one entry per image"):
        S.group_accuracies(preds[:3], labels, groups)


def test_mentions_whole_words():
    assert S.mentions("a photo of something on grass", ["grass", "brick"]) == ["grass"]
    assert S.mentions("a grassy field", ["grass"]) == []
    assert S.mentions("a waterbird", ["water"]) == [] and S.mentions("open Water", ["water"]) == ["water"]
    assert S.mentions("a brick background", ["brick background"]) == ["brick background"]


def _planted(K=240, D=16, seed=0):
    """Two layers x three heads, all analysed. Head (1, 0) writes the label along o, head (1, 1) the background
    along g, the rest noise; the read-out weighs the background twice as much as the object (spurious)."""
    g_ = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g_, dtype=torch.float64))[0].T
    o, g, e0 = basis[0], basis[1], basis[2]
    y = torch.arange(K) % 2
    bg = (torch.arange(K) // 2) % 2
    heads = 0.05 * torch.randn(K, 2, 3, D, generator=g_, dtype=torch.float64)
    heads[:, 1, 0] += (2 * y - 1)[:, None].double() * o
    heads[:, 1, 1] += (2 * bg - 1)[:, None].double() * g
    heads[:, 0, 2] += 3 * e0                      # a constant offset so the embeddings are far from zero
    emb = heads.sum(dim=(1, 2)) + 0.5 * e0
    stats = HeadStatistics(layers=[0, 1], num_layers=2, contributions=heads, layer_heads=heads.sum(dim=2),
                           embedding=emb, head_means=heads.mean(dim=0), labels=y, groups=2 * y + bg)
    w = torch.stack([-(o + 2 * g), o + 2 * g], dim=1)
    return stats, w, (o, g, basis)


def test_planted_background_head_is_found_and_ablating_it_fixes_the_worst_group():
    stats, w, (o, g, basis) = _planted()
    # a text pool: one text along the background direction, one along the object, distractors elsewhere
    texts = ["a photo on grass", "a photo of a cat", "a red thing", "a square", "something blue"]
    T = torch.stack([g, o, basis[5], basis[6], F.normalize(basis[7] + basis[8], dim=0)])
    spans = head_text_spans(stats, T, texts, m=2, rank=8, progress=False)
    scores = {(d["layer"], d["head"]): d["score"] for d in S.place_head_scores(spans, ["grass", "background"])}
    assert scores[(1, 1)] > 0.9 and scores[(1, 0)] < 0.1
    picked = S.select_place_heads(spans, ["grass", "background"], threshold=0.5)
    assert picked == [(1, 1)]
    names = ["y0 bg0", "y0 bg1", "y1 bg0", "y1 bg1"]
    cands = [(l, h) for l in (0, 1) for h in range(3)]
    res = S.spurious_removal(stats, w, stats.labels, stats.groups, picked, cands, group_names=names, n_random=10,
                             n_sets=5, seed=0)
    # before: the read-out follows the background, so the two off-diagonal groups are always wrong
    assert res["before"]["worst"] == 0.0 and res["before"]["groups"]["y0 bg0"]["accuracy"] == 1.0
    assert res["after"]["worst"] == 1.0
    assert res["random"]["k"] == 6 and res["random"]["best"]["worst"] < res["after"]["worst"]
    assert res["random_matched"]["k"] == 1 and len(res["random_matched"]["sets"]) == 5
    early = S.spurious_removal(stats, w, stats.labels, stats.groups, picked, cands, ablate_early=True)
    assert early["early_only"]["worst"] == 0.0 and early["after"]["worst"] == 1.0


def test_mean_ablation_equals_a_dense_loop():
    stats, w, _ = _planted(K=12)
    drop = torch.zeros(2, 3, dtype=torch.bool)
    drop[0, 1] = drop[1, 2] = True
    means = torch.randn(2, 3, stats.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = mean_ablated_embeddings(stats, drop, means)
    rest = stats.embedding - stats.contributions.sum(dim=(1, 2))
    for k in range(stats.num_images):
        dense = rest[k].clone()
        for l in range(2):
            for h in range(3):
                dense += means[l, h] if drop[l, h] else stats.contributions[k, l, h]
        assert torch.allclose(got[k], dense, atol=1e-12, rtol=0)
    # a layer that was not analysed can only be dropped whole
    partial = HeadStatistics(layers=[1], num_layers=2, contributions=stats.contributions[:, 1:],
                             layer_heads=stats.layer_heads, embedding=stats.embedding, head_means=stats.head_means)
    whole = torch.zeros(2, 3, dtype=torch.bool)
    whole[0] = True
    assert torch.allclose(mean_ablated_embeddings(partial, whole), mean_ablated_embeddings(stats, whole), atol=1e-12)
    with pytest.raises(ValueError, match="only all of its heads"):
        mean_ablated_embeddings(partial, drop)


def test_probe_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64) + 0.3
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(120, generator=g, dtype=torch.float64) > 0.3).long()
    y[:40] = 2 * (x[:40, 2] > 0.3).long()                          # a third class
    l2 = 0.05
    w, b = S.fit_linear_probe(x, y, l2=l2)
    z = F.normalize(x, dim=-1)
    mu, sd = z.mean(0), z.std(0)
    # scikit-learn's objective: 1/2 ||W||^2 + C sum CE  ==  K C (mean CE + 1/(2 K C) ||W||^2)
    ref = sklearn.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000).fit(((z - mu) / sd).numpy(),
                                                                                            y.numpy())
    ours = (z @ w + b).numpy()
    theirs = ref.decision_function(((z - mu) / sd).numpy())
    # multinomial logits are defined up to a per-image constant
    diff = (ours - ours.mean(1, keepdims=True)) - (theirs - theirs.mean(1, keepdims=True))
    assert np.abs(diff).max() < 1e-4
    # the predictions are sklearn's argmax up to the 1e-4 the logits may differ by (near-ties may flip)
    assert_argmax_agrees(torch.as_tensor(theirs), predict(x, w, b), dim=1, atol=2e-4)


def test_random_sets_are_seeded_and_distinct():
    cands = [(l, h) for l in range(3) for h in range(4)]
    a = S.random_head_sets(cands, 5, n_sets=5, seed=1)
    assert a == S.random_head_sets(cands, 5, n_sets=5, seed=1) and a != S.random_head_sets(cands, 5, n_sets=5, seed=2)
    assert all(len(set(s)) == 5 and set(s) <= set(cands) for s in a) and len({tuple(s) for s in a}) > 1
    assert len(S.random_head_sets(cands, 50)[0]) == 12


def test_scene_description_pool_is_single_concept():
    from nha_plugin.scenes import BACKGROUNDS, CATEGORIES
    pool = S.scene_description_pool()
    assert len(pool) == len(set(pool))
    for t in pool:
        bg, obj = S.mentions(t, BACKGROUNDS), S.mentions(t, CATEGORIES)
        assert not (bg and obj), t
    assert all(any(S.mentions(t, [b]) for t in pool) for b in BACKGROUNDS)


@pytest.fixture
def tiny_loader(monkeypatch):
    """``nha.load_clip`` returning the tiny random ViT (64 px; the scenes are resized), no preprocess."""
    import open_clip

    import nha_plugin
    from conftest import make_tiny_vit
    model = make_tiny_vit(torch.float64)
    monkeypatch.setattr(nha_plugin.models, "load_clip",
                        lambda *a, **k: (model, None, open_clip.tokenizer.SimpleTokenizer()))
    return model


def test_spurious_cli_on_scenes_writes_consistent_files(tiny_loader, tmp_path):
    import json

    from nha_plugin.cli import vit as vit_cli
    out = tmp_path / "sp.json"
    rc = vit_cli.main(["spurious", "--model", "scenes-vit", "--n-train", "12", "--n-test", "12", "--n-textspan", "12",
                       "--m", "4", "--batch-size", "6", "--out", str(out), "--quiet",
                       "--cache-dir", str(tmp_path / "c"),
                       "--parts", str(tmp_path / "parts")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 0
    assert set(res["readouts"]) == {"probe@0.95", "probe@1", "zeroshot_background", "zeroshot"}
    assert res["protocol"]["test"]["groups"] == {"cat on grass": 3, "cat on brick": 3, "rocket on grass": 3,
                                                 "rocket on brick": 3}
    assert res["protocol"]["train"]["aligned_shares"] == [pytest.approx(11 / 12), 1.0]
    assert res["protocol"]["textspan"]["layers"] == [0, 1, 2] and len(res["head_scores"]) == 12
    probe = res["readouts"]["probe@1"]
    # the random baseline draws 10 of the 12 analysed heads, 5 times, seeded
    assert probe["random"]["k"] == 10 and len({tuple(map(tuple, s["heads"])) for s in probe["random"]["sets"]}) > 1
    assert probe["random"]["best"]["worst"] == max(s["worst"] for s in probe["random"]["sets"])
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["test", "textspan", "train_0.95", "train_1"]


def test_waterbirds_experiment_on_a_fake_tree(tiny_loader, tmp_path):
    import json

    from PIL import Image

    from nha_plugin.cli import vit as vit_cli
    rng = np.random.default_rng(0)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i in range(16):
        y, place, split = i % 2, (i // 2) % 2, 0 if i < 8 else 2
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / f"b{i}.png")
        lines.append(f"{i},b{i}.png,{y},{split},{place},x.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "pool.txt").write_text("\n".join(["a forest", "the ocean", "a duck", "a sparrow", "a lake", "wings",
                                                 "a beach", "feathers"]))
    out = tmp_path / "wb.json"
    assert vit_cli.main(["spurious", "--model", "ViT-tiny", "--dataset", "waterbirds", "--path", str(tmp_path),
                         "--pool", str(tmp_path / "pool.txt"), "--m", "3", "--out", str(out), "--quiet",
                         "--cache-dir", str(tmp_path / "c")]) == 0
    res = json.loads(out.read_text())
    zs = res["readouts"]["zeroshot"]
    assert res["protocol"]["test"]["groups"] == {"landbird on land": 2, "landbird on water": 2,
                                                 "waterbird on land": 2, "waterbird on water": 2}
    assert set(zs["before"]["groups"]) == {"landbird on land", "landbird on water", "waterbird on land",
                                           "waterbird on water"}
    assert all(set(d["place_texts"]) <= {"a forest", "the ocean", "a lake", "a beach"} for d in res["head_scores"])


def test_spurious_cli_parts_are_keyed_and_never_unpickled(tiny_loader, tmp_path, capsys):
    """A pickle planted under each name the command reads in its parts folders gives one line naming the file and
    exit 2 (the old format's names are ignored); it never runs. Other settings are refused; --fresh recomputes."""
    from conftest import assert_pickle_would_run, write_malicious_pickle

    from nha_plugin.cli import vit as vit_cli
    marker, parts, out = tmp_path / "executed", tmp_path / "parts", tmp_path / "sp.json"

    def spurious(*extra):
        return vit_cli.main(["spurious", "--model", "scenes-vit", "--n-train", "8", "--n-test", "8", "--n-textspan",
                             "8", "--train-strengths", "1", "--m", "3", "--batch-size", "8", "--n-sets", "2",
                             "--out", str(out), "--quiet", "--cache-dir", str(tmp_path / "c"), "--parts", str(parts),
                             *extra])
    assert spurious() == 0
    straight = json.loads(out.read_text())
    genuine = {p.relative_to(parts): p.read_bytes() for p in sorted(parts.rglob("*")) if p.is_file()}
    assert sorted(map(str, genuine)) == [f"{s}/{n}" for s in ("test", "textspan", "train_1")
                                         for n in ("part_00000.part.safetensors", "run.json")]
    capsys.readouterr()
    for name in genuine:
        data = write_malicious_pickle(parts / name, marker)
        assert spurious() == 2
        err = capsys.readouterr().err
        assert str(parts / name) in err and len(err.strip().splitlines()) == 1, (name, err)
        (parts / name).write_bytes(genuine[name])
    for name in ("textspan/part_00000.pt", "test/key.json"):
        write_malicious_pickle(parts / name, marker)
    assert spurious() == 0
    assert json.loads(out.read_text())["readouts"] == straight["readouts"]    # resumed from the parts
    assert spurious("--seed", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "data.meta.seed: found 7000001, expected 7000002" in err
    assert spurious("--seed", "1", "--fresh") == 0
    assert not marker.exists()
    assert_pickle_would_run(data, marker)
