"""Runner: same inputs for every method, files written, a killed run resumes to the numbers of an uninterrupted
one, another configuration is refused (--fresh starts over), planted pickles never run, CLI parsing."""
import argparse
import dataclasses
import functools
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import planted
from nha_plugin.cli import benchmark as cli
from nha_plugin.files import CorruptFileError
from nha_plugin.harness import registry as HR
from nha_plugin.harness import runner
from nha_plugin.harness.captum_methods import CaptumSettings
from nha_plugin.harness.data import BenchItem
from nha_plugin.harness.runner import BenchmarkConfig, run_benchmark
from nha_plugin.readout import LinearReadout
from nha_plugin.runs import RunMismatchError, read_records

ABC = ["a", "b", "c"]
CHEAP = CaptumSettings(ig_steps=2, gradshap_samples=2, occlusion_window=64)


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

    @HR.register_method("test_counting", needs_grad=False, description="counts its calls")
    def fn(forward, images, target):
        calls.append(images.shape[0])
        return images.mean(dim=1)

    yield calls
    HR.METHODS.pop("test_counting", None)


@pytest.fixture(scope="module")
def head(tiny32):
    return LinearReadout(tiny32, F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=0),
                         logit_scale=100.0)


def test_run_writes_results_and_resumes(head, tmp_path, counting_method, capsys):
    cfg = BenchmarkConfig(methods=("nad_spatial", "test_counting", "centre"), n=2, n_subset=1, batch_size=1,
                          out=str(tmp_path / "b"), del_ins_steps=2, infidelity_samples=1, sensitivity_samples=1,
                          randomisation_stages=("attnpool",), quiet=True)
    res = run_benchmark(cfg, forward=head, items=_items(), classes=["a", "b", "c"])
    out = tmp_path / "b"
    for f in ("results.json", "results.md", "heatmaps.png", "metric_pointing_game.png", "run.json",
              "test_counting.records.jsonl", "map-nad_spatial-0.part.safetensors"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"nad_spatial", "test_counting", "centre"}
    nad = saved["methods"]["nad_spatial"]
    assert nad["completeness_error"]["mean"] < 1e-4 and nad["n_images"] == 2
    assert "completeness_error" not in saved["methods"]["centre"]
    assert saved["methods"]["centre"]["randomisation_spearman"]["mean"] == pytest.approx(1.0)   # ignores the model
    assert 0 <= nad["pixacc"]["mean"] <= 1 and "| nad_spatial |" in (out / "results.md").read_text()
    assert capsys.readouterr().out == ""                                   # quiet: no table on stdout
    # calls: image 0; max-sensitivity on it (1 perturbation; the original map is reused); randomisation
    # (1 stage); then image 1
    assert counting_method == [1, 1, 1, 1]
    # not quiet: the same run (nothing recomputed) prints its table, one row per method
    run_benchmark(dataclasses.replace(cfg, quiet=False), forward=head, items=_items(), classes=["a", "b", "c"])
    printed = capsys.readouterr().out
    assert counting_method == [1, 1, 1, 1]
    assert [line.split()[0] for line in printed.splitlines()[2:5]] == ["nad_spatial", "test_counting", "centre"]
    # a killed run: drop the last record, rerun -> only that image is recomputed
    rec = out / "test_counting.records.jsonl"
    lines = rec.read_text().splitlines()
    rec.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])          # torn last line
    counting_method.clear()
    with pytest.warns(UserWarning, match="torn"):
        res2 = run_benchmark(cfg, forward=head, items=_items(), classes=["a", "b", "c"])
    assert counting_method == [1]
    assert res2["methods"]["test_counting"]["n_images"] == 2
    assert json.dumps(res2["methods"]["nad_spatial"]) == json.dumps(res["methods"]["nad_spatial"])
    # another configuration refuses to mix with these records
    with pytest.raises(RunMismatchError, match=r"(?s)config\.seed: found 10000, expected 1\b.*--fresh"):
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


def _stochastic_cfg(out, **changes):
    base = dict(methods=("gradient_shap", "nad_spatial"), n=3, n_subset=2, batch_size=2, out=str(out), captum=CHEAP,
                metrics=("pointing_game", "mass_in_mask", "deletion_insertion", "infidelity", "max_sensitivity",
                         "completeness_error", "seconds_per_image"),
                del_ins_steps=2, infidelity_samples=2, sensitivity_samples=1, n_grid=1, quiet=True)
    return BenchmarkConfig(**{**base, **changes})


def _rows(out, method):
    """A method's records in index order, without the wall time (the one number that differs between runs)."""
    rows = sorted(read_records(out / f"{method}.records.jsonl"), key=lambda r: r["index"])
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]


def _scores(results):
    """Every score and comparison but the wall times (the one number that differs between runs)."""
    def strip(entry):
        entry = {k: v for k, v in entry.items() if k != "seconds_per_image"}
        if "vs_reference" in entry:
            vs = entry["vs_reference"]
            entry["vs_reference"] = dict(vs, metrics={k: v for k, v in vs["metrics"].items()
                                                      if k != "seconds_per_image"})
        return entry
    return json.dumps({m: strip(e) for m, e in results["methods"].items()}, sort_keys=True)


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_run(head, tmp_path, monkeypatch):
    straight = run_benchmark(_stochastic_cfg(tmp_path / "straight"), forward=head, items=_items(3), classes=ABC)
    # kill the run while it writes gradient_shap's first batch: image 0's record whole, image 1's cut mid-line
    real, calls = runner.append_records, []

    def killed_while_writing(path, rows):
        calls.append(path)
        if len(calls) == 1:
            real(path, rows[:1])
            with open(path, "a") as f:
                f.write(json.dumps(rows[1])[:25])
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(runner, "append_records", killed_while_writing)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(_stochastic_cfg(killed), forward=head, items=_items(3), classes=ABC)
    monkeypatch.undo()
    assert len(read_records(killed / "gradient_shap.records.jsonl")) == 1
    assert not (killed / "nad_spatial.records.jsonl").exists()
    with pytest.warns(UserWarning, match="torn"):
        resumed = run_benchmark(_stochastic_cfg(killed), forward=head, items=_items(3), classes=ABC)
    # each batch with a missing record is recomputed whole with per-image seeds: the very same computation per
    # image as the uninterrupted run, so the numbers are equal
    for method in ("gradient_shap", "nad_spatial"):
        rows = _rows(killed, method)
        assert [r["index"] for r in rows] == [0, 1, 2], method
        assert rows == _rows(tmp_path / "straight", method), method
    assert _scores(resumed) == _scores(straight)
    assert resumed["methods"]["gradient_shap"]["n_images"] == 3
    # per-image seeds: gradient_shap, infidelity and max-sensitivity of an image do not depend on its batch mates
    # (one image per batch vs two), up to the float rounding of batched arithmetic
    single = tmp_path / "single"
    run_benchmark(_stochastic_cfg(single, batch_size=1, methods=("gradient_shap",)), forward=head, items=_items(3),
                  classes=ABC)
    for a, b in zip(_rows(tmp_path / "straight", "gradient_shap"), _rows(single, "gradient_shap")):
        assert a.keys() == b.keys()
        for key in ("mass_in_mask", "deletion_auc", "infidelity", "max_sensitivity"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["index"], key)


def test_other_configuration_is_refused_and_fresh_starts_over(head, tmp_path, counting_method, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(cli, "run_benchmark", functools.partial(run_benchmark, forward=head, items=_items(2),
                                                                classes=ABC))
    out = tmp_path / "b"
    args = ["--out", str(out), "--methods", "test_counting", "--metrics", "pointing_game", "--n", "2", "--quiet"]
    assert cli.main(args) == 0 and counting_method == [2]
    before = (out / "test_counting.records.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(args + ["--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nha benchmark: error: ")
    assert "config.seed: found 10000, expected 5" in err and "--fresh" in err and str(out) in err
    assert counting_method == [2] and (out / "test_counting.records.jsonl").read_bytes() == before
    # through the API: the same refusal, naming a nested setting
    cfg = cli.config_from_args(cli_args(args))
    with pytest.raises(RunMismatchError, match=r"(?s)config\.captum\.ig_steps: found 16, expected 3.*--fresh"):
        run_benchmark(dataclasses.replace(cfg, captum=CaptumSettings(ig_steps=3)), forward=head, items=_items(2),
                      classes=ABC)
    # --fresh starts over: the records are recomputed under the new key, which a rerun then resumes
    assert cli.main(args + ["--seed", "5", "--fresh"]) == 0 and counting_method == [2, 2]
    assert json.loads((out / "run.json").read_text())["key"]["config"]["seed"] == 5
    assert cli.main(args + ["--seed", "5"]) == 0 and counting_method == [2, 2]


def cli_args(argv):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(argv)



def _plant(folder, name, marker):
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    if name.endswith(".pt"):
        torch.save(planted(marker), path)
    else:
        path.write_bytes(pickle.dumps(planted(marker)))


def test_planted_pickles_never_run(head, tmp_path):
    """A pickle whose unpickling creates a marker file, planted under each name the benchmark reads in its folder
    (and the *.pt and old-layout names it never reads): a clear error naming the file, or ignored."""
    marker = tmp_path / "unpickled"
    base = tmp_path / "base"
    cfg = BenchmarkConfig(methods=("centre",), metrics=("pointing_game",), n=2, n_subset=0, batch_size=1, n_grid=1,
                          out=str(base), quiet=True)
    run_benchmark(cfg, forward=head, items=_items(2), classes=ABC)
    never_read = ("centre.pt", "results.pt", "records.pt", "config.json", "records/centre.jsonl", "maps/centre_0.npy")
    # (names planted together, whether the run must stop): a records file of pickle bytes is either a torn last
    # line (dropped and recomputed) or an unparseable one (an error), depending on where its newlines fall
    cases = [(("run.json",), True), (("map-centre-0.part.safetensors",), True), (("centre.records.jsonl",), None),
             (never_read, False)]
    for names, must_stop in cases:
        out = tmp_path / names[0].replace("/", "_")
        shutil.copytree(base, out)
        for name in names:
            _plant(out, name, marker)
        try:
            results = run_benchmark(dataclasses.replace(cfg, out=str(out)), forward=head, items=_items(2),
                                    classes=ABC)
        except (CorruptFileError, RunMismatchError) as err:
            assert must_stop is not False and names[0] in str(err), (names, str(err))     # names the file
        else:
            assert must_stop is not True, names
            assert results["methods"]["centre"]["n_images"] == 2, names
        assert not marker.exists(), f"{names} unpickled"
