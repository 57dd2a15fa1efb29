"""Resumable, pickle-free segmentation runs: a killed evaluation resumes to the numbers of an uninterrupted one,
another configuration in the same folder is refused naming the differing field (and --fresh starts over), nothing
planted in an output folder is ever unpickled, and every user mistake of `nha segment` is one line with status 2."""
import contextlib
import functools
import json
import pickle

import numpy as np
import pytest
import torch

import nha_plugin as nha
from nha_plugin.applications import segmentation as S
from nha_plugin.cli.segment import main as segment_main
from nha_plugin.runs import RunMismatchError

from conftest import make_tiny, planted

NAMES = ("maskclip", "nad", "oracle-majority")


@pytest.fixture(scope="module")
def scenes_rn():
    return nha.load_clip("scenes-rn")


@pytest.fixture(scope="module")
def scene_seg(scenes_rn):
    """Four held-out scenes, a segmentor over their classes, and its uninterrupted evaluation one image a step."""
    model, preprocess, tok = scenes_rn
    ds = S.SceneSegmentation(4, seed=20_000)
    seg = S.Segmentor(model, S.class_embeddings(model, tok, ds.prompts()), ["maskclip", "nad"], k=300,
                      preprocess=preprocess)
    reference = S.evaluate(seg, ds, progress=False, show=4, per_image=True, images_per_step=1)
    return ds, seg, reference


def _counting(seg, monkeypatch, kill_after=None):
    """Replace ``seg.predict`` by one that records each call's image count and raises KeyboardInterrupt (a kill)
    once ``kill_after`` calls have run."""
    calls, original = [], type(seg).predict

    def predict(images, sizes=None):
        if kill_after is not None and len(calls) == kill_after:
            raise KeyboardInterrupt
        calls.append(len(images))
        return original(seg, images, sizes)

    monkeypatch.setattr(seg, "predict", predict)
    return calls


def _assert_same_results(got, want, examples):
    """Equal scores (from the same integer counts), per-image matrices and the first ``examples`` examples."""
    for m in NAMES:
        assert got["methods"][m] == want["methods"][m]
        if "per_image" in got:
            assert np.array_equal(got["per_image"][m], want["per_image"][m])
    assert len(got["examples"]) == examples
    for a, b in zip(got["examples"], want["examples"]):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        assert all(np.array_equal(a["pred"][m], b["pred"][m]) for m in NAMES)


def test_killed_evaluation_resumes_to_the_uninterrupted_numbers(scene_seg, tmp_path, monkeypatch):
    ds, seg, reference = scene_seg
    run = tmp_path / "run"
    kw = dict(progress=False, run_dir=run, config={"a": 1}, images_per_step=1, per_image=True)
    calls = _counting(seg, monkeypatch, kill_after=2)
    with pytest.raises(KeyboardInterrupt):
        S.evaluate(seg, ds, save_every=1, show=2, **kw)
    assert sorted(p.name for p in run.iterdir()) == ["images_0000000.part.safetensors",
                                                     "images_0000001.part.safetensors", "run.json"]
    calls = _counting(seg, monkeypatch)
    resumed = S.evaluate(seg, ds, show=3, **kw)
    assert calls == [1, 1]                                       # only images 2 and 3 were segmented again
    _assert_same_results(resumed, reference, examples=3)
    # a complete run reads every image's counts from its parts; only an example asked for now is segmented
    calls = _counting(seg, monkeypatch)
    _assert_same_results(S.evaluate(seg, ds, show=4, **kw), reference, examples=4)
    assert calls == [1]


def test_another_configuration_is_refused_naming_the_field_and_fresh_starts_over(scene_seg, scenes_rn, tmp_path,
                                                                                 monkeypatch):
    ds, seg, reference = scene_seg
    run = tmp_path / "run"
    kw = dict(progress=False, images_per_step=1, per_image=True, show=3)
    S.evaluate(seg, ds, run_dir=run, config={"a": 1}, **kw)
    with pytest.raises(RunMismatchError, match=r"config\.settings\.a: found 1, expected 2(.|\n)*--fresh"):
        S.evaluate(seg, ds, run_dir=run, config={"a": 2}, **kw)
    model, preprocess, _ = scenes_rn
    other_k = S.Segmentor(model, seg.text, seg.methods, k=200, preprocess=preprocess)
    with pytest.raises(RunMismatchError, match=r"config\.segmentor\.k: found 300, expected 200"):
        S.evaluate(other_k, ds, run_dir=run, config={"a": 1}, **kw)
    with pytest.raises(RunMismatchError, match=r"data\.dataset\.seed: found 20000, expected 20001"):
        S.evaluate(seg, S.SceneSegmentation(4, seed=20_001), run_dir=run, config={"a": 1}, **kw)
    with pytest.raises(RunMismatchError, match=r"config\.scoring\.methods"):
        S.evaluate(seg, ds, run_dir=run, config={"a": 1}, oracle=False, **kw)
    calls = _counting(seg, monkeypatch)
    fresh = S.evaluate(seg, ds, run_dir=run, config={"a": 2}, fresh=True, **kw)
    assert calls == [1, 1, 1, 1]
    _assert_same_results(fresh, reference, examples=3)
    assert json.loads((run / "run.json").read_text())["key"]["config"]["settings"] == {"a": 2}


def test_segmentor_identity_and_weights_fingerprint(tiny64, tiny32):
    """The key holds every setting that changes predictions, and the weights whatever their precision."""
    text = torch.nn.functional.normalize(torch.randn(3, 64, dtype=torch.float64), dim=-1)
    a = S.Segmentor(tiny64, text, methods=("nad",), k=50)
    assert a.identity() == S.Segmentor(tiny64, text, methods=("nad",), k=50).identity()
    signs = torch.ones(8, 512)
    signs[0, :7] = -1
    others = [dict(k=60), dict(sink="keep"), dict(bias_share="uniform"), dict(crop_size=96),
              dict(stride=32), dict(short_side=160), dict(pair_signs=signs), dict(methods=("nad", "heads")),
              dict(preset="paper", pair_signs=torch.ones(8, 512)), dict(sink="drop")]
    for change in others:
        kw = {"methods": ("nad",), "k": 50, **change}
        with pytest.warns(UserWarning) if "crop_size" in change else contextlib.nullcontext():
            b = S.Segmentor(tiny64, text, **kw)
        assert a.identity() != b.identity(), change
    assert a.identity() != S.Segmentor(tiny64, text.flip(0), methods=("nad",), k=50).identity()
    # fp32 and fp64 copies of the same weights share a fingerprint (the dtype is in the identity); other weights do not
    b32 = S.Segmentor(tiny32, text, methods=("nad",), k=50)
    assert a.weights_fingerprint() == b32.weights_fingerprint() and a.identity()["dtype"] != b32.identity()["dtype"]
    assert a.weights_fingerprint() != S.Segmentor(make_tiny(seed=5), text, methods=("nad",), k=50).weights_fingerprint()
    tweaked = make_tiny()
    with torch.no_grad():
        tweaked.visual.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-3        # a trunk weight, not the pool's
    assert a.weights_fingerprint() != S.Segmentor(tweaked, text, methods=("nad",), k=50).weights_fingerprint()


# ---- the command ------------------------------------------------------------------------------------------
CLI = ["--n", "3", "--method", "maskclip", "--method", "nad", "--k", "100", "--quiet", "--show", "1"]


@pytest.fixture
def one_image_steps(monkeypatch):
    """Make `nha segment` save a part after every image (its defaults save every 20), so a kill leaves parts."""
    monkeypatch.setattr(S, "evaluate", functools.partial(S.evaluate, images_per_step=1, save_every=1))


def _kill_after(monkeypatch, calls_before_kill):
    original, calls = S.Segmentor.predict, []

    def predict(self, images, sizes=None):
        if len(calls) == calls_before_kill:
            raise KeyboardInterrupt
        calls.append(len(images))
        return original(self, images, sizes)

    monkeypatch.setattr(S.Segmentor, "predict", predict)
    return original


def test_killed_command_resumes_to_the_same_results(tmp_path, monkeypatch, one_image_steps):
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert segment_main(CLI + ["--out", str(whole)]) == 0
    original = _kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        segment_main(CLI + ["--out", str(out)])
    assert len(list(out.glob("images_*.part.safetensors"))) == 2 and not (out / "results.json").exists()
    monkeypatch.setattr(S.Segmentor, "predict", original)
    assert segment_main(CLI + ["--out", str(out)]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, out))
    assert a["methods"] == b["methods"] and a["config"] == b["config"] and a["n"] == b["n"] == 3


def test_command_refuses_another_configuration_in_one_line_and_fresh_starts_over(tmp_path, capsys):
    out = tmp_path / "o"
    assert segment_main(CLI + ["--out", str(out)]) == 0
    capsys.readouterr()
    assert segment_main(CLI + ["--out", str(out), "--k", "200"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nha segment: error: ")
    assert "config.settings.k: found 100, expected 200" in err and "config.segmentor.k" in err and "--fresh" in err
    assert segment_main(CLI + ["--out", str(out), "--k", "200", "--fresh"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["k"] == 200



def _plant(path, marker, torch_format):
    """Write a pickle whose loading would create ``marker``: torch.save's zip format or a bare pickle."""
    if torch_format:
        torch.save({"next": 2, "payload": planted(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(planted(marker)))


def test_planted_pickles_never_run(tmp_path, capsys, one_image_steps):
    marker = tmp_path / "EXECUTED"
    out = tmp_path / "o"
    out.mkdir()
    # the old state file and the outputs are never read: the run ignores them (and rewrites the outputs)
    for i, name in enumerate(("segment_state.pt", "results.json", "results.md", "predictions.png")):
        _plant(out / name, marker, torch_format=i % 2 == 0)
    assert segment_main(CLI + ["--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["n"] == 3
    capsys.readouterr()
    # every file the run reads: its key and each of its parts
    read = ["run.json"] + sorted(p.name for p in out.glob("images_*.part.safetensors"))
    assert len(read) == 4
    for i, name in enumerate(read):
        good = (out / name).read_bytes()
        _plant(out / name, marker, torch_format=i % 2 == 1)
        assert segment_main(CLI + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out / name) in err, err
        (out / name).write_bytes(good)
    # parts planted in a folder without run.json: their settings are unknown, the folder is refused
    (out / "run.json").unlink()
    assert segment_main(CLI + ["--out", str(out)]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert not marker.exists()


def test_a_part_that_does_not_fit_the_run_is_refused(scene_seg, tmp_path):
    """A well-formed state file with other contents (another run's, or hand-made) is named, never used."""
    ds, seg, _ = scene_seg
    run = tmp_path / "run"
    S.evaluate(seg, ds, progress=False, run_dir=run, images_per_step=1, save_every=1, show=0)
    from nha_plugin.files import CorruptFileError, save_state
    part = run / "images_0000002.part.safetensors"
    save_state(part, {"start": 2, "count": 5, "confusion": {}, "per_image": {}, "examples": {}})
    with pytest.raises(CorruptFileError, match=r"images_0000002\.part\.safetensors: its contents do not fit"):
        S.evaluate(seg, ds, progress=False, run_dir=run, images_per_step=1, show=0)


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--crop", "100"], "--crop must be a positive multiple of 32"),
    (["--k", "0"], "--k must be at least 1"),
    (["--dataset", "pascal-context"], "needs --root"),
    (["--dataset", "pascal-context", "--root", "/nonexistent", "--templates", "scenes"], "--templates scenes only"),
    (["--dataset", "pascal-context", "--root", "/nonexistent/data"], "/nonexistent/data is not a folder"),
    (["--short-side", "100"], "short_side (100) must be at least the crop size (224)"),
    (["--stats", "/nonexistent/stats.safetensors"], "statistics file /nonexistent/stats.safetensors not found"),
    (["--preset", "paper"], "--preset paper ranks pairs with the PC0 signs from data"),
])
def test_user_mistakes_are_one_line_and_status_2(tmp_path, capsys, argv, message):
    assert segment_main(["--n", "1", "--quiet", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert segment_main(["--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
