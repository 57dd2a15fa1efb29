"""Describe: unit directions against independent computations, planted words, all pairs to JSON/Parquet, CLI."""
import json
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin import text
from nha_plugin.adapters import get_spec
from nha_plugin.files import CorruptFileError
from nha_plugin.runs import RunMismatchError
from nha_plugin.text import all_pairs
from tests.conftest import images_for, make_tiny, planted


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(torch.float32)


@pytest.fixture(scope="module")
def spec(tiny):
    return get_spec(tiny)


def _random_dictionary(D, N=300, seed=0, extra=None):
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(N, D, generator=g), dim=1)
    texts = [f"w{i}" for i in range(N)]
    if extra is not None:
        atoms = torch.cat([atoms, F.normalize(extra, dim=1)])
        texts += [f"planted{i}" for i in range(len(extra))]
    return text.TextDictionary(texts=texts, embeddings=atoms, atoms=atoms)


def test_parse_unit():
    assert text.parse_unit("pair:H3N17") == ("pair", (3, 17))
    assert text.parse_unit("H3N17") == ("pair", (3, 17))
    assert text.parse_unit("head:3") == ("head", (3,))
    assert text.parse_unit("neuron:17") == ("neuron", (17,))
    with pytest.raises(ValueError, match="pair:H3N17"):
        text.parse_unit("pair:3,17")


def test_pair_direction_is_the_weights_direction_and_planted_word_is_found(spec):
    u = nha.pair_directions(spec.detached())[3, 17]
    torch.testing.assert_close(text.unit_direction(spec, "pair:H3N17"), F.normalize(u, dim=0))
    words = _random_dictionary(spec.output_dim, extra=torch.stack([u, torch.randn(spec.output_dim)]))
    d = text.describe(spec, "pair:H3N17", words, k=3)
    assert d["words"][0][0] == "planted0" and d["words"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert d["relative_residual"] < 1e-5
    with pytest.raises(ValueError, match="H=8 heads"):
        text.unit_direction(spec, "pair:H8N0")


def test_neuron_and_head_pc0_match_explicit_contributions(spec):
    tiny = make_tiny(torch.float64)
    spec64 = get_spec(tiny)
    contrib = nha.decompose(tiny, images_for(tiny, batch=12))
    s = contrib.pair_coefficients
    for unit, contributions in (("neuron:5", contrib.neuron_contributions()[:, 5]),
                                ("head:2", contrib.head_contributions()[:, 2])):
        x = contributions.double() - contributions.double().mean(0)
        ref = torch.linalg.svd(x, full_matrices=False).Vh[0]
        top = x[x.norm(dim=1).argsort(descending=True)[:50]]
        ref = ref if (top @ ref > 0).sum() * 2 > len(top) else -ref
        got = text.unit_direction(spec64, unit, coefficients=s)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    # without data: the top singular vector of the neuron's pair directions
    U = nha.pair_directions(spec.detached())[:, 5]                       # (H, D)
    v = torch.linalg.svd(U, full_matrices=False).Vh[0]
    got = text.unit_direction(spec, "neuron:5")
    assert abs(float(got @ v)) == pytest.approx(1.0, abs=1e-5)
    assert float(got @ U.sum(0)) > 0


def test_subconcepts_orders_pairs_by_importance(spec):
    words = _random_dictionary(spec.output_dim)
    view = text.subconcepts(spec, 9, words, k=4, top=3)
    norms = nha.pair_directions(spec.detached())[:, 9].norm(dim=1)
    assert [p["unit"] for p in view["pairs"]] == [f"H{h}N9" for h in norms.argsort(descending=True)[:3].tolist()]
    assert view["neuron"]["unit"] == "neuron:9" and len(view["neuron"]["words"]) == 4


def test_all_pairs_json_parquet_and_resume(spec, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    words = _random_dictionary(spec.output_dim, N=200)
    outs = [tmp_path / "pairs.json", tmp_path / "pairs.parquet"]
    header = text.describe_all_pairs(spec, words, outs, k=4, heads_per_chunk=3, progress=False)
    H, C = spec.num_heads, spec.num_neurons
    assert header["num_pairs"] == H * C
    js = json.loads(outs[0].read_text())
    table = pq.read_table(outs[1]).to_pylist()
    assert len(js["pairs"]) == len(table) == H * C
    row = js["pairs"][5 * C + 17]
    assert row["pair"] == "H5N17" == table[5 * C + 17]["pair"]
    assert row["words"] == table[5 * C + 17]["words"]
    ref = text.describe(spec, "pair:H5N17", words, k=4)
    assert row["words"] == [w for w, _ in ref["words"]]
    # resume: all chunks exist, so nothing is recomputed and the outputs are the same
    monkeypatch.setattr(all_pairs, "sparse_decompose", lambda *a, **k: pytest.fail("recomputed a chunk"))
    before = outs[0].read_bytes()
    outs[0].unlink()
    text.describe_all_pairs(spec, words, outs, k=4, heads_per_chunk=3, progress=False)
    assert outs[0].read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_describe(tiny, tmp_path, monkeypatch, capsys):
    from nha_plugin.cli import describe as cli
    monkeypatch.setattr(nha.models, "load_clip", lambda *a, **k: (tiny, None, open_clip.get_tokenizer("RN50")))
    pool = tmp_path / "words.txt"
    pool.write_text("\n".join(text.common_words(300)))
    base = ["describe", "--model", "tiny", "--pool", str(pool), "--templates", "none", "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    assert cli.main(base + ["--unit", "pair:H3N17", "--unit", "head:2", "--k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["unit"] for r in out] == ["H3N17", "head:2"] and len(out[0]["words"]) == 5
    assert cli.main(base + ["--unit", "neuron:4", "--subconcepts", "--k", "3"]) == 0
    assert "neuron:4" in capsys.readouterr().out
    assert cli.main(base + ["--all", "--out", str(tmp_path / "all.json"), "--k", "3"]) == 0
    assert len(json.loads((tmp_path / "all.json").read_text())["pairs"]) == 8 * 512
    with pytest.raises(SystemExit):
        cli.main(base + ["--all"])


def test_head_text_span_picks_a_planted_text_direction(spec):
    """Coefficients that move head 1 only along one text's direction: TextSpan names that text first."""
    words = _random_dictionary(spec.output_dim, N=100)
    U = nha.pair_directions(spec.detached())[1]                           # (C, D)
    target = words.embeddings[42]
    coef_dir = torch.linalg.lstsq(U.T, target[:, None]).solution[:, 0]     # s_1 with s_1 @ U = target
    g = torch.Generator().manual_seed(0)
    s = torch.zeros(64, spec.num_heads, spec.num_neurons)
    s[:, 1] = torch.randn(64, 1, generator=g) * coef_dir
    res = text.head_text_span(spec, 1, s, words, m=3)
    assert res["texts"][0] == "w42"


def test_all_pairs_parts_from_other_weights_or_words_are_refused_and_fresh_recomputes(spec, tmp_path):
    words = _random_dictionary(spec.output_dim, N=100)
    out = [tmp_path / "p.json"]
    text.describe_all_pairs(spec, words, out, k=2, heads_per_chunk=8, progress=False)
    other = get_spec(make_tiny(torch.float32, seed=3))
    with pytest.raises(RunMismatchError, match=r"(?s)p\.json\.parts.*  weights: found .*--fresh"):
        text.describe_all_pairs(other, words, out, k=2, heads_per_chunk=8, progress=False)
    fewer = text.TextDictionary(texts=words.texts[:99], embeddings=words.embeddings[:99], atoms=words.atoms[:99])
    with pytest.raises(RunMismatchError, match=r"data\.num_texts: found 100, expected 99") as e:
        text.describe_all_pairs(spec, fewer, out, k=2, heads_per_chunk=8, progress=False)
    assert "data.texts: found" in str(e.value) and "data.atoms: found" in str(e.value)
    with pytest.raises(RunMismatchError, match=r"config\.k: found 2, expected 3"):
        text.describe_all_pairs(spec, words, out, k=3, heads_per_chunk=8, progress=False)
    text.describe_all_pairs(other, words, out, k=2, heads_per_chunk=8, progress=False, fresh=True)
    row = json.loads(out[0].read_text())["pairs"][3 * 512 + 17]
    assert row["words"] == [w for w, _ in text.describe(other, "pair:H3N17", words, k=2)["words"]]


def test_planted_pickles_in_the_parts_folder_are_never_unpickled(spec, tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(planted(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()                      # the payload works: the assertions below can fail
    words = _random_dictionary(spec.output_dim, N=50)
    out = [tmp_path / "p.json", tmp_path / "p.parquet"]
    pytest.importorskip("pyarrow")
    text.describe_all_pairs(spec, words, out, k=2, heads_per_chunk=4, progress=False)
    parts = tmp_path / "p.json.parts"
    read = sorted(p.name for p in parts.iterdir())
    assert read == ["heads_00000.part.safetensors", "heads_00004.part.safetensors", "run.json"]
    for name in read:
        good = (parts / name).read_bytes()
        for kind in ("pickle", "torch"):
            if kind == "pickle":
                (parts / name).write_bytes(pickle.dumps({"indices": planted(marker)}))
            else:
                torch.save({"indices": planted(marker)}, parts / name)
            with pytest.raises(CorruptFileError) as e:
                text.describe_all_pairs(spec, words, out, k=2, heads_per_chunk=4, progress=False)
            assert e.value.path == parts / name and str(parts / name) in str(e.value)
        (parts / name).write_bytes(good)
    # a valid state file of another shape under a part's name is refused too, naming the file
    from nha_plugin.files import save_state
    save_state(parts / read[1], {"indices": torch.zeros(3, 2, dtype=torch.int32)})
    with pytest.raises(CorruptFileError, match="a part of this run") as e:
        text.describe_all_pairs(spec, words, out, k=2, heads_per_chunk=4, progress=False)
    assert e.value.path == parts / read[1]
    assert not marker.exists()


def test_cli_describe_all_refuses_another_run_in_one_line_and_fresh_works(tiny, tmp_path, monkeypatch, capsys):
    from nha_plugin.cli import describe as cli
    monkeypatch.setattr(nha.models, "load_clip", lambda *a, **k: (tiny, None, open_clip.get_tokenizer("RN50")))
    pool = tmp_path / "words.txt"
    pool.write_text("\n".join(text.common_words(60)))
    base = ["describe", "--model", "tiny", "--pool", str(pool), "--templates", "none", "--cache-dir",
            str(tmp_path / "cache"), "--quiet", "--all", "--out", str(tmp_path / "all.json"), "--heads-per-chunk", "8"]
    assert cli.main(base + ["--k", "3"]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--k", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.k: found 3, expected 2" in err and "--fresh" in err
    assert cli.main(base + ["--k", "2", "--fresh"]) == 0
    assert len(json.loads((tmp_path / "all.json").read_text())["pairs"][0]["words"]) == 2
    (tmp_path / "all.json.parts" / "run.json").write_bytes(pickle.dumps(planted(tmp_path / "marker")))
    assert cli.main(base + ["--k", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "all.json.parts" / "run.json") in err
    assert not (tmp_path / "marker").exists()


def test_cli_stats_reads_safetensors_and_never_unpickles(tiny, spec, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from nha_plugin.cli import describe as cli
    monkeypatch.setattr(nha.models, "load_clip", lambda *a, **k: (tiny, None, open_clip.get_tokenizer("RN50")))
    pool = tmp_path / "words.txt"
    pool.write_text("\n".join(text.common_words(60)))
    base = ["describe", "--model", "tiny", "--pool", str(pool), "--templates", "none", "--cache-dir",
            str(tmp_path / "cache"), "--quiet", "--unit", "neuron:4", "--k", "3", "--json"]
    s = torch.randn(6, spec.num_heads, spec.num_neurons, generator=torch.Generator().manual_seed(0))
    save_file({"pair_coefficients": s}, str(tmp_path / "s.safetensors"))
    assert cli.main(base + ["--stats", str(tmp_path / "s.safetensors")]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["source"] == "data"
    assert got == json.loads(json.dumps(text.describe_units(spec, ["neuron:4"], _dictionary_of(tiny, pool), 3,
                                                            coefficients=s)[0]))
    torch.save({"pair_coefficients": planted(tmp_path / "marker")}, tmp_path / "s.pt")
    with pytest.raises(SystemExit, match="never unpickled") as e:
        cli.main(base + ["--stats", str(tmp_path / "s.pt")])
    assert str(tmp_path / "s.pt") in str(e.value) and not (tmp_path / "marker").exists()


def _dictionary_of(model, pool):
    return text.build_dictionary(model, open_clip.get_tokenizer("RN50"), f"file:{pool}", None, cache_dir=False,
                                 progress=False)
