"""nha_plugin.runs: atomic writes, pickle-free state files, run keys, resumable run folders, JSONL records."""
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import planted
from nha_plugin import files, runs
from nha_plugin.files import CorruptFileError
from nha_plugin.runs import RunDir, RunMismatchError


def assert_same(a, b, where="/"):
    """Exact equality of two trees: types, dtypes, shapes and bits (NaN == NaN, -0.0 != 0.0)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == \
            b.contiguous().reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert [type(k) for k in a] == [type(k) for k in b], where
        for k in a:
            assert_same(a[k], b[k], f"{where}{k!r}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}{i}/")
    elif isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b)), where
    else:
        assert a == b, where


def round_trip(tmp_path, tree, name="state.safetensors"):
    files.save_state(tmp_path / name, tree)
    return files.load_state(tmp_path / name)


# ---- state trees -------------------------------------------------------------------------------------------
def test_nested_tree_round_trips_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tree = {
        "floats": {"f32": torch.randn(3, 4, generator=g), "f64": torch.randn(2, dtype=torch.float64, generator=g),
                   "f16": torch.randn(5, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16()},
        "ints": [torch.arange(-3, 3), torch.tensor([2 ** 62, -2 ** 63]), torch.tensor(7, dtype=torch.int32),
                 torch.tensor([1, 255], dtype=torch.uint8)],
        "bool": torch.tensor([[True, False], [False, True]]), "empty": torch.empty(0, 3), "empty2": torch.empty(0),
        "numpy": {"u32": np.arange(5, dtype=np.uint32), "f16": np.ones((2, 2), np.float16), "b": np.array([True]),
                  "scalar": np.float32(1.5), "i64": np.int64(-4), "zero_d": np.array(3.25)},
        0: ("int key", 1, 2.5, None, True), "0": "str key", 1.5: "float key", None: "none key", True: "bool key",
        "py": [None, True, False, 0, -1, 10 ** 30, 0.1, -0.0, float("nan"), float("inf"), "ü\n\x00"],
        "tuples": ((), (1,), ([1, (2, 3)], {"x": (4,)})), "empty_dict": {}, "empty_list": [],
        "clash": {0: torch.ones(2), "0": torch.zeros(2)},     # the same tensor path twice
    }
    back = round_trip(tmp_path, tree)
    assert_same(tree, back)
    assert_same(files.load_state(tmp_path / "state.safetensors", device="cpu")["clash"], tree["clash"])
    assert_same(round_trip(tmp_path, torch.arange(3)), torch.arange(3))            # a bare tensor as the root


def test_adam_state_resumes_bit_for_bit(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), amsgrad=True)

    def step(model, opt, seed):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    model, opt = make()
    for s in range(2):
        step(model, opt, s)
    files.save_state(tmp_path / "ckpt.safetensors", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                    "step": 2})
    step(model, opt, 2)                                                 # the uninterrupted third step
    state = files.load_state(tmp_path / "ckpt.safetensors")
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    model2, opt2 = make()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    step(model2, opt2, 2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert_same(opt.state_dict()["state"], opt2.state_dict()["state"])


def test_rng_states_round_trip(tmp_path):
    gen = np.random.default_rng(123)
    tree = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "numpy_dict": np.random.get_state(False),
            "pcg": gen.bit_generator.state, "python": random.getstate()}
    expected = (torch.rand(3), np.random.rand(3), random.random(), gen.random(3))
    back = round_trip(tmp_path, tree)
    assert_same(tree, back)
    torch.set_rng_state(back["torch"])
    np.random.set_state(back["numpy"])
    random.setstate(back["python"])
    gen2 = np.random.default_rng()
    gen2.bit_generator.state = back["pcg"]
    got = (torch.rand(3), np.random.rand(3), random.random(), gen2.random(3))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and np.array_equal(expected[3], got[3])


def test_views_and_shared_storage(tmp_path):
    base = torch.arange(24.).reshape(4, 6)
    arr = np.arange(10.0)
    tree = {"base": base, "same": base, "t": base.T, "col": base[:, 2], "row": base[1], "step": base[::2, ::3],
            "arr": arr, "arr_view": arr[::2], "arr_same": arr, "ro": np.broadcast_to(np.arange(3), (2, 3))}
    before = base.clone()
    back = round_trip(tmp_path, tree)
    assert_same(tree, back)
    assert torch.equal(base, before)
    back["base"][0, 0] = -1                                # loaded tensors are independent copies
    assert back["same"][0, 0] == 0


def test_unsupported_values_name_their_place_and_write_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"a/1/b.*set"):
        files.save_state(tmp_path / "x.safetensors", {"a": [0, {"b": {1, 2}}]})
    with pytest.raises(TypeError, match="key of type tuple"):
        files.save_state(tmp_path / "x.safetensors", {(1, 2): 3})
    assert list(tmp_path.iterdir()) == []


def test_tensors_file_is_plain_safetensors_with_metadata(tmp_path):
    from safetensors.torch import load_file
    t = {"w": torch.randn(3, 3).T, "b": torch.zeros(3)}
    files.save_tensors(tmp_path / "w.safetensors", t, {"step": "4"})
    plain = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(plain["w"], t["w"]) and torch.equal(plain["b"], t["b"])
    back, meta = files.load_tensors(tmp_path / "w.safetensors")
    assert meta == {"step": "4"} and torch.equal(back["w"], t["w"])
    with pytest.raises(ValueError, match="reserved"):
        files.save_tensors(tmp_path / "v.safetensors", t, {"nha_sha256": "x"})


# ---- atomic writes -----------------------------------------------------------------------------------------
def _payload(k: int, i: int) -> bytes:
    return f"{k}:{i}:".encode().ljust(16, b"-") + bytes([(31 * k + i) % 251]) * 40_000 + b"END"


def _is_payload(data: bytes) -> bool:
    fields = data[:16].split(b":")
    return len(fields) == 3 and all(f.isdigit() for f in fields[:2]) and data == _payload(*map(int, fields[:2]))


def _writer(folder: str, k: int, n: int) -> None:
    failures = 0
    for i in range(n):
        try:
            if i % 2:
                files.write_bytes(Path(folder) / "same.bin", _payload(k, i))
            else:
                files.write_json(Path(folder) / f"w{k}_{i % 5}.json", {"k": k, "i": i, "pad": "x" * 5000})
        except Exception as e:  # noqa: BLE001 - counted, reported through the exit code
            print(f"writer {k}: {e!r}", file=sys.stderr)
            failures += 1
    sys.exit(min(failures, 100))


def test_concurrent_writers_never_collide(tmp_path):
    # fork: spawn would re-import torch in each child (seconds); the children only write files
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k, 200)) for k in range(4)]
    for p in procs:
        p.start()
    reads = 0
    deadline = time.time() + 60
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if (tmp_path / "same.bin").exists():
            assert _is_payload((tmp_path / "same.bin").read_bytes())   # readers never see a torn file
            reads += 1
        time.sleep(0.002)
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert reads > 0
    assert _is_payload((tmp_path / "same.bin").read_bytes())
    for k in range(4):
        for j in range(5):
            assert json.loads((tmp_path / f"w{k}_{j}.json").read_text())["k"] == k
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert len(list(tmp_path.iterdir())) == 1 + 4 * 5


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    files.write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "out.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with pytest.raises(Exception):                  # safetensors cannot store complex128: fails mid-write
        files.save_tensors(tmp_path / "deep" / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex128)})
    assert list((tmp_path / "deep").iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_writer_gives_umask_masked_0644(tmp_path, umask, mode):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    old = os.umask(umask)
    try:
        out = tmp_path / "sub" / "dir"
        files.write_bytes(out / "a.bin", b"x")
        files.write_text(out / "a.txt", "x")
        files.write_json(out / "a.json", {"x": float("nan"), "p": out})
        fig = plt.figure(figsize=(1, 1))
        files.save_figure(out / "a.png", fig, dpi=20)
        files.save_figure(out / "a.pdf", fig)
        plt.close(fig)
        files.save_tensors(out / "a.safetensors", {"x": torch.ones(2)})
        files.save_state(out / "b.safetensors", {"x": torch.ones(2)})
        with files.atomic_path(out / "a.raw") as tmp:
            tmp.write_bytes(b"raw")
        runs.append_records(out / "a.jsonl", [{"x": 1}])
        run = RunDir(out / "run", {"config": 1})
        run.save_part("p", {"x": 1})
    finally:
        os.umask(old)
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 11
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}
    assert (out / "a.png").read_bytes()[:4] == b"\x89PNG" and (out / "a.pdf").read_bytes()[:4] == b"%PDF"
    assert math.isnan(json.loads((out / "a.json").read_text())["x"])


# ---- corrupt inputs ----------------------------------------------------------------------------------------

def test_planted_pickles_are_never_unpickled(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(planted(probe))).close()
    assert probe.exists()                              # the payload works: the assertions below can fail
    marker = tmp_path / "marker"
    run = RunDir(tmp_path / "run", {"config": 1})
    for name, data in [("pickled", pickle.dumps({"state": planted(marker)})), ("torch_saved", None)]:
        path = run.path / f"{name}.part.safetensors"
        if data is None:
            torch.save({"state": planted(marker)}, path)
        else:
            path.write_bytes(data)
        for load in (files.load_state, files.load_tensors, lambda p: run.load_part(name)):
            with pytest.raises(CorruptFileError, match=r"pickle") as e:
                load(path)
            assert str(path) in str(e.value) and "--fresh" in str(e.value)
    assert not marker.exists()


def _corruptions(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    flipped = bytearray(raw)
    flipped[-3] ^= 0x55                                  # inside the last tensor's bytes
    header = bytearray(raw)
    header[8:12] = b"\xff\xfe{]"
    return {"empty": b"", "short": raw[:5], "truncated": raw[:-7], "header_cut": raw[:8 + n // 2],
            "flipped": bytes(flipped), "bad_header": bytes(header), "garbage": b"not a safetensors file" * 5}


def test_corrupt_state_files_raise_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    files.save_state(good, {"a": torch.arange(100.), "b": np.arange(50), "c": "text"})
    for name, data in _corruptions(good.read_bytes()).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CorruptFileError) as e:
            files.load_state(path)
        msg = str(e.value)
        assert str(path) in msg and "expected" in msg and "--fresh" in msg and "delete" in msg, name
        assert e.value.path == path
    assert "checksum" in str(pytest.raises(CorruptFileError, files.load_state, tmp_path / "flipped.safetensors").value)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        files.load_state(tmp_path / "missing.safetensors")


def test_foreign_or_other_version_state_files(tmp_path):
    files.save_tensors(tmp_path / "plain.safetensors", {"a": torch.ones(1)})
    with pytest.raises(CorruptFileError, match="no state tree"):
        files.load_state(tmp_path / "plain.safetensors")
    files.save_tensors(tmp_path / "v9.safetensors", {}, {"nha_state": json.dumps({"format": "nha-state",
                                                                                   "version": 9, "tree": 1})})
    with pytest.raises(CorruptFileError, match="version 9"):
        files.load_state(tmp_path / "v9.safetensors")
    files.save_tensors(tmp_path / "json.safetensors", {}, {"nha_state": "{not json"})
    with pytest.raises(CorruptFileError, match="json.safetensors"):
        files.load_state(tmp_path / "json.safetensors")
    files.save_tensors(tmp_path / "tree.safetensors", {}, {"nha_state": json.dumps({"format": "nha-state",
                                                                                     "version": 1,
                                                                                     "tree": {"t": "gone"}})})
    with pytest.raises(CorruptFileError, match="malformed"):
        files.load_state(tmp_path / "tree.safetensors")


def test_read_json_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": 1,')
    with pytest.raises(CorruptFileError, match=r"bad\.json.*not valid JSON"):
        files.read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorruptFileError, match=r"bin\.json"):
        files.read_json(tmp_path / "bin.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        files.read_json(tmp_path / "none.json")


# ---- run keys and run folders ------------------------------------------------------------------------------
def test_run_key_mismatch_lists_fields_and_mentions_fresh(tmp_path):
    w1, w2 = runs.tensor_fingerprint(torch.ones(3)), runs.tensor_fingerprint(torch.zeros(3))
    RunDir(tmp_path, runs.run_key({"lr": 0.1, "k": 5, "paths": Path("a")}, data={"seed": 0}, weights=w1))
    with pytest.raises(RunMismatchError) as e:
        RunDir(tmp_path, runs.run_key({"lr": 0.2, "k": 5, "paths": "a", "new": 1}, data={"seed": 0}, weights=w2))
    msg = str(e.value)
    assert str(tmp_path) in msg and "--fresh" in msg and "fresh=True" in msg and "another output folder" in msg
    assert "config.lr: found 0.1, expected 0.2" in msg
    assert "config.new: found <missing>, expected 1" in msg
    assert "weights: found" in msg and w1[:20] in msg and w2 not in msg        # long values are abbreviated
    fields = [line.split(":")[0].strip() for line in msg.splitlines() if line.startswith("  ")]
    assert fields == ["config.lr", "config.new", "weights"]


def test_check_key_normalises_like_json():
    runs.check_key({"a": [1, 2], "b": None}, {"a": (1, 2), "b": None}, "out")
    with pytest.raises(RunMismatchError, match=r"\(key\): found 1, expected 2"):
        runs.check_key(1, 2, "out")


def test_run_dir_resumes_restarts_and_spares_other_files(tmp_path):
    key = runs.run_key({"n": 4})
    run = RunDir(tmp_path, key)
    assert not run.resumed and files.read_json(tmp_path / "run.json")["key"] == key
    run.save_part("chunk_00000", {"x": torch.ones(2)})
    run.save_part("chunk_00001", {"x": torch.zeros(2)})
    runs.append_records(run.records("gradcam"), [{"index": 0}])
    for name in ("results.json", "notes.txt", "my.part.safetensors.bak", ".hidden"):
        (tmp_path / name).write_text("user")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.part.safetensors").write_text("user")
    (tmp_path / ".run.json.abc123.tmp").write_text("stale")

    again = RunDir(tmp_path, key)
    assert again.resumed and again.parts() == ["chunk_00000", "chunk_00001"]
    assert again.has_part("chunk_00001") and not again.has_part("chunk_00002")
    assert torch.equal(again.load_part("chunk_00001")["x"], torch.zeros(2))
    assert again.load_part("chunk_00002") is None

    other = runs.run_key({"n": 5})
    with pytest.raises(RunMismatchError, match="config.n: found 4, expected 5"):
        RunDir(tmp_path, other)
    fresh = RunDir(tmp_path, other, fresh=True)
    assert not fresh.resumed and fresh.parts() == [] and not run.records("gradcam").exists()
    assert files.read_json(tmp_path / "run.json")["key"] == other
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "my.part.safetensors.bak", "notes.txt",
                                                          "results.json", "run.json", "sub"]
    assert (tmp_path / "sub" / "x.part.safetensors").exists()
    with pytest.raises(ValueError, match="part names"):
        fresh.save_part("../x", {})


def test_run_dir_refuses_orphan_parts_and_corrupt_run_json(tmp_path):
    files.save_state(tmp_path / "a.part.safetensors", {"x": 1})
    with pytest.raises(RunMismatchError, match="no run.json"):
        RunDir(tmp_path, {"k": 1})
    (tmp_path / "run.json").write_text('{"format": "nha-run", "key": ')
    with pytest.raises(CorruptFileError, match="run.json"):
        RunDir(tmp_path, {"k": 1})
    (tmp_path / "run.json").write_text('[1, 2]')
    with pytest.raises(CorruptFileError, match="run.json"):
        RunDir(tmp_path, {"k": 1})
    assert RunDir(tmp_path, {"k": 1}, fresh=True).parts() == []


def test_corrupt_part_raises_or_is_recomputed(tmp_path):
    run = RunDir(tmp_path, {"k": 1})
    path = run.save_part("p", {"x": torch.arange(10)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"p\.part\.safetensors.*checksum"):
        run.load_part("p")
    assert path.exists()
    with pytest.warns(UserWarning, match="recomputed"):
        assert run.load_part("p", on_corrupt="recompute") is None
    assert not path.exists() and run.parts() == []


# ---- fingerprints ------------------------------------------------------------------------------------------
def test_fingerprints():
    w = torch.randn(4, 5)
    assert runs.tensor_fingerprint(w) == runs.tensor_fingerprint(w.double()) == runs.tensor_fingerprint(w.numpy())
    assert runs.tensor_fingerprint(w, exact=True) != runs.tensor_fingerprint(w.double(), exact=True)
    assert runs.tensor_fingerprint(w) != runs.tensor_fingerprint(w.T.contiguous())
    assert runs.tensor_fingerprint(w) != runs.tensor_fingerprint(w.reshape(5, 4))
    assert runs.tensor_fingerprint(torch.arange(3)) != runs.tensor_fingerprint(torch.arange(3, dtype=torch.int32))
    assert runs.tensor_fingerprint(torch.tensor([2 ** 40 + 1])) != runs.tensor_fingerprint(torch.tensor([2 ** 40]))
    assert runs.tensor_fingerprint(w, w) != runs.tensor_fingerprint(w)

    torch.manual_seed(0)
    m = torch.nn.BatchNorm1d(3)
    fp = runs.module_fingerprint(m)
    assert fp == runs.module_fingerprint(m.double()) and len(fp) == 64
    m.running_mean += 1                                           # buffers count
    assert runs.module_fingerprint(m) != fp
    outer = torch.nn.ModuleDict({"visual": torch.nn.Linear(2, 2), "text": torch.nn.Linear(2, 2)})
    text_only = runs.module_fingerprint(outer, exclude=("visual.",))
    outer["visual"].weight.data += 1
    assert runs.module_fingerprint(outer, exclude=("visual.",)) == text_only
    assert runs.module_fingerprint(outer) != runs.module_fingerprint(outer, exclude=("visual.",))
    swapped = torch.nn.ModuleDict({"text": outer["visual"], "visual": outer["text"]})
    assert runs.module_fingerprint(swapped) != runs.module_fingerprint(outer)       # names count

    assert runs.texts_fingerprint(["a", "b"]) != runs.texts_fingerprint(["b", "a"])
    assert runs.texts_fingerprint(["a\x00b"]) != runs.texts_fingerprint(["a", "b"])
    assert runs.texts_fingerprint(iter(["a"])) == runs.texts_fingerprint(("a",))

    imgs = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    assert runs.images_fingerprint(imgs) == runs.images_fingerprint(torch.from_numpy(imgs))
    assert runs.images_fingerprint(list(imgs)) == runs.images_fingerprint([torch.from_numpy(i) for i in imgs])
    assert runs.images_fingerprint(list(imgs)) != runs.images_fingerprint(imgs)
    changed = imgs.copy()
    changed[1, 0, 0, 0] ^= 1
    assert runs.images_fingerprint(changed) != runs.images_fingerprint(imgs)


# ---- records -----------------------------------------------------------------------------------------------
def test_records_append_and_read(tmp_path):
    path = tmp_path / "r" / "m.jsonl"
    assert runs.read_records(path) == []
    runs.append_records(path, [{"index": 0, "x": 0.5}, {"index": 1, "x": float("nan"), "s": "a\nb"}])
    runs.append_records(path, [{"index": 2, "v": np.float32(2.0)}])
    rows = runs.read_records(path)
    assert [r["index"] for r in rows] == [0, 1, 2] and rows[1]["s"] == "a\nb" and rows[2]["v"] == 2.0
    assert path.read_bytes().count(b"\n") == 3
    with pytest.raises(TypeError, match="dicts"):
        runs.append_records(path, [[1, 2]])


@pytest.mark.parametrize("tail", [b'{"index": 3, "x": 0.2', b'{"index": 3}', b"\x00\x00\x00", b'{"index": 3, "x":\n',
                                  b"\n", b'[1, 2]\n'])
def test_torn_last_line_is_dropped_with_a_warning(tmp_path, tail):
    path = tmp_path / "m.jsonl"
    runs.append_records(path, [{"index": i} for i in range(3)])
    with open(path, "ab") as f:
        f.write(tail)
    with pytest.warns(UserWarning, match=r"m\.jsonl.*last line 4"):
        assert [r["index"] for r in runs.read_records(path)] == [0, 1, 2]
    with pytest.warns(UserWarning, match="torn or unparseable last line"):
        runs.append_records(path, [{"index": 3}])                   # cut first, so it cannot glue onto it
    assert [r["index"] for r in runs.read_records(path)] == [0, 1, 2, 3]


def test_long_torn_line_is_cut_whole(tmp_path):
    path = tmp_path / "m.jsonl"
    runs.append_records(path, [{"index": 0}])
    with open(path, "ab") as f:
        f.write(b'{"index": 1, "pad": "' + b"x" * 50_000)
    with pytest.warns(UserWarning):
        runs.append_records(path, [{"index": 1}])
    assert [r["index"] for r in runs.read_records(path)] == [0, 1]
    only_torn = tmp_path / "t.jsonl"
    only_torn.write_bytes(b'{"ind')
    with pytest.warns(UserWarning):
        runs.append_records(only_torn, [{"index": 0}])
    assert only_torn.read_bytes() == b'{"index": 0}\n'


def test_corrupt_middle_line_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"ind\n{"index": 3}\n')
    with pytest.raises(CorruptFileError, match=r"m\.jsonl: line 3 is not a JSON object.*--fresh"):
        runs.read_records(path)
    path.write_bytes(b'{"index": 0}\n[1]\n{"index": 2}\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        runs.read_records(path)
