"""benchmarks/conventions_scenes.py at tiny size on the bundled scenes-rn in float64: it runs, and its paper-preset
numbers (PC0 signs, sliding-window logits, mIoU, pixel accuracy) equal the NAD paper's rules computed here by dense
loops (conftest.paper_pcs_dense: an SVD per pair; conftest.paper_crop_logits_dense: per token, head and pair)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha

from conftest import dense_pair_directions, layer4_features, paper_crop_logits_dense, paper_pcs_dense, scaled_tol

N, STATS_N, TOP = 2, 13, 5          # scenes, statistics scenes, images per PC0 (odd: no sign tie)


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "conventions_scenes.py"
    spec = importlib.util.spec_from_file_location("conventions_scenes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run():
    bench = _load_benchmark()
    payload, tensors = bench.measure(n=N, stats_n=STATS_N, top=TOP, dtype=torch.float64, compare_dtype=False,
                                     progress=False)
    model, preprocess, _ = nha.load_clip("scenes-rn")
    return bench, payload, tensors, model.double().eval(), preprocess


def _normalised(image, preprocess):
    """A 224 px scene as the model sees it, in float64, with the mean/std of the model's own preprocess."""
    norm = next(t for t in preprocess.transforms if hasattr(t, "mean"))
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255).permute(2, 0, 1)
    return (x - torch.tensor(norm.mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        norm.std, dtype=torch.float64)[:, None, None]


def test_tiny_run_has_every_row_and_its_markdown(tiny_run):
    bench, payload, tensors, *_ = tiny_run
    assert payload["pixels"] == N * 224 * 224
    assert payload["rows"]["default"]["pixels_changed"] == 0
    for name, row in payload["rows"].items():
        assert 0 <= row["miou"] <= 1 and 0 <= row["pixels_changed"] <= payload["pixels"], name
    md = bench.markdown(payload)
    assert md.count("\n| ") == 7 and "preset=\"paper\"" in md
    assert len(tensors["paper_logits"]) == N


def test_paper_signs_equal_the_papers_svd_rule(tiny_run):
    bench, payload, tensors, model, _ = tiny_run
    pool = model.visual.attnpool
    with torch.no_grad():
        feats = layer4_features(model, bench.statistics_images(STATS_N, 30_000).double())
        pcs = paper_pcs_dense(pool, feats, TOP)
        orientation = torch.einsum("hnD,hnD->hn", pcs, dense_pair_directions(pool)).sign()
    assert torch.equal(tensors["signs"].to(orientation), orientation)
    assert payload["signs"]["negative"] == int((orientation < 0).sum())
    assert payload["signs"]["ties"] == 0                   # TOP is odd


def test_paper_preset_numbers_equal_a_dense_loop(tiny_run):
    bench, payload, tensors, model, preprocess = tiny_run
    pool = model.visual.attnpool
    ds = bench.SceneSegmentation(N, seed=20_000, background="classes")
    text = torch.nn.functional.normalize(tensors["text"].double(), dim=-1)
    with torch.no_grad():
        stats = layer4_features(model, bench.statistics_images(STATS_N, 30_000).double())
        pcs = paper_pcs_dense(pool, stats, TOP)
        crops = torch.stack([_normalised(ds[i][0], preprocess) for i in range(N)])
        grid = paper_crop_logits_dense(pool, layer4_features(model, crops), text, pcs, payload["k"])
    up = F.interpolate(grid, size=(224, 224), mode="bilinear", align_corners=False)
    P = text.shape[0]
    confusion = np.zeros((P, P), dtype=np.int64)
    for i in range(N):
        torch.testing.assert_close(tensors["paper_logits"][i], up[i], rtol=0, atol=scaled_tol(up, 1e-10))
        label = ds[i][1].astype(np.int64)
        confusion += np.bincount(P * label.ravel() + up[i].argmax(0).numpy().ravel(), minlength=P * P).reshape(P, P)
    diag, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    miou = float(np.mean(diag[union > 0] / union[union > 0]))
    row = payload["rows"]["paper"]
    assert abs(row["miou"] - miou) <= 1e-12
    assert abs(row["pixacc"] - diag.sum() / confusion.sum()) <= 1e-12
