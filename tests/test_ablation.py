"""nha_plugin.applications.ablation: mean-ablation and reconstructions against the model's own forward and
dense references built from the pair and neuron contributions."""
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import assert_user_error, images_for
from test_stats import batches_of, make_small

import nha_plugin as nha
from nha_plugin.applications import ablation as A
from nha_plugin.readout import ZeroShotClassifier
from nha_plugin.stats import collect
from nha_plugin.text.omp import prepare_dictionary


@pytest.fixture(scope="module")
def setup():
    model = make_small()
    spec = nha.adapters.get_spec(model)
    stats = collect(model, batches_of(images_for(64, batch=64, seed=11)), k=20, progress=False)
    x = images_for(64, batch=12, seed=12)                               # images the statistics never saw
    contrib = nha.decompose(model, x)
    return model, spec, stats, x, contrib


def _rel(a, b):
    return float((a - b).norm(dim=-1).max() / b.norm(dim=-1).max())


def _rel_spread(a, b, stats):
    """Largest error relative to the smallest distance of the reference from the mean embedding (random
    models vary little around their mean, so errors are measured on that scale)."""
    return float((a - b).norm(dim=-1).max() / (b - stats.mean_embedding).norm(dim=-1).min())


def test_nothing_ablated_is_the_model_and_everything_ablated_is_the_mean(setup):
    model, spec, stats, x, contrib = setup
    s = contrib.pair_coefficients
    y_model = model.encode_image(x).detach()
    keep_all, n = A.keep_mask(stats, "pair", 1.0)
    assert n == spec.num_heads * spec.num_neurons and bool(keep_all.all())
    assert _rel_spread(A.ablated_embedding(spec, s, stats, keep_all), y_model, stats) < 1e-10
    for level in A.LEVELS:
        keep_none, n0 = A.keep_mask(stats, level, 0.0)
        assert n0 == 0
        mean = A.ablated_embedding(spec, s, stats, keep_none)
        assert _rel(mean, stats.mean_embedding.expand_as(mean)) < 1e-10
    y_stats = model.encode_image(images_for(64, batch=64, seed=11)).detach()
    assert _rel(stats.mean_embedding[None], y_stats.mean(0, keepdim=True)) < 1e-10


def _dense_importance(c, level, k):
    """Importance of every unit of ``level`` from the dense contributions ``c`` (N, H, C, D) of the statistics'
    images, as the module docstring defines it, computed here without the statistics."""
    centred = c - c.mean(dim=0)
    if level == "pair":                                                  # mean of the k largest centred norms
        return centred.norm(dim=-1).topk(k, dim=0).values.mean(dim=0)
    unit = {"pair-rms": centred, "neuron": centred.sum(dim=1), "head": centred.sum(dim=2)}[level]
    return unit.norm(dim=-1).pow(2).mean(dim=0).sqrt()                  # root-mean-square centred norm


@pytest.mark.parametrize("level,fraction", [("pair", 0.1), ("pair-rms", 0.2), ("neuron", 0.3), ("head", 0.4)])
def test_ablated_embedding_matches_dense_reference(setup, level, fraction):
    model, spec, stats, x, contrib = setup
    H, C = stats.shape
    c_stats = nha.decompose(model, images_for(64, batch=64, seed=11)).pair_contributions()   # (64, H, C, D)
    imp = _dense_importance(c_stats, level, k=20)
    got_imp = A.unit_importance(stats, level)
    assert float((got_imp - imp).abs().max()) <= 1e-8 * float(imp.abs().max())
    flat = imp.reshape(-1).numpy()
    n_keep = int(np.ceil(fraction * flat.size))
    order = np.argsort(-flat, kind="stable")
    ranked = flat[order]
    assert ranked[n_keep - 1] - ranked[n_keep] > 1e-6 * ranked[0]       # no near-tie at the cut: the set is defined
    top = set(order[:n_keep].tolist())
    expected = torch.zeros(H, C, dtype=torch.bool)
    for h in range(H):
        for n in range(C):
            unit = {"pair": h * C + n, "pair-rms": h * C + n, "neuron": n, "head": h}[level]
            expected[h, n] = unit in top
    keep, got_n = A.keep_mask(stats, level, fraction)
    assert got_n == n_keep and torch.equal(keep, expected)
    # y_abl = y - sum over ablated pairs of (c - dataset mean of c), with y the model's own output
    c_x = contrib.pair_contributions()                                   # (B, H, C, D)
    removed = torch.where(expected[None, ..., None], torch.zeros_like(c_x), c_x - c_stats.mean(dim=0))
    with torch.no_grad():
        ref = model.encode_image(x) - removed.sum(dim=(1, 2))
    got = A.ablated_embedding(spec, contrib.pair_coefficients, stats, keep)
    assert _rel_spread(got, ref, stats) < 1e-9
    assert _rel_spread(got, contrib.embedding, stats) > 0.05            # something was ablated


def test_neuron_pc_reconstruction(setup):
    model, spec, stats, x, contrib = setup
    s = contrib.pair_coefficients
    H = spec.num_heads
    assert _rel_spread(A.neuron_pc_embedding(spec, s, stats, H), contrib.embedding, stats) < 1e-8   # all H PCs: exact
    # two PCs against a dense reference: neuron contributions projected on PCs from an SVD of the
    # statistics' own images' dense neuron contributions
    train = nha.decompose(model, images_for(64, batch=64, seed=11)).neuron_contributions()   # (N, C, D)
    mu = train.mean(0)
    P = torch.linalg.svd((train - mu).transpose(0, 1), full_matrices=False).Vh[:, :2]     # (C, 2, D)
    proj = torch.einsum("ckD,bcD->bck", P, contrib.neuron_contributions() - mu)
    ref = contrib.constant + (mu + torch.einsum("bck,ckD->bcD", proj, P)).sum(dim=1)
    got = A.neuron_pc_embedding(spec, s, stats, 2)
    assert _rel_spread(got, ref, stats) < 1e-6
    assert _rel_spread(got, contrib.embedding, stats) > 1e-3             # two PCs lose something


def test_text_directions_and_embedding(setup):
    _, spec, stats, _, contrib = setup
    g = torch.Generator().manual_seed(0)
    atoms = prepare_dictionary(torch.randn(100, spec.output_dim, generator=g, dtype=torch.float64))
    full, rel = A.text_directions(spec, atoms, k=spec.output_dim)        # k = D atoms span the space: exact
    assert float(rel.max()) < 1e-8
    s = contrib.pair_coefficients
    assert _rel_spread(A.text_embedding(spec, s, full), contrib.embedding, stats) < 1e-6
    sparse, rel4 = A.text_directions(spec, atoms, k=4)
    scaled, _ = A.text_directions(spec, atoms, k=4, rescale=True)
    u = nha.pair_directions(spec.detached())
    torch.testing.assert_close(scaled.norm(dim=-1), u.norm(dim=-1), rtol=1e-10, atol=0)
    torch.testing.assert_close(rel4, (sparse - u).norm(dim=-1) / u.norm(dim=-1), rtol=1e-8, atol=1e-12)
    assert float(rel4.min()) > 0.05                                      # 4 of 32 dimensions: not exact


def test_sparsity_curves_and_report(tmp_path, setup):
    model, spec, stats, x, contrib = setup
    classes = ["red", "green", "blue", "cat", "dog"]
    head = ZeroShotClassifier(model, open_clip.tokenizer.tokenize, classes, templates=("{}",))
    labels = head(x).argmax(-1)                                          # the model's own predictions
    res = A.sparsity_curves(spec, contrib.pair_coefficients, labels, head.readout.T, stats,
                            fractions=[0.0, 0.5, 1.0], pcs=(1, 8))
    assert res["original"] == 1.0
    for level in A.LEVELS:
        assert res["sweeps"][level][-1]["accuracy"] == 1.0
        assert res["sweeps"][level][0]["accuracy"] == res["mean_embedding"]
    assert res["neuron_pcs"][8] == 1.0
    mean_pred = (stats.mean_embedding @ head.readout).argmax()
    assert res["mean_embedding"] == float((labels == mean_pred).double().mean())
    paths = A.write_report({"tasks": {"a": res, "b": res}, "meta": {"model": "small"}}, tmp_path / "new", "sp")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["sp.json", "sp.md", "sp.png"]   # no temporaries
    assert json.loads(paths["json"].read_text())["tasks"]["a"]["original"] == 1.0
    assert "| neuron | 0.5 | 128 / 256 |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 10_000


def test_cli_stats_then_sparsity_on_scenes_rn(tmp_path, capsys):
    from nha_plugin.cli import stats as stats_cli
    out = tmp_path / "stats.safetensors"
    assert stats_cli.main(["stats", "--out", str(out), "--n", "12", "--batch-size", "6", "--quiet"]) == 0
    assert out.is_file() and not (tmp_path / "stats.safetensors.partial").exists()
    assert stats_cli.main(["sparsity", "--stats", str(out), "--task", "colour,background", "--n", "12",
                           "--fractions", "0,1", "--pcs", "1,8", "--text-k=", "--out", str(tmp_path / "sp"),
                           "--quiet"]) == 0
    res = json.loads((tmp_path / "sp" / "sparsity.json").read_text())
    for task in ("colour", "background"):
        r = res["tasks"][task]
        assert r["n"] == 12
        for level in A.LEVELS:                                           # keeping everything is the model
            assert r["sweeps"][level][-1]["accuracy"] == r["original"]
            assert r["sweeps"][level][0]["accuracy"] == r["mean_embedding"]
        assert r["neuron_pcs"]["8"] == r["original"]
    assert r["original"] >= 0.9                                          # scenes-rn knows backgrounds
    assert_user_error(capsys, "unknown task", stats_cli.main,
                       ["sparsity", "--stats", str(out), "--task", "texture", "--quiet"])
    assert_user_error(capsys, "not found", stats_cli.main,
                       ["sparsity", "--stats", str(tmp_path / "missing.safetensors"), "--quiet"])
