"""The report's builder without a browser: leaderboard numbers against a bootstrap written here, the atlas
against the library's one-unit functions and a dense decomposition, the shards, escaping, the CLI."""
import json

import numpy as np
import pytest
import torch
from conftest import tiny_report_inputs

from nha_plugin.harness import metrics as M
from nha_plugin.report import leaderboard, read_run, site_size, write_site
from nha_plugin.report.atlas import k90, synthetic_atlas
from nha_plugin.text.describe import neuron_directions
from nha_plugin.report.site import shard_text


def _records(folder, method):
    return [json.loads(line) for line in (folder / f"{method}.records.jsonl").read_text().splitlines()]


def _shard(path):
    """The value of a shard file, parsed as JSON from between ``NHA.put(name, `` and ``);``."""
    text = path.read_text()
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


def test_leaderboard_cells_equal_a_bootstrap_written_here():
    inputs = tiny_report_inputs()
    run = read_run(inputs["run"])
    board = leaderboard(run)
    seed = run["config"]["seed"]
    assert board["reference"] == "nad_spatial"
    assert set(board["methods"]) == {"nad_spatial", "random", "centre"}
    for method in board["methods"]:
        recs = _records(inputs["run"], method)
        for key in ("mass_in_mask", "pointing_game", "seconds_per_image"):
            vals = np.array([r[key] for r in sorted(recs, key=lambda r: r["index"])], float)
            cell = board["cells"][method][key]
            assert cell["mean"] == pytest.approx(vals.mean(), rel=1e-9, abs=1e-12)
            idx = np.random.Generator(np.random.PCG64(seed)).integers(0, len(vals), size=(10_000, len(vals)))
            low, high = np.percentile(vals[idx].mean(axis=1), [2.5, 97.5])
            assert cell["ci95"] == pytest.approx([low, high], rel=1e-9, abs=1e-12)
            ref = np.array([r[key] for r in sorted(_records(inputs["run"], "nad_spatial"), key=lambda r: r["index"])])
            if method == "nad_spatial":
                assert cell["paired"] is None
            else:
                d = vals - ref
                assert cell["paired"]["difference"] == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
                dl, dh = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
                assert cell["paired"]["ci95"] == pytest.approx([dl, dh], rel=1e-9, abs=1e-12)
    # the completeness error exists only for the method that claims completeness
    assert "completeness_error" in board["cells"]["nad_spatial"]
    assert "completeness_error" not in board["cells"]["random"]
    directions = {c["key"]: c["higher_is_better"] for c in board["metrics"]}
    assert directions == {k: M.METRICS[k].higher_is_better for k in directions}
    assert {"pixacc", "miou", "map"} <= set(directions)


def test_read_run_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        read_run(tmp_path)


def test_neuron_directions_equal_the_one_unit_function():
    from nha_plugin.adapters import get_spec
    from nha_plugin.models import decompose
    from nha_plugin.text.describe import unit_direction
    inputs = tiny_report_inputs()
    spec = get_spec(inputs["model"]).detached()
    s = decompose(inputs["model"], inputs["x"]).pair_coefficients.float()
    dirs = neuron_directions(spec, s, chunk=7)
    for n in (0, 5, 100, spec.num_neurons - 1):
        assert torch.allclose(dirs[n], unit_direction(spec, f"neuron:{n}", s).float(), atol=1e-4)


def test_atlas_units_match_describe_units_and_a_dense_decomposition():
    from nha_plugin.adapters import get_spec
    from nha_plugin.models import decompose
    from nha_plugin.text import build_dictionary, describe_units
    inputs = tiny_report_inputs()
    atlas, model = inputs["atlas"], inputs["model"]
    spec = get_spec(model).detached()
    H, C = spec.num_heads, spec.num_neurons
    assert (atlas["n_heads"], atlas["n_neurons"], len(atlas["pairs"])) == (H, C, H * C)
    s = decompose(model, inputs["x"]).pair_coefficients.float()
    dictionary = build_dictionary(model, inputs["tokenizer"], "scenes", progress=False)
    units = ["head:1", "neuron:3", "pair:H2N7"]
    expected = describe_units(spec, units, dictionary, 3, coefficients=s)
    found = [atlas["heads"][1], atlas["neurons"][3], next(p for p in atlas["pairs"] if p["id"] == "H2N7")]
    for e, f in zip(expected, found):
        assert [w for w, _ in e["words"]] == [w for w, _ in f["words"]]
        assert [c for _, c in f["words"]] == pytest.approx([c for _, c in e["words"]], rel=1e-3, abs=1e-4)
    # top images of a pair: the largest centred coefficients along its PC0 sign (the paper's rule with k = all
    # 6 images: +1 when more than half lie above the mean), times ||u||
    from nha_plugin.pool import pair_directions
    pair, col = found[2], s[:, 2, 7].double()
    sign = 1.0 if 2 * int((col > col.mean()).sum()) > len(col) else -1.0
    act = (col - col.mean()) * float(pair_directions(spec)[2, 7].norm()) * sign
    order = torch.argsort(act, descending=True)[:2].tolist()
    assert [t[0] for t in pair["top"]] == order
    assert [t[1] for t in pair["top"]] == pytest.approx(act[order].tolist(), rel=1e-3, abs=1e-4)
    shares = sum(p["share"] for p in atlas["pairs"])
    assert shares == pytest.approx(1.0, rel=1e-6)
    grid = atlas["grid"]
    assert all(np.asarray(t[2]).shape == tuple(grid) for t in pair["top"])


def test_k90_equals_a_dense_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.gamma(0.5, size=rng.integers(1, 30))
        total, acc, expected = v.sum(), 0.0, 0
        for x in sorted(v, reverse=True):
            acc += x
            expected += 1
            if acc >= 0.9 * total * (1 - 1e-12):
                break
        assert k90(v) == expected
    assert k90(np.zeros(4)) == 0


def test_shards_parse_as_json_and_keep_unsafe_strings_as_data(tmp_path):
    value = {"a": float("nan"), "b": "</script>\u2028<b>", "c": [1.5, float("inf")]}
    text = shard_text("x", value)
    assert "\u2028" not in text and text.startswith('NHA.put("x", ')
    assert json.loads(text[len('NHA.put("x", '):-3]) == {"a": None, "b": "</script>\u2028<b>", "c": [1.5, None]}
    atlas = synthetic_atlas(n_heads=3, n_neurons=10, k=2, vocabulary=["__proto__", "yellow", "Yellowish", "7up"])
    index = write_site(tmp_path, None, [], atlas, title="<script>alert(1)</script>", block=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x.records.jsonl").write_text("12345")
    size = site_size(tmp_path)
    pages = [p for p in tmp_path.rglob("*") if p.is_file() and p.relative_to(tmp_path).parts[0] != "run"]
    assert size == {"bytes": sum(p.stat().st_size for p in pages), "files": len(pages), "cache_bytes": 5}
    page = index.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    shards = sorted(p.name for p in (tmp_path / "data").glob("neurons-*.js"))
    assert shards == ["neurons-0.js", "neurons-1.js", "neurons-2.js"]
    assert len(_shard(tmp_path / "data" / "neurons-2.js")["units"]) == 2 * (1 + 3)
    # every unit's every word is in the search shard of its first letter, and nowhere else
    found = {}
    for p in (tmp_path / "data").glob("search-*.js"):
        for word, hits in _shard(p):
            assert p.stem == "search-" + (word[0] if word[0].isalpha() else "other")
            for unit, coef in hits:
                found[(unit, word)] = coef
    units = atlas["heads"] + atlas["neurons"] + atlas["pairs"]
    expected = {(u["id"], w.lower()): c for u in units for w, c in u["words"]}
    assert found == expected


def test_cli_builds_a_site_from_a_run_and_reports_mistakes_in_one_line(tmp_path, capsys):
    from nha_plugin.cli.report import main
    inputs = tiny_report_inputs()
    assert main(["report", "--run", str(inputs["run"]), "--out", str(tmp_path / "site"), "--no-atlas",
                 "--quiet"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("index.html") and (tmp_path / "site" / "index.html").is_file()
    lb = _shard(tmp_path / "site" / "data" / "leaderboard.js")
    assert [im["index"] for im in lb["images"]] == [0, 1]
    rec = {r["index"]: r for r in _records(inputs["run"], "random")}
    from nha_plugin.harness.data import items_to_tensor, load_benchmark_data
    from nha_plugin.readout import ZeroShotClassifier
    items, classes, _ = load_benchmark_data("scenes", 2, read_run(inputs["run"])["config"]["seed"])
    with torch.no_grad():
        logits = ZeroShotClassifier(inputs["model"], inputs["tokenizer"], classes, templates=("a photo of a {}.",))(
            items_to_tensor(items))
    probs = torch.softmax(logits.double(), -1)
    for im in lb["images"]:
        assert (tmp_path / "site" / im["maps"]["random"]).is_file()
        assert im["metrics"]["random"]["mass_in_mask"] == pytest.approx(rec[im["index"]]["mass_in_mask"], rel=1e-12)
        item = items[im["index"]]
        assert im["label"] == item.label
        assert im["probability"] == pytest.approx(float(probs[im["index"], classes.index(item.label)]), rel=1e-4)
    assert main(["report", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "s2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json" in err[0]


def test_image_folder_loads_sorted_images_and_refuses_an_empty_folder(tmp_path):
    from PIL import Image

    from nha_plugin.report.build import load_image_folder
    rng = np.random.default_rng(1)
    pictures = {name: rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8) for name in ("b.png", "a.png")}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    seen = []
    x, thumbs = load_image_folder(tmp_path, lambda im: seen.append(np.asarray(im)) or torch.zeros(3, 8, 8))
    assert x.shape == (2, 3, 8, 8) and len(thumbs) == 2
    assert [p.tobytes() for p in seen] == [pictures["a.png"].tobytes(), pictures["b.png"].tobytes()]
    assert thumbs[0].shape == (112, 112, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected images"):
        load_image_folder(tmp_path / "empty", None)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        load_image_folder(tmp_path / "missing", None)
