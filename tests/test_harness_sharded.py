"""`nha benchmark` sharded over torchrun ranks: 2 gloo processes score disjoint batches into one run folder and
rank 0 writes the results a single process writes."""
import datetime
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny, run_processes
from nha_plugin.harness.data import BenchItem
from nha_plugin.harness.runner import BenchmarkConfig, run_benchmark
from nha_plugin.readout import LinearReadout
from nha_plugin.runs import read_records

CLASSES = ["a", "b", "c"]
METHODS = ("nad_spatial", "saliency", "centre")


def _setup(out):
    model = make_tiny(torch.float32, seed=2)
    head = LinearReadout(model, F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), dim=0),
                         logit_scale=100.0)
    rng = np.random.default_rng(0)
    items = []
    for i in range(5):
        mask = np.zeros((128, 128), bool)
        mask[10 * i:10 * i + 40, 20:70] = True
        items.append(BenchItem(i, rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), mask, CLASSES[i % 3]))
    cfg = BenchmarkConfig(methods=METHODS, metrics=("pointing_game", "mass_in_mask", "completeness_error"), n=5,
                          batch_size=1, n_grid=1, out=str(out), quiet=True)
    return cfg, head, items


def _worker(rank, world, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        cfg, head, items = _setup(out)
        res = run_benchmark(cfg, forward=head, items=items, classes=CLASSES)
        assert (res == {}) == (rank != 0)
    finally:
        dist.destroy_process_group()


def _rows(out, method):
    rows = sorted(read_records(out / f"{method}.records.jsonl"), key=lambda r: r["index"])
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]


def test_two_gloo_ranks_give_the_single_process_results(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    run_processes(_worker, (2, str(tmp_path / "init"), str(sharded)), timeout=300)
    cfg, head, items = _setup(single)
    run_benchmark(cfg, forward=head, items=items, classes=CLASSES)
    for method in METHODS:
        one, two = _rows(single, method), _rows(sharded, method)
        assert [r["index"] for r in two] == list(range(5))                  # every image once, none twice
        for a, b in zip(one, two):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (method, key)
    r1, r2 = (json.loads((d / "results.json").read_text())["methods"] for d in (single, sharded))
    assert r1.keys() == r2.keys()
    for method in r1:
        assert r2[method]["pointing_game"]["mean"] == pytest.approx(r1[method]["pointing_game"]["mean"], abs=1e-12)
