"""`describe --all` sharded over torchrun ranks: 2 gloo processes write the same pairs file as one process, each
rank computing only its own chunks (round-robin), rank 0 merging."""
import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny, run_processes
from nha_plugin import text
from nha_plugin.adapters import get_spec
from nha_plugin.text import all_pairs

HEADS_PER_CHUNK = 3


def _setup():
    spec = get_spec(make_tiny(torch.float32, seed=4))
    g = torch.Generator().manual_seed(1)
    atoms = F.normalize(torch.randn(150, spec.output_dim, generator=g), dim=1)
    return spec, text.TextDictionary(texts=[f"w{i}" for i in range(150)], embeddings=atoms, atoms=atoms)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        spec, words = _setup()
        computed = []
        real = all_pairs.sparse_decompose

        def counting(u, *a, **k):                      # which heads this rank computed
            computed.append(u.shape[0])
            return real(u, *a, **k)
        all_pairs.sparse_decompose = counting
        text.describe_all_pairs(spec, words, [Path(out)], k=4, heads_per_chunk=HEADS_PER_CHUNK, progress=False)
        Path(out).with_name(f"rank{rank}.json").write_text(json.dumps(computed))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_what_one_process_writes(tmp_path):
    sharded = tmp_path / "sharded" / "pairs.json"
    sharded.parent.mkdir()
    run_processes(_worker, (2, str(tmp_path / "init"), str(sharded)), timeout=240)
    spec, words = _setup()
    single = tmp_path / "single" / "pairs.json"
    single.parent.mkdir()
    text.describe_all_pairs(spec, words, [single], k=4, heads_per_chunk=HEADS_PER_CHUNK, progress=False)
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert {k: v for k, v in one.items() if k != "pairs"} == {k: v for k, v in two.items() if k != "pairs"}
    assert len(one["pairs"]) == len(two["pairs"]) == spec.num_heads * spec.num_neurons
    for a, b in zip(one["pairs"], two["pairs"]):
        assert (a["pair"], a["words"]) == (b["pair"], b["words"])
        assert a["coefficients"] == pytest.approx(b["coefficients"], rel=1e-5, abs=1e-6)
    # the chunks were dealt round-robin: rank r computed chunks r, r + 2, ... and nothing twice
    chunks = -(-spec.num_heads // HEADS_PER_CHUNK)
    rows = [json.loads((sharded.parent / f"rank{r}.json").read_text()) for r in range(2)]
    sizes = [min(HEADS_PER_CHUNK, spec.num_heads - c * HEADS_PER_CHUNK) * spec.num_neurons for c in range(chunks)]
    assert [sum(r) for r in rows] == [sum(sizes[0::2]), sum(sizes[1::2])]
