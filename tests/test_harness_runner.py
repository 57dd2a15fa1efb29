"""Runner: same inputs for every method, files written, a killed run resumes, CLI parsing."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nha_plugin.cli import benchmark as cli
from nha_plugin.harness import methods as HM
from nha_plugin.harness.runner import BenchItem, BenchmarkConfig, run_benchmark
from nha_plugin.readout import LinearReadout


def _items(n=2, size=128):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), bool)
        mask[10 * i:10 * i + 40, 20:70] = True
        items.append(BenchItem(i, img, mask, ["a", "b", "c"][i % 3]))
    return items


@pytest.fixture
def counting_method():
    calls = []

    @HM.register_method("test_counting", needs_grad=False, description="counts its calls")
    def fn(forward, images, target):
        calls.append(images.shape[0])
        return images.mean(dim=1)

    yield calls
    HM.METHODS.pop("test_counting", None)


def test_run_writes_results_and_resumes(tiny32, tmp_path, counting_method, capsys):
    head = LinearReadout(tiny32, F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=0),
                         logit_scale=100.0)
    cfg = BenchmarkConfig(methods=("nad_spatial", "test_counting", "centre"), n=2, n_subset=1, batch_size=1,
                          out=str(tmp_path / "b"), del_ins_steps=2, infidelity_samples=1, sensitivity_samples=1,
                          randomisation_stages=("attnpool",), quiet=True)
    res = run_benchmark(cfg, forward=head, items=_items(), classes=["a", "b", "c"])
    out = tmp_path / "b"
    for f in ("results.json", "results.md", "heatmaps.png", "metric_pointing_game.png", "config.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"nad_spatial", "test_counting", "centre"}
    nad = saved["methods"]["nad_spatial"]
    assert nad["completeness_error"]["mean"] < 1e-4 and nad["n_images"] == 2
    assert "completeness_error" not in saved["methods"]["centre"]
    assert saved["methods"]["centre"]["randomisation_spearman"]["mean"] == pytest.approx(1.0)   # ignores the model
    assert 0 <= nad["pixacc"]["mean"] <= 1 and "| nad_spatial |" in (out / "results.md").read_text()
    assert "nad_spatial" in capsys.readouterr().out or cfg.quiet
    # calls: image 0; max-sensitivity on it (1 perturbation; the original map is reused); randomisation
    # (1 stage); then image 1
    assert counting_method == [1, 1, 1, 1]
    # a killed run: drop the last record, rerun -> only that image is recomputed
    rec = out / "records" / "test_counting.jsonl"
    lines = rec.read_text().splitlines()
    rec.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])          # torn last line
    counting_method.clear()
    res2 = run_benchmark(cfg, forward=head, items=_items(), classes=["a", "b", "c"])
    assert counting_method == [1]
    assert res2["methods"]["test_counting"]["n_images"] == 2
    assert json.dumps(res2["methods"]["nad_spatial"]) == json.dumps(res["methods"]["nad_spatial"])
    # another configuration refuses to mix with these records
    with pytest.raises(ValueError, match="another configuration"):
        run_benchmark(BenchmarkConfig(**{**cfg.__dict__, "seed": 1}), forward=head, items=_items(),
                      classes=["a", "b", "c"])


def test_cli_parser_and_quick():
    parser = argparse.ArgumentParser(prog="nha")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["benchmark", "--quick", "--methods", "nad_spatial,gradcam", "--out", "x"])
    cfg = cli.config_from_args(args)
    assert cfg.n == 3 and cfg.methods == ("nad_spatial", "gradcam") and cfg.out == "x"
    args = parser.parse_args(["benchmark", "--n", "5", "--metrics", "pointing_game,seconds_per_image"])
    cfg = cli.config_from_args(args)
    assert cfg.n == 5 and cfg.metrics == ("pointing_game", "seconds_per_image") and cfg.model == "scenes-rn"
    with pytest.raises(SystemExit):
        cli.config_from_args(parser.parse_args(["benchmark", "--metrics", "accuracy"]))
