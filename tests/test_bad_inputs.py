"""The bad-input matrix (issue 13 §7): every case names the call, the exact error type it must raise and a phrase
the message must contain (what was expected, or what to do). None may return a number.

API cases run on the tiny CLIP-ResNet of conftest; CLI cases run ``nha`` and must end before any model is loaded
(one line on stderr, ``SystemExit`` with status 2, a close name suggested for a typo)."""
import copy

import pytest
import torch
from conftest import images_for, make_tiny, make_tiny_vit

import nha_plugin as nha
from nha_plugin import cli
from nha_plugin.applications import ablation as A
from nha_plugin.attribution import NeuronHeadAttribution
from nha_plugin.files import CorruptFileError, load_tensors
from nha_plugin.images import check_pixels
from nha_plugin.spec import TrainingModeError, UnsupportedModelError
from nha_plugin.stats import collect

TINY = make_tiny(torch.float64)
X = images_for(TINY, batch=2)


def _nan(x):
    x = x.clone()
    x[0, 1, 2, 3] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x[1, 0, 0, 0] = float("inf")
    return x


def _training_copy():
    return copy.deepcopy(TINY).train()


def _nad():
    return NeuronHeadAttribution(lambda z: z, readout=torch.randn(TINY.visual.output_dim, 3, dtype=torch.float64),
                                 model=TINY, logit_scale=1.0)


# (id, thunk, error type, phrase of the message)
API = [
    ("decompose-empty-batch", lambda: nha.decompose(TINY, X[:0]), ValueError, "empty batch"),
    ("decompose-one-channel", lambda: nha.decompose(TINY, X[:, :1]), ValueError, "3 colour channels"),
    ("decompose-no-batch-axis", lambda: nha.decompose(TINY, X[0]), ValueError, "unsqueeze"),
    ("decompose-float32-on-float64", lambda: nha.decompose(TINY, X.float()), TypeError, "float64"),
    ("decompose-uint8", lambda: nha.decompose(TINY, (X.clamp(0, 1) * 255).to(torch.uint8)), TypeError,
     "expected float pixels"),
    ("decompose-int64", lambda: nha.decompose(TINY, X.long()), TypeError, "expected float pixels"),
    ("decompose-nan", lambda: nha.decompose(TINY, _nan(X)), ValueError, "NaN/Inf"),
    ("decompose-inf", lambda: nha.decompose(TINY, _inf(X)), ValueError, "NaN/Inf"),
    ("decompose-list", lambda: nha.decompose(TINY, X.tolist()), TypeError, "expected images as a float tensor"),
    ("decompose-numpy", lambda: nha.decompose(TINY, X.numpy()), TypeError, "expected images as a float tensor"),
    ("decompose-size-not-multiple-of-32", lambda: nha.decompose(TINY, X[..., :50, :50]), ValueError, "multiples of 32"),
    ("decompose-training-mode", lambda: nha.decompose(_training_copy(), X), TrainingModeError, "model.eval()"),
    ("decompose-vit", lambda: nha.decompose(make_tiny_vit(), X), UnsupportedModelError, "nha_plugin.vit"),
    ("decompose-linear", lambda: nha.decompose(torch.nn.Linear(2, 2), X), UnsupportedModelError, "Supported"),
    ("decompose-string", lambda: nha.decompose("RN50", X), UnsupportedModelError, "expected a CLIP-ResNet"),
    ("check-pixels-zero-size", lambda: check_pixels(torch.zeros(1, 3, 0, 0)), ValueError, "no pixels"),
    ("nad-training-mode", lambda: NeuronHeadAttribution(lambda z: z, readout=torch.randn(
        TINY.visual.output_dim, 3, dtype=torch.float64), model=_training_copy(), logit_scale=1.0).attribute(
        X, target=0), TrainingModeError, "model.eval()"),
    ("nad-target-out-of-range", lambda: _nad().attribute(X, target=7), ValueError, "out of range"),
    ("nad-granularity", lambda: _nad().attribute(X, target=0, granularity="layer"), ValueError, "granularity"),
    ("nad-readout-dimension", lambda: NeuronHeadAttribution(lambda z: z, readout=torch.randn(
        TINY.visual.output_dim - 1, 2), model=TINY), ValueError, f"D={TINY.visual.output_dim}"),
    ("nad-no-readout", lambda: NeuronHeadAttribution(lambda z: z), TypeError, "linear read-out"),
    ("collect-uint8", lambda: collect(TINY, [(X.clamp(0, 1) * 255).to(torch.uint8)], k=2, progress=False),
     TypeError, "expected float pixels"),
    ("collect-int32", lambda: collect(TINY, [X.int()], k=2, progress=False), TypeError, "expected float pixels"),
    ("collect-nan", lambda: collect(TINY, [_nan(X)], k=2, progress=False), ValueError, "NaN/Inf"),
    ("collect-training-mode", lambda: collect(_training_copy(), [X], k=2, progress=False), TrainingModeError,
     "model.eval()"),
    ("decompose-empty-sink", lambda: nha.decompose(TINY, X, sink=""), ValueError, "sink must be one of"),
    ("keep-mask-level", lambda: A.keep_mask(None, "pixel", 0.5), ValueError, "pair"),
    ("load-tensors-not-safetensors", lambda: load_tensors(__file__), CorruptFileError, "safetensors"),
]


@pytest.mark.parametrize("thunk,error,phrase", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_refuses_bad_input(thunk, error, phrase):
    with pytest.raises(error) as info:
        thunk()
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    assert phrase in str(info.value), str(info.value)


def test_refused_training_mode_leaves_the_model_as_it_was():
    model = _training_copy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingModeError):
        nha.decompose(model, X)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# (id, argv, phrase of the one-line message)
CLI = [
    ("unknown-command", ["dem"], "did you mean 'demo'?"),
    ("benchmark-method-typo", ["benchmark", "--methods", "nad_heds", "--quiet"], "did you mean 'nad_heads'?"),
    ("benchmark-metric-typo", ["benchmark", "--metrics", "nonexistent-metric", "--quiet"], "choose from"),
    ("benchmark-dataset-typo", ["benchmark", "--dataset", "scene"], "did you mean 'scenes'?"),
    ("benchmark-imagenet-s-without-path", ["benchmark", "--dataset", "imagenet-s"], "needs --path"),
    ("benchmark-path-without-imagenet-s", ["benchmark", "--path", "x.mat"], "--path is read by --dataset imagenet-s"),
    ("benchmark-n-zero", ["benchmark", "--n", "0"], "must be at least 1"),
    ("benchmark-n-not-a-number", ["benchmark", "--n", "ten"], "expected a whole number"),
    ("benchmark-device", ["benchmark", "--device", "nosuchdevice", "--quiet"], "is not a device torch knows"),
    ("describe-unit-heads", ["describe", "--unit", "heads:3"], "did you mean 'head:3'?"),
    ("describe-unit-pair-comma", ["describe", "--unit", "pair:3,17"], "did you mean 'pair:H3N17'?"),
    ("describe-device-index", ["describe", "--unit", "head:0", "--device", "cuda:99"], "--device cuda:99"),
    ("describe-device-meta", ["describe", "--unit", "head:0", "--device", "meta"], "cannot compute"),
    ("describe-templates-typo", ["describe", "--unit", "head:0", "--templates", "imagenett"],
     "did you mean 'imagenet'?"),
    ("describe-pool-typo", ["describe", "--unit", "head:0", "--pool", "wrds"], "did you mean 'words'?"),
    ("describe-missing-stats", ["describe", "--unit", "head:0", "--stats", "/nonexistent/s.safetensors"],
     "not found"),
    ("demo-model-typo", ["demo", "--model", "RN5O"], "did you mean"),
    ("demo-n-zero", ["demo", "--n", "0"], "must be at least 1"),
    ("demo-seed-negative", ["demo", "--seed", "-1"], "0 or more"),
    ("textspan-resnet-model", ["textspan", "--model", "scenes-rn", "--out", "t.json"], "expected a CLIP-ViT"),
    ("describe-vit-model", ["describe", "--model", "scenes-vit", "--unit", "head:0"], "expected a CLIP-ResNet"),
]


@pytest.mark.parametrize("argv,phrase", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_refuses_bad_arguments_in_one_line(argv, phrase, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, (info.value.code, err)
    assert phrase in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_output_paths_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv, phrase in ((["demo", "--out", str(blocker)], "is a file; give a folder"),
                         (["benchmark", "--out", str(blocker), "--quiet"], "is a file; give a folder")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err


def test_the_matrix_is_large_enough():
    assert len(API) + len(CLI) >= 40


def _unescaped_pipes(line: str) -> int:
    return line.replace("\\|", "").count("|")


def test_user_strings_cannot_break_the_sparsity_report():
    evil = "cars | trucks\n<script>alert(1)</script>"
    row = {"fraction": 0.5, "kept": 1, "units": 2, "accuracy": 0.25, "error": 0.5}
    task = {"original": 0.5, "mean_embedding": 0.125, "sweeps": {"pair": [row]}, "neuron_pcs": {1: 0.5},
            "text": {}, "errors": {"neuron_pcs": {1: 0.25}, "text": {}}}
    md = A.sparsity_markdown({"tasks": {evil: task, "plain": task}, "meta": {"model": evil, "commands": [evil]}})
    assert "<script>" not in md and "&lt;script&gt;" in md
    tables, current = [], []
    for line in md.splitlines() + [""]:                      # consecutive lines starting with | form one table
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = tables + [current], []
    assert len(tables) == 2
    for table in tables:
        columns = table[1].count("|")                        # the |---|---| separator: one pipe per column + 1
        assert all(_unescaped_pipes(line) == columns for line in table), table
    assert sum(evil.split("\n")[0].replace("|", "\\|") in line for line in tables[0]) == 1   # the task's header
