"""The bundled planted-concept CLIP-ResNet ``scenes-rn``: offline loading, accuracy floors, training script."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nha_plugin import files
from nha_plugin import scenes as S
from nha_plugin.files import CorruptFileError
from nha_plugin.runs import RunMismatchError
from nha_plugin import zoo as Z
from nha_plugin.zoo import build_model, load_zoo_model, zoo_config
from nha_plugin.zoo import train_scenes_rn as T

from conftest import assert_checkpoints_equal, assert_plain_prompts_pick_the_planted_object, planted

# a held-out seed used neither for training (seed 0) nor for picking the shipped checkpoint (1000-1002)
TEST_SEED = 2000


@pytest.fixture(scope="module")
def bundled():
    return load_zoo_model("scenes-rn", "cpu")


def test_config_is_a_clip_resnet_with_enough_heads():
    cfg = zoo_config("scenes-rn")
    assert set(cfg) >= {"embed_dim", "vision_cfg", "text_cfg"}
    v = cfg["vision_cfg"]
    assert len(v["layers"]) == 4 and v["image_size"] == 224
    assert v["width"] * 32 // v["head_width"] >= 8
    assert cfg["text_cfg"]["vocab_size"] == 49408
    assert (Z.ZOO_DIR / cfg["nha"]["weights"]).stat().st_size <= 15 * 2**20


def test_loads_offline_with_the_exact_state_dict(bundled):
    model, preprocess, tokenizer = bundled
    from safetensors.torch import load_file

    stored = load_file(str(Z.ZOO_DIR / "scenes-rn.safetensors"))
    assert set(stored) == set(build_model(zoo_config("scenes-rn")).state_dict())
    ap = model.visual.attnpool
    assert ap.num_heads >= 8 and ap.positional_embedding.shape[0] == 7 * 7 + 1
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer(["a photo of a cat"]).shape == (1, zoo_config("scenes-rn")["text_cfg"]["context_length"])
    # the weights were trained: the batch-norm scales that open_clip initialises to zero are not zero
    assert model.visual.layer4[0].bn3.weight.abs().sum() > 0


def test_preprocess_matches_training_normalisation(bundled):
    _, preprocess, _ = bundled
    scenes = [S.generate_scene((TEST_SEED, i)) for i in range(3)]
    via_pil = torch.stack([preprocess(sc.pil) for sc in scenes])
    via_array = Z.images_to_tensor(np.stack([sc.image for sc in scenes]))
    assert torch.allclose(via_pil, via_array, atol=1e-5)


def test_zero_shot_accuracy_floors_on_held_out_scenes(bundled):
    model, _, tokenizer = bundled
    result = T.evaluate(model, tokenizer, n=150, seed=TEST_SEED)
    assert result["colour"] >= 0.90, result
    assert result["name"] >= 0.90, result
    assert result["background"] >= 0.80, result


def test_plain_prompts_pick_the_planted_object(bundled):
    model, _, tokenizer = bundled
    assert_plain_prompts_pick_the_planted_object(model, tokenizer, TEST_SEED)


def test_multi_positive_loss_reduces_to_clip_loss():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(T.multi_positive_clip_loss(img, txt, scale, torch.eye(6, dtype=torch.bool)), clip)
    # a second positive in row 0 changes the loss
    pos = torch.eye(6, dtype=torch.bool)
    pos[0, 1] = True
    assert not torch.allclose(T.multi_positive_clip_loss(img, txt, scale, pos), clip)


def test_training_batches_are_deterministic_and_positives_are_true():
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    x1, t1, p1 = T.make_batch(3, 6, 0, tok)
    x2, t2, p2 = T.make_batch(3, 6, 0, tok)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(p1, p2)
    assert p1.diagonal().all()
    assert not torch.equal(T.make_batch(4, 6, 0, tok)[0], x1)


def _train(tmp_path, name, *extra):
    # --threads: keep the test session's thread count (main() sets it process-wide)
    return T.main(["--batch-size", "4", "--eval-n", "4", "--eval-every", "2", "--warmup", "1", "--quiet",
                   "--threads", str(torch.get_num_threads()),
                   "--checkpoint", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / f"{name}.safetensors"),
                   *extra])


def test_training_script_runs_and_resumes_exactly(tmp_path, capsys):
    result = _train(tmp_path, "a", "--steps", "3", "--stop-at", "2")
    assert np.isfinite(result["final_loss"])
    assert files.load_state(tmp_path / "a.pt")["step"] == 2
    model = build_model(zoo_config("scenes-rn"))
    model.load_state_dict(Z.load_state_dict_file(tmp_path / "a.safetensors"))  # strict: exported keys are the model's
    # another learning rate would not end where an uninterrupted run does: refused, naming the option
    with pytest.raises(RunMismatchError, match=r"(?s)config\.lr: found 0\.002, expected 0\.001.*--fresh.*--new-opt"):
        _train(tmp_path, "a", "--steps", "3", "--lr", "1e-3")
    # another data seed is another run even with --new-options (which only admits new schedule options)
    with pytest.raises(RunMismatchError, match=r"data\.seed: found 0, expected 1") as e:
        _train(tmp_path, "a", "--steps", "3", "--seed", "1", "--new-options")
    assert "--new-options" not in str(e.value)
    assert files.load_state(tmp_path / "a.pt")["step"] == 2
    _train(tmp_path, "a", "--steps", "3")
    assert "resumed from" in capsys.readouterr().out
    _train(tmp_path, "b", "--steps", "3")
    assert_checkpoints_equal(tmp_path / "a.pt", tmp_path / "b.pt", step=3)
    evaluated = T.main(["--evaluate-only", "--eval-n", "4", "--out", str(tmp_path / "b.safetensors"),
                        "--threads", str(torch.get_num_threads())])
    assert set(evaluated) >= {"colour", "name", "background"} and json.dumps(evaluated["prompts"])
    # --fresh starts over with the new options (one step) and replaces the checkpoint
    _train(tmp_path, "b", "--steps", "3", "--lr", "1e-3", "--stop-at", "1", "--fresh")
    assert "resumed from" not in capsys.readouterr().out
    state = files.load_state(tmp_path / "b.pt")
    assert state["step"] == 1 and state["key"]["config"]["lr"] == 1e-3
    # --new-options continues it with another learning rate, as a new phase from step 1
    _train(tmp_path, "b", "--steps", "3", "--stop-at", "2", "--new-options")
    state = files.load_state(tmp_path / "b.pt")
    assert state["step"] == 2
    assert [(p["from_step"], p["config"]["lr"]) for p in state["phases"]] == [(0, 1e-3), (1, 2e-3)]


def test_a_planted_pickle_checkpoint_is_never_loaded(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(planted(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()                      # the payload works: the assertions below can fail
    for name in ("pickled", "torch_saved"):
        path = tmp_path / f"{name}.pt"
        if name == "pickled":
            path.write_bytes(pickle.dumps({"model": planted(marker), "step": 1}))
        else:
            torch.save({"model": planted(marker), "step": 1}, path)
        with pytest.raises(CorruptFileError, match="pickle") as e:
            _train(tmp_path, name, "--steps", "1")
        assert e.value.path == path and str(path) in str(e.value)
    # a valid state file that is not a trainer checkpoint is refused too, naming the file
    files.save_state(tmp_path / "other.pt", {"step": 1})
    with pytest.raises(CorruptFileError, match="no training checkpoint") as e:
        _train(tmp_path, "other", "--steps", "1")
    assert e.value.path == tmp_path / "other.pt"
    assert not marker.exists()


def test_cli_reports_a_refused_checkpoint_in_one_line(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "x.pt")
    assert T.run_cli(["--checkpoint", str(tmp_path / "x.pt"), "--steps", "1", "--quiet",
                      "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "x.pt") in err and "--fresh" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--help"])
    assert e.value.code == 0
