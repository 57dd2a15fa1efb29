"""nha_plugin.stats: streaming statistics checked against numpy, brute-force sorts, SVDs of dense
contributions, the paper's PC0 recipe, an interrupted-and-resumed run and a 2-process gloo run; checkpoints
and statistics files that are corrupted, planted or of another run are refused with the file named."""
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import (assert_refused, assert_topk_selection, assert_user_error, images_for, planted,
                      randomise_pool_biases, rerandomise_batchnorm, run_processes, scaled_tol)
from torch.utils.data import TensorDataset

import nha_plugin as nha
from nha_plugin.files import CorruptFileError, load_tensors, save_tensors
from nha_plugin.runs import RunMismatchError
from nha_plugin.stats import DatasetStats, StatsMismatchError, collect, spec_fingerprint

# C=256 neurons, H=8 heads, D=32, 64 px (2x2 grid): small enough for dense references over the dataset
SMALL_CFG = dict(embed_dim=32, vision_cfg=dict(layers=[1, 1, 1, 1], width=8, head_width=32, image_size=64),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
N_IMAGES = 70


def make_small(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**SMALL_CFG)
    return randomise_pool_biases(rerandomise_batchnorm(model, seed), seed + 1).eval().double()


def batches_of(x, size=16):
    return [x[i:i + size] for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def small():
    return make_small()


@pytest.fixture(scope="module")
def data(small):
    x = images_for(64, batch=N_IMAGES, seed=3)
    contrib = nha.decompose(small, x)
    return x, contrib


@pytest.fixture(scope="module")
def stats(small, data):
    return collect(small, batches_of(data[0]), k=50, progress=False)


def test_moments_match_numpy(small, data, stats):
    x, contrib = data
    s = contrib.pair_coefficients.numpy()                               # (N, H, C)
    assert stats.count == N_IMAGES
    np.testing.assert_allclose(stats.pair_mean.numpy(), s.mean(0), rtol=0, atol=1e-12 * np.abs(s).max())
    np.testing.assert_allclose(stats.pair_var.numpy(), s.var(0), rtol=1e-9, atol=1e-14 * s.var(0).max())
    cov = np.stack([np.cov(s[:, :, n].T, bias=True) for n in range(s.shape[2])])
    np.testing.assert_allclose(stats.neuron_covariance.numpy(), cov, rtol=0, atol=1e-10 * np.abs(cov).max())
    heads = contrib.head_contributions().numpy()                        # (N, H, D), decomposition's own path
    hcov = np.stack([np.cov(heads[:, h].T, bias=True) for h in range(heads.shape[1])])
    np.testing.assert_allclose(stats.head_covariance.numpy(), hcov, rtol=0, atol=1e-10 * np.abs(hcov).max())
    np.testing.assert_allclose(stats.head_importance.numpy() ** 2, np.trace(hcov, axis1=1, axis2=2), rtol=1e-9)
    np.testing.assert_allclose(stats.head_mean.numpy(), heads.mean(0), rtol=0, atol=1e-10 * np.abs(heads).max())
    u = nha.pair_directions(nha.adapters.get_spec(small).detached())
    torch.testing.assert_close(stats.direction_norms, u.norm(dim=-1), rtol=1e-12, atol=0)
    y = small.encode_image(x).detach().numpy()                          # the model's own forward
    np.testing.assert_allclose(stats.mean_embedding.numpy(), y.mean(0), rtol=0, atol=1e-10 * np.abs(y).max())


@pytest.mark.parametrize("k", [5, 50])
def test_top_deviations_match_bruteforce(small, data, k):
    """k=5: the max and min lists are disjoint; k=50 of 70 images: they overlap and are deduplicated."""
    s = data[1].pair_coefficients
    st = collect(small, batches_of(data[0], 16), k=k, progress=False)
    # s comes from one batch of 70 and the statistics from batches of 16: equal up to rounding, so the
    # selections are compared by the values they pick (swaps among near-ties allowed)
    dev = (s - s.mean(0)).abs().permute(1, 2, 0)                        # (H, C, N)
    top = st.top_deviations()
    assert top.indices.shape == (*dev.shape[:2], k)
    assert_topk_selection(dev, top.indices)
    tol = scaled_tol(s)
    torch.testing.assert_close(top.deviations, dev.gather(-1, top.indices), rtol=0, atol=tol)
    torch.testing.assert_close(top.coefficients, s.permute(1, 2, 0).gather(-1, top.indices), rtol=0, atol=tol)
    srt = s.permute(1, 2, 0).sort(dim=-1, descending=True).values
    torch.testing.assert_close(st.top_max_values, srt[..., :k], rtol=0, atol=tol)
    torch.testing.assert_close(st.top_min_values, srt.flip(-1)[..., :k], rtol=0, atol=tol)
    assert_topk_selection(s.permute(1, 2, 0), st.top_max_indices)
    assert_topk_selection(s.permute(1, 2, 0), st.top_min_indices, largest=False)


def test_neuron_pcs_match_svd_of_dense_contributions(data, stats):
    nc = data[1].neuron_contributions().numpy()                         # (N, C, D) dense reference
    centred = nc - nc.mean(0)
    pcs = stats.neuron_pcs(3)
    np.testing.assert_allclose(pcs.mean.numpy(), nc.mean(0), rtol=0, atol=1e-10 * np.abs(nc).max())
    for n in range(0, nc.shape[1], 17):
        _, sv, vt = np.linalg.svd(centred[:, n], full_matrices=False)
        var = sv ** 2 / nc.shape[0]
        np.testing.assert_allclose(pcs.variances[n].numpy(), var[:3], rtol=1e-8, atol=1e-12 * var[0])
        np.testing.assert_allclose(pcs.total_variance[n].item(), var.sum(), rtol=1e-8)
        for j in range(3):
            if (var[j] - var[j + 1]) > 1e-6 * var[0]:                 # well-separated: direction unique up to sign
                got = pcs.components[n, j].numpy()
                assert abs(abs(got @ vt[j]) - 1) < 1e-8
                assert got @ pcs.mean[n].numpy() >= 0                   # documented sign convention


def test_pc0_sign_and_importance_follow_the_paper_recipe(small, data, stats):
    """Centre dense pair contributions, top-50 by norm, first right singular vector, flip unless more than
    25 project positively; importance = mean of the 50 largest centred norms."""
    contrib = data[1]
    dense = contrib.pair_contributions().permute(1, 2, 0, 3).reshape(-1, N_IMAGES, 32)   # (H*C, N, D)
    sign, importance = stats.pc0_sign.reshape(-1), stats.importance.reshape(-1)
    u = nha.pair_directions(nha.adapters.get_spec(small)).reshape(-1, 32)
    checked = 0
    for p in range(0, dense.shape[0], 7):
        xc = dense[p] - dense[p].mean(0)
        norms = xc.norm(dim=1)
        top = xc[norms.argsort(descending=True)[:50]]
        v = torch.linalg.svd(top, full_matrices=False).Vh[0]
        if (top @ v > 0).sum() <= 25:
            v = -v
        torch.testing.assert_close(importance[p], norms.sort(descending=True).values[:50].mean(), rtol=1e-10, atol=0)
        if int((top @ v > 0).sum()) == 25:                              # a tie: the paper's sign is arbitrary
            continue
        torch.testing.assert_close(v, sign[p] * u[p] / u[p].norm(), rtol=0, atol=1e-8)
        checked += 1
    assert checked > 150
    assert 0 < int((sign == -1).sum()) < sign.numel()                 # both signs occur: the check bites


def test_save_load_roundtrip_and_wrong_model(tmp_path, small, stats):
    path = stats.save(tmp_path / "stats.safetensors", dataset="random images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]    # no temporary file left
    back = DatasetStats.load(path, model=small)
    assert back.count == stats.count and back.meta["dataset"] == "random images"
    for name, t in stats.state_tensors().items():
        assert torch.equal(getattr(back, name), t), name
    assert torch.equal(back.pc0_sign, stats.pc0_sign)
    # exact: the state tensors are bit-identical (checked above), so this is the same call on the same inputs
    torch.testing.assert_close(back.neuron_pcs(2).components, stats.neuron_pcs(2).components, rtol=0, atol=0)
    with pytest.raises(StatsMismatchError, match="another model"):
        DatasetStats.load(path, model=make_small(seed=5))
    with pytest.raises(RuntimeError, match="model=model"):
        DatasetStats.load(path).neuron_pcs(1)
    with pytest.raises(FileNotFoundError, match="nha stats"):
        DatasetStats.load(tmp_path / "missing.safetensors")


def test_merge_of_halves_equals_whole(small, data, stats):
    x = data[0]
    a = collect(small, batches_of(x[:30]), k=50, progress=False)
    b = collect(small, [batch for batch in batches_of(x[30:])], k=50, progress=False)
    # the second half's indices restart at 0 in its own stream: merging as they are would mix samples up
    with pytest.raises(ValueError, match="index_offset=30"):
        a.merge(b)
    a.merge(b, index_offset=a.count)
    assert a.count == stats.count
    _assert_same_stats(a, stats, data[1].pair_coefficients)


class _Failing:
    """A deterministic loader that raises after ``fail_after`` batches (a crash mid-run)."""

    def __init__(self, batches, fail_after=None):
        self.batches, self.fail_after = batches, fail_after

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("simulated crash")
            yield b


def _assert_same_stats(a: DatasetStats, b: DatasetStats, s: torch.Tensor) -> None:
    """The same statistics up to rounding: equal counts; moments within a tolerance scaled to their magnitude;
    top-k lists with the same values, each index pointing at a sample whose coefficient ``s`` (N, H, C) is
    that value (so indices may differ only among near-tied samples). Runs over other batch splits, another
    process or another thread count round differently, so bitwise equality is not a property."""
    assert a.count == b.count
    ref = s.permute(1, 2, 0)                                             # (H, C, N)
    tol = scaled_tol(s, 1e-11)
    for name, t in a.state_tensors().items():
        got = getattr(b, name)
        if name.endswith("_indices"):
            for stat in (a, b):
                idx = getattr(stat, name)
                valid = idx >= 0
                vals = getattr(stat, name.replace("_indices", "_values"))
                picked = ref.gather(-1, idx.clamp(min=0))
                torch.testing.assert_close(picked[valid], vals[valid], rtol=0, atol=tol, msg=name)
            assert torch.equal(t >= 0, got >= 0), name
        else:
            torch.testing.assert_close(got, t, rtol=1e-10, atol=scaled_tol(t, 1e-12), msg=name)


def test_resume_after_crash_is_identical(tmp_path, small, data):
    x = data[0]
    batches = batches_of(x, 8)                                           # 9 batches
    full = collect(small, batches, k=10, progress=False)
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect(small, _Failing(batches, fail_after=3), k=10, checkpoint=ckpt, checkpoint_every=2, progress=False)
    partial = DatasetStats.load(ckpt)
    assert partial.count == 16 and partial.meta["state"]["batches"] == 2   # checkpoint after batch 2, crash at 3
    resumed = collect(small, batches, k=10, checkpoint=ckpt, checkpoint_every=2, resume=True, progress=False)
    _assert_same_stats(full, resumed, data[1].pair_coefficients)
    # a finished checkpoint resumes without touching the loader
    again = collect(small, _Failing(batches, fail_after=0), k=10, checkpoint=ckpt, resume=True, progress=False)
    _assert_same_stats(full, again, data[1].pair_coefficients)
    # dataset mode
    ds = TensorDataset(x)
    full_ds = collect(small, ds, batch_size=8, k=10, progress=False)
    _assert_same_stats(full, full_ds, data[1].pair_coefficients)

    class Crashing(TensorDataset):
        def __getitem__(self, i):
            if i >= 40:
                raise RuntimeError("simulated crash")
            return super().__getitem__(i)

    ckpt2 = tmp_path / "ckpt2.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect(small, Crashing(x), batch_size=8, k=10, checkpoint=ckpt2, checkpoint_every=3, progress=False)
    assert DatasetStats.load(ckpt2).count == 24
    resumed_ds = collect(small, ds, batch_size=8, k=10, checkpoint=ckpt2, resume=True, progress=False)
    _assert_same_stats(full, resumed_ds, data[1].pair_coefficients)
    with pytest.raises(StatsMismatchError, match="another run") as err:
        collect(small, ds, batch_size=16, k=10, checkpoint=ckpt2, resume=True, progress=False)
    assert "config.batch_size: found 8, expected 16" in str(err.value) and str(ckpt2) in str(err.value)
    with pytest.raises(StatsMismatchError, match="config.k: found 10, expected 5"):
        collect(small, ds, batch_size=8, k=5, checkpoint=ckpt2, resume=True, progress=False)
    with pytest.raises(StatsMismatchError, match="config.head_covariance: found true, expected false"):
        collect(small, ds, batch_size=8, k=10, head_covariance=False, checkpoint=ckpt2, resume=True, progress=False)


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = make_small()
        x = images_for(64, batch=N_IMAGES, seed=3)
        by_index = collect(model, TensorDataset(x), batch_size=8, k=10, progress=False)
        by_stream = collect(model, batches_of(x, 8), k=10, progress=False)
        if rank == 0:
            by_index.save(Path(out_dir) / "index.safetensors")
            by_stream.save(Path(out_dir) / "stream.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path, small, data):
    run_processes(_gloo_worker, (2, str(tmp_path / "init"), str(tmp_path)), timeout=240)
    one = collect(small, batches_of(data[0], 8), k=10, progress=False)
    for name in ("index", "stream"):
        two = DatasetStats.load(tmp_path / f"{name}.safetensors")
        assert two.count == one.count == N_IMAGES
        _assert_same_stats(one, two, data[1].pair_coefficients)


def test_input_errors(small, data):
    with pytest.raises(ValueError, match="no images"):
        collect(small, [], progress=False)
    with pytest.raises(TypeError, match="map-style Dataset"):
        collect(small, iter([data[0]]), batch_size=4, progress=False)
    with pytest.raises(TypeError, match="preprocess"):
        collect(small, [["not an image"]], progress=False)
    st = DatasetStats.empty(nha.adapters.get_spec(small), k=3)
    with pytest.raises(ValueError, match=r"\(B, 8, 256\)"):
        st.update(torch.zeros(2, 8, 5), torch.arange(2))


def test_cli_stats_on_a_folder(tmp_path, capsys):
    from PIL import Image

    from nha_plugin.cli import stats as stats_cli
    from nha_plugin.scenes import SceneDataset
    folder = tmp_path / "imgs"
    folder.mkdir()
    scenes = SceneDataset(5, seed=7300)
    for i, sc in enumerate(scenes):
        Image.fromarray(sc.image).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder.safetensors"
    assert stats_cli.main(["stats", "--images", str(folder), "--out", str(out), "--batch-size", "2", "--quiet"]) == 0
    model, preprocess, _ = nha.load_clip("scenes-rn")
    st = DatasetStats.load(out, model=model)
    x = torch.stack([preprocess(Image.open(folder / f"{i:02d}.png").convert("RGB")) for i in range(5)])
    s = nha.decompose(model, x).pair_coefficients.double()
    assert st.count == 5
    torch.testing.assert_close(st.pair_mean, s.mean(0), rtol=0, atol=1e-6)
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, "no image files", stats_cli.main,
                       ["stats", "--images", str(tmp_path / "empty"), "--out", str(out), "--quiet"])


def test_resume_refuses_a_checkpoint_written_for_other_data(small, data, tmp_path):
    x = data[0]
    ckpt = tmp_path / "s.partial.safetensors"
    with pytest.raises(RuntimeError):
        collect(small, _Failing(batches_of(x[:30], 8), fail_after=2), k=5, checkpoint=ckpt, checkpoint_every=1,
                progress=False, meta={"data": "scenes seed 1"})
    with pytest.raises(StatsMismatchError, match="data description") as err:
        collect(small, batches_of(x[30:60], 8), k=5, checkpoint=ckpt, resume=True, progress=False,
                meta={"data": "scenes seed 2"})
    assert 'data.description: found "scenes seed 1", expected "scenes seed 2"' in str(err.value)
    assert isinstance(err.value, RunMismatchError)                      # what the CLI dispatchers catch


def test_resume_refuses_another_trunk_under_the_same_pool(small, data, tmp_path):
    """The pool's fingerprint cannot see the trunk, which the coefficients depend on: the run key holds the
    image tower's too."""
    x = data[0]
    ckpt = tmp_path / "trunk.safetensors"
    with pytest.raises(RuntimeError):
        collect(small, _Failing(batches_of(x, 8), fail_after=2), k=5, checkpoint=ckpt, checkpoint_every=1,
                progress=False)
    other = make_small()
    with torch.no_grad():
        other.visual.conv1.weight.mul_(1.01)
    assert spec_fingerprint(nha.adapters.get_spec(other)) == spec_fingerprint(nha.adapters.get_spec(small))
    with pytest.raises(StatsMismatchError, match="image_tower: found"):
        collect(other, batches_of(x, 8), k=5, checkpoint=ckpt, resume=True, progress=False)


def test_spec_fingerprint_identifies_pool_weights_and_heads(small):
    spec = nha.adapters.get_spec(small)
    fp = spec_fingerprint(spec)
    assert len(fp) == 64 and fp == spec_fingerprint(nha.adapters.get_spec(make_small().float()))   # fp32 copy
    assert spec_fingerprint(dataclasses.replace(spec, num_heads=4)) != fp     # same weights, other pairs
    assert spec_fingerprint(nha.adapters.get_spec(make_small(seed=5))) != fp
    bumped = dataclasses.replace(spec, c_bias=spec.c_bias.detach().clone())
    bumped.c_bias[0] += 1e-3
    assert spec_fingerprint(bumped) != fp


def _flip_data_byte(path: Path) -> None:
    """Flip one byte of the tensor data (after the safetensors header), leaving the header readable."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_checkpoint_is_refused_naming_the_file(small, data, tmp_path):
    x = data[0]
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect(small, _Failing(batches_of(x, 8), fail_after=3), k=5, checkpoint=ckpt, checkpoint_every=1,
                progress=False)
    assert DatasetStats.load(ckpt).count == 24                          # intact: loads
    _flip_data_byte(ckpt)
    with pytest.raises(CorruptFileError, match="checksum") as err:
        collect(small, batches_of(x, 8), k=5, checkpoint=ckpt, resume=True, progress=False)
    assert err.value.path == ckpt and str(ckpt) in str(err.value)
    ckpt.write_bytes(ckpt.read_bytes()[:100])                           # truncated
    with pytest.raises(CorruptFileError, match="truncated"):
        DatasetStats.load(ckpt)
    # resume=False starts over and replaces it
    st = collect(small, batches_of(x, 8), k=5, checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert DatasetStats.load(ckpt).count == st.count == N_IMAGES


def test_files_of_another_format_or_kind_are_refused(tmp_path, stats):
    path = stats.save(tmp_path / "s.safetensors")
    tensors, header = load_tensors(path)
    meta = json.loads(header["nha_stats"])
    meta["format_version"] = 1
    save_tensors(tmp_path / "old.safetensors", tensors, {"nha_stats": json.dumps(meta)})
    with pytest.raises(StatsMismatchError, match="format 1; this version of nha_plugin reads format 2"):
        DatasetStats.load(tmp_path / "old.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(3)})
    with pytest.raises(CorruptFileError, match="no statistics metadata"):
        DatasetStats.load(tmp_path / "other.safetensors")
    del meta["format_version"], tensors["head_sq"]
    save_tensors(tmp_path / "part.safetensors", tensors, {"nha_stats": json.dumps(dict(meta, format_version=2))})
    with pytest.raises(CorruptFileError, match="no tensor 'head_sq'"):
        DatasetStats.load(tmp_path / "part.safetensors")




@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_cli_never_unpickles_planted_files(tmp_path, capsys, protocol):
    from nha_plugin.cli import main as nha_main
    from nha_plugin.cli import stats as stats_cli
    marker = tmp_path / "pwned"
    evil = pickle.dumps(planted(marker), protocol=protocol)
    out = tmp_path / "stats.safetensors"
    partial = tmp_path / "stats.safetensors.partial"                 # the checkpoint `nha stats` resumes
    partial.write_bytes(evil)
    argv = ["stats", "--n", "2", "--batch-size", "2", "--out", str(out), "--quiet"]
    for main in (stats_cli.main, nha_main):                       # standalone and through the `nha` dispatcher
        err = assert_refused(capsys, str(partial), main, argv)
        assert "not safetensors" in err and "--fresh" in err
    stats_file = tmp_path / "planted.safetensors"                     # the file `nha sparsity` reads
    stats_file.write_bytes(evil)
    assert_refused(capsys, str(stats_file), stats_cli.main,
                   ["sparsity", "--stats", str(stats_file), "--n", "2", "--text-k=", "--out",
                   str(tmp_path / "sp"), "--quiet"])
    assert not marker.exists() and not out.exists()
    pickle.loads(evil)                                                 # the planted file does bite when unpickled
    assert marker.exists()


def test_cli_resumes_a_killed_run_and_fresh_starts_over(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from nha_plugin.cli import stats as stats_cli
    from nha_plugin.scenes import SceneDataset
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, sc in enumerate(SceneDataset(5, seed=7301)):
        Image.fromarray(sc.image).save(folder / f"{i:02d}.png")
    out, partial = tmp_path / "s.safetensors", tmp_path / "s.safetensors.partial"
    argv = ["stats", "--images", str(folder), "--out", str(out), "--batch-size", "2", "--checkpoint-every", "1",
            "--k", "3", "--quiet"]
    read = []
    original = stats_cli.FolderImages.__getitem__

    def crash_at_3(self, i):
        if i == 3:
            raise RuntimeError("simulated kill")
        return original(self, i)

    def recording(self, i):
        read.append(i)
        return original(self, i)

    monkeypatch.setattr(stats_cli.FolderImages, "__getitem__", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        stats_cli.main(argv)
    assert DatasetStats.load(partial).count == 2                       # batch (0, 1) checkpointed
    monkeypatch.setattr(stats_cli.FolderImages, "__getitem__", recording)
    # other settings: refused, naming the checkpoint and the difference
    err = assert_refused(capsys, str(partial), stats_cli.main, argv[:-3] + ["--k", "4", "--quiet"])
    assert "config.k: found 3, expected 4" in err and read == []
    assert stats_cli.main(argv) == 0
    assert sorted(read) == [2, 3, 4] and not partial.exists()          # only what the checkpoint lacked
    model, preprocess, _ = nha.load_clip("scenes-rn")
    x = torch.stack([preprocess(Image.open(folder / f"{i:02d}.png").convert("RGB")) for i in range(5)])
    s = nha.decompose(model, x).pair_coefficients.double()
    resumed = DatasetStats.load(out, model=model)
    assert resumed.count == 5 and resumed.k == 3
    torch.testing.assert_close(resumed.pair_mean, s.mean(0), rtol=0, atol=scaled_tol(s, 1e-6))
    # --fresh discards a checkpoint of other settings and recomputes everything
    monkeypatch.setattr(stats_cli.FolderImages, "__getitem__", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        stats_cli.main(argv[:-3] + ["--k", "2", "--quiet"])
    monkeypatch.setattr(stats_cli.FolderImages, "__getitem__", recording)
    read.clear()
    assert stats_cli.main(argv + ["--fresh"]) == 0
    assert sorted(read) == [0, 1, 2, 3, 4] and not partial.exists()
    fresh = DatasetStats.load(out, model=model)
    assert fresh.count == 5 and fresh.k == 3
    torch.testing.assert_close(fresh.pair_mean, resumed.pair_mean, rtol=0, atol=scaled_tol(s, 1e-6))
    assert_user_error(capsys, "contradict", stats_cli.main, argv + ["--fresh", "--resume"])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixels_are_refused_before_any_cast(small, dtype):
    from nha_plugin.images import check_pixels
    raw = (images_for(small, batch=2).clamp(-1, 1) * 100 + 127).to(dtype)     # raw pixel values, 0..255
    with pytest.raises(TypeError, match="expected float pixels") as info:
        collect(small, [raw], k=2, progress=False)
    assert str(dtype) in str(info.value)
    with pytest.raises(TypeError, match="expected float pixels"):                 # the same check, on its own
        check_pixels(raw)
    # the same pixels as floats are accepted: the refusal is about the dtype, not the values
    assert collect(small, [raw.to(torch.float64)], k=2, progress=False).count == 2
