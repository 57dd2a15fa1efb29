"""Distribution-shift monitor: concept units and scores against dense references, ``run_monitor`` on planted
years, resuming a killed run to the same numbers, and ``nha shift`` end to end: reports, resume, refusal of another
configuration, ``--fresh``, and planted pickles that never execute. (The statistics: test_two_sample.py.)"""
import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin import files, runs
from nha_plugin.adapters import get_spec
from nha_plugin.applications import shift as S
from nha_plugin.cli.shift import main as shift_main
from nha_plugin.pool import pair_directions
from conftest import assert_topk_selection, images_for, planted


# ---- units and scores --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_case():
    from conftest import make_tiny
    model = make_tiny(torch.float64)
    images = images_for(model, batch=6, dtype=torch.float64, seed=3)
    return model, get_spec(model).detached(), nha.decompose(model, images), images


def test_select_units_ranks_pairs_by_signed_pc0_alignment(tiny_case):
    _, spec, _, _ = tiny_case
    H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    signs = torch.where(torch.rand(H, C, generator=g) < 0.5, -1.0, 1.0).double()
    u = pair_directions(spec)                                               # dense (H, C, D) reference
    dense = (signs[..., None] * u / u.norm(dim=-1, keepdim=True)) @ t
    assert torch.allclose(S.pair_alignment(spec, t, signs), dense, atol=1e-12)
    units = S.select_units(spec, t, k=7, pair_signs=signs)
    assert units.pairs.shape == (7, 2)
    assert_topk_selection(dense.flatten(), units.pairs[:, 0] * C + units.pairs[:, 1])
    assert torch.allclose(units.pair_vectors, u[units.pairs[:, 0], units.pairs[:, 1]], atol=1e-12)
    unsigned = S.select_units(spec, t, k=7)                                # None means +1 everywhere
    assert_topk_selection(((u / u.norm(dim=-1, keepdim=True)) @ t).flatten(),
                          unsigned.pairs[:, 0] * C + unsigned.pairs[:, 1])
    with pytest.raises(ValueError, match=r"pair_signs must be \(H, C\)"):
        S.pair_alignment(spec, t, torch.ones(C, H))


def test_concept_scores_equal_dense_contributions(tiny_case):
    model, spec, contrib, images = tiny_case
    g = torch.Generator().manual_seed(2)
    coeffs = contrib.pair_coefficients
    dirs = S.unit_directions(spec, coeffs)
    t = F.normalize(torch.randn(spec.output_dim, generator=g, dtype=torch.float64), dim=0)
    units = S.select_units(spec, t, dirs, k=4, k_neurons=3, k_heads=2)
    got = S.concept_scores(contrib, units)
    dense = contrib.pair_contributions()                                   # (B, H, C, D)
    y = model.encode_image(images)
    assert (contrib.embedding - y).abs().max() < 1e-10                    # exact completeness in float64
    pairs = dense[:, units.pairs[:, 0], units.pairs[:, 1]].sum(dim=1)
    neurons = dense[:, :, units.neurons].sum(dim=(1, 2))
    heads = dense[:, units.heads].sum(dim=(1, 2))
    ny = y.norm(dim=-1)
    assert torch.allclose(got["nad_pairs"], pairs.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["neurons"], neurons.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["heads"], heads.norm(dim=-1) / ny, atol=1e-12)
    assert torch.allclose(got["cosine"], F.cosine_similarity(y, t[None], dim=-1), atol=1e-12)


def test_neuron_and_head_directions_are_their_contributions_pc0(tiny_case):
    _, spec, contrib, _ = tiny_case
    coeffs = contrib.pair_coefficients
    dirs = S.unit_directions(spec, coeffs)
    dense = contrib.pair_contributions()
    for kind, idx, x in (("neuron", 5, dense[:, :, 5].sum(dim=1)), ("neuron", 300, dense[:, :, 300].sum(dim=1)),
                         ("head", 2, dense[:, 2].sum(dim=1))):
        xc = x - x.mean(dim=0)
        v = torch.linalg.svd(xc, full_matrices=False).Vh[0]
        if ((xc @ v) > 0).sum() * 2 <= len(xc):                             # the paper: flip unless more than half
            v = -v
        got = dirs.neurons[idx] if kind == "neuron" else dirs.heads[idx]
        assert torch.allclose(got, v, atol=1e-8), (kind, idx)
    assert torch.equal(dirs.pair_signs, S.pc0_signs(coeffs))


# ---- end to end on scenes-rn ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes_rn():
    return nha.load_clip("scenes-rn")


def test_run_monitor_on_planted_years(scenes_rn):
    from nha_plugin.scenes import years
    model, preprocess, tokenizer = scenes_rn
    sampler = years(("colour", "yellow"), shares=(0.0, 0.25, 0.75), n_per_group=12, seed=4)
    data = S.ShiftData.from_sampler(sampler, "yellow")
    truth = [sampler.scene(y, i).meta["has_concept"] for y in sampler.years for i in range(12)]
    assert data.presence["yellow"].tolist() == truth
    res = S.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"}, k=3, n_permutations=20,
                        batch_size=16, progress=False)
    c = res["concepts"]["yellow"]
    assert [g["share"] for g in c["groups"]] == [sampler.true_share(y) for y in sampler.years] == [0.0, 0.25, 0.75]
    assert [g["n"] for g in c["groups"]] == [12, 12, 12] and len(c["units"]["pairs"]) == 3
    assert "ks" not in c["groups"][0] and set(c["groups"][1]["ks"]) == set(S.METHODS)
    assert [set(g) >= {"mmd", "classifier"} for g in res["groups"][1:]] == [True, True]
    # the planted colour is what scenes-rn's text tower knows best: cos(y, t) must track it
    assert c["per_image_r"]["cosine"] > 0.5 and c["group_mean_r"]["cosine"] > 0.9
    assert res["protocol"]["pair_signs"].startswith("paper's PC0 sign on 12 images of reference group 2018")


def test_cli_scenes_writes_reports_and_resumes(tmp_path):
    args = ["shift", "--concept", "shape:star", "--shares", "0.1,0.6", "--n-per-group", "10", "--permutations",
            "20", "--fit-images", "16", "--k", "3", "--out", str(tmp_path), "--name", "t", "--quiet"]
    assert shift_main(args) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    run = report["runs"][0]
    assert run["concepts"]["shape:star"]["text"] == "star" and run["protocol"]["groups"] == [2018, 2019]
    assert (tmp_path / "t.png").stat().st_size > 0 and "| 2019 | 10 | 0.600 |" in (tmp_path / "t.md").read_text()
    part = tmp_path / "t.parts" / "shape-star-seed0-result.part.safetensors"
    cached = files.load_state(part)
    cached["protocol"]["data"] = "FROM THE PART FILE"
    files.save_state(part, cached)
    assert shift_main(args) == 0
    assert "FROM THE PART FILE" in (tmp_path / "t.md").read_text()


def test_cli_stanford_cars_fake_tree(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    rows = []
    for cls, year in (("Acura RL Sedan 2011", 2011), ("Audi TT Coupe 2012", 2012)):
        for i in range(8):
            yellow = i < (2 if year == 2011 else 6)
            rgb = (240, 220, 30) if yellow else tuple(int(v) for v in rng.integers(0, 120, 3))
            path = tmp_path / "cars" / "train" / cls / f"{year}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 60, 3), rgb, np.uint8)).save(path)
            rows.append([path.name, "yellow" if yellow else "black", int(i % 2 == 0)])
    with open(tmp_path / "colours.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "colour", "even"]] + rows)
    args = ["shift", "--dataset", "stanford-cars", "--root", str(tmp_path / "cars"), "--colours",
            str(tmp_path / "colours.csv"), "--concept", "yellow", "--concept", "even", "--presence", "even=even",
            "--min-group-size", "4", "--permutations", "10", "--out", str(tmp_path / "o"), "--quiet"]
    assert shift_main(args) == 0
    run = json.loads((tmp_path / "o" / "shift.json").read_text())["runs"][0]
    assert run["protocol"]["groups"] == [2011, 2012]
    assert [g["share"] for g in run["concepts"]["yellow"]["groups"]] == [0.25, 0.75]
    assert [g["share"] for g in run["concepts"]["even"]["groups"]] == [0.5, 0.5]
    assert "reference group 2011" in run["protocol"]["pair_signs"]
    rows[0][1] = "black" if rows[0][1] == "yellow" else "yellow"    # relabelled data in this folder: another run
    with open(tmp_path / "colours.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "colour", "even"]] + rows)
    capsys.readouterr()
    assert shift_main(args) == 2
    assert "data.images: found" in _error_line(capsys)
    with pytest.raises(SystemExit, match="CONCEPT=COLUMN"):
        shift_main(["shift", "--dataset", "stanford-cars", "--root", str(tmp_path / "cars"), "--colours",
                    str(tmp_path / "colours.csv"), "--concept", "even", "--presence", "nope", "--quiet"])


# ---- resuming, refusing, planted pickles ---------------------------------------------------------------------
def _assert_close_trees(a, b, where="", rel=1e-12):
    """Two result trees agree: same structure, equal strings and integers, floats within ``rel`` of their size."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), where
        for k in b:
            _assert_close_trees(a[k], b[k], f"{where}/{k}", rel)
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_trees(x, y, f"{where}[{i}]", rel)
    elif isinstance(b, float):
        assert isinstance(a, float), (where, a, b)
        both_nan = math.isnan(a) and math.isnan(b)
        assert both_nan or a == pytest.approx(b, rel=rel, abs=1e-300), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_killed_run_resumes_to_the_same_numbers(scenes_rn, tmp_path, monkeypatch):
    from nha_plugin.scenes import years
    model, preprocess, tokenizer = scenes_rn
    data = S.ShiftData.from_sampler(years(("colour", "yellow"), shares=(0.1, 0.5, 0.8), n_per_group=6, seed=2),
                                    "yellow")
    kw = dict(k=3, n_permutations=15, batch_size=4, progress=False, part="y-")
    key = runs.run_key({"k": 3}, data="years yellow seed 2", weights=runs.module_fingerprint(model))
    straight = S.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"},
                             run=runs.RunDir(tmp_path / "straight", key), **kw)
    assert runs.RunDir(tmp_path / "straight", key).parts() == ["y-fit", "y-group0", "y-group1", "y-group2",
                                                               "y-result"]

    saved, save_part = [], runs.RunDir.save_part

    def killed_after_two(self, name, tree):
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")
        saved.append(name)
        return save_part(self, name, tree)

    monkeypatch.setattr(runs.RunDir, "save_part", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        S.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"}, run=runs.RunDir(tmp_path / "b", key),
                      **kw)
    monkeypatch.setattr(runs.RunDir, "save_part", save_part)
    assert saved == ["y-fit", "y-group0"]
    inodes = {n: (tmp_path / "b" / f"{n}.part.safetensors").stat().st_ino for n in saved}
    resumed = S.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"},
                            run=runs.RunDir(tmp_path / "b", key), **kw)
    # the parts saved before the kill were read, not recomputed (a rewrite replaces the file)
    assert {n: (tmp_path / "b" / f"{n}.part.safetensors").stat().st_ino for n in saved} == inodes
    _assert_close_trees(resumed, straight)


@pytest.fixture
def cached_clip(scenes_rn, monkeypatch):
    """``nha shift`` with scenes-rn loaded once (the CLI calls ``nha.load_clip`` on every run)."""
    monkeypatch.setattr(nha.models, "load_clip", lambda *a, **k: scenes_rn)


def _star_args(out, *extra):
    return ["shift", "--concept", "shape:star", "--shares", "0.1,0.6", "--n-per-group", "6", "--permutations",
            "10", "--fit-images", "8", "--k", "3", "--out", str(out), "--name", "t", "--quiet", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_cli_refuses_another_configuration_and_fresh_starts_over(cached_clip, tmp_path, capsys):
    assert shift_main(_star_args(tmp_path)) == 0
    first = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    capsys.readouterr()
    assert shift_main(_star_args(tmp_path, "--k", "4", "--seed", "1")) == 2
    err = _error_line(capsys)
    assert "config.k: found 3, expected 4" in err and "config.seeds: found [0], expected [1]" in err
    assert "--fresh" in err and str(tmp_path / "t.parts") in err
    assert json.loads((tmp_path / "t.json").read_text())["runs"][0] == first      # nothing was overwritten
    assert shift_main(_star_args(tmp_path, "--k", "4", "--seed", "1", "--fresh")) == 0
    again = json.loads((tmp_path / "t.json").read_text())["runs"][0]
    assert again["protocol"]["k"] == 4 and again["protocol"]["seed"] == 1
    assert len(again["concepts"]["shape:star"]["units"]["pairs"]) == 4
    assert sorted(p.name for p in (tmp_path / "t.parts").glob("*.part.safetensors")) == [
        "scenes-fit.part.safetensors", "shape-star-seed1-group0.part.safetensors",
        "shape-star-seed1-group1.part.safetensors", "shape-star-seed1-result.part.safetensors"]



def test_cli_never_unpickles_a_planted_pickle(cached_clip, tmp_path, capsys):
    out, marker = tmp_path / "o", tmp_path / "EXECUTED"
    payloads = {"pickle": pickle.dumps({"x": planted(marker)}), "torch.save": None}
    buf = tmp_path / "evil.pt"
    torch.save({"x": planted(marker)}, buf)
    payloads["torch.save"] = buf.read_bytes()
    assert not marker.exists()
    # a fresh folder whose run.json is a pickle
    (out / "t.parts").mkdir(parents=True)
    (out / "t.parts" / "run.json").write_bytes(payloads["pickle"])
    assert shift_main(_star_args(out)) == 2
    assert "run.json" in _error_line(capsys) and not marker.exists()
    assert shift_main(_star_args(out, "--fresh")) == 0
    capsys.readouterr()
    good = {p: p.read_bytes() for p in (out / "t.parts").iterdir()}
    results = [p for p in good if p.name.endswith("-result.part.safetensors")]
    # every file the command reads: each part (the finished result removed, so that the stages are read) and run.json
    for path in good:
        for kind, payload in payloads.items():
            for p, data in good.items():
                p.write_bytes(data)
            for p in results:
                if p != path:
                    p.unlink()
            path.write_bytes(payload)
            assert shift_main(_star_args(out)) == 2, (path.name, kind)
            err = _error_line(capsys)
            assert path.name in err and ("never unpickled" in err or "not valid JSON" in err), err
            assert not marker.exists(), (path.name, kind)
    # files it only writes, and names an older version read or a user might drop there: overwritten or ignored
    for p, data in good.items():
        p.write_bytes(data)
    dropped = [out / "t.json", out / "t.md", out / "t.png", out / "t.parts" / "shape-star-seed0-0123456789abcdef.json",
               out / "t.parts" / "checkpoint.pt", out / "t.parts" / "scores.pkl", out / "t.parts" / "group0.npy"]
    for path in dropped:
        path.write_bytes(payloads["pickle"])
    assert shift_main(_star_args(out)) == 0 and not marker.exists()
    assert json.loads((out / "t.json").read_text())["runs"][0]["protocol"]["k"] == 3
