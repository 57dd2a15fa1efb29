"""The benchmark scripts run (tiny model smoke run); their figures live in benchmarks/results/."""
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_decomposition_speed_quick(capsys):
    bench = load_benchmark("decomposition_speed")
    assert bench.main(["--quick", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "decomposition" in out
    row = bench.bench_model("tiny", "cpu", bench.DTYPES["fp32"], batch=2, dense_batch=1, repeats=1)
    assert row["bytes_per_image_decomposition"] == 8 * 512 * 4
    assert row["bytes_per_image_dense"] == 8 * 512 * 64 * 4


def test_vit_decomposition_speed_quick(capsys):
    bench = load_benchmark("vit_decomposition_speed")
    assert bench.main(["--quick", "--repeats", "1", "--device", "cpu"]) == 0
    assert "tiny" in capsys.readouterr().out
    import statistics
    row = bench.bench_model("tiny", "cpu", torch.float64, batch=2, repeats=3)
    t = row["seconds"]
    assert row["decomposition_img_s"] == pytest.approx(2 / statistics.median(t["decomposition"]["runs"]), rel=1e-12)
    per_round = [f / d for f, d in zip(t["forward"]["runs"], t["decomposition"]["runs"])]
    assert row["decomposition_ratio"] == pytest.approx(statistics.median(per_round), rel=1e-12)
    assert row["max_completeness_error"] < 1e-10                  # the timed decomposition is the exact one
    L, H, N, D = row["L"], row["H"], row["N"], row["D"]
    assert row["bytes_per_image_dense"] == L * H * N * D * 8


def test_stats_throughput_quick(tmp_path):
    # a subprocess: the script spawns worker processes, which must import it by its file path
    import subprocess
    import sys
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stats_throughput.py"), "--quick",
                          "--out", str(tmp_path / "st")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    import statistics
    res = json.loads((tmp_path / "st.json").read_text())
    row = res["throughput"][0]
    runs = row["seconds"]
    # every figure is what the timed rounds give: img/s from the medians, the ratio round by round
    assert row["forward_img_s"] == pytest.approx(row["images"] / statistics.median(runs["forward"]["runs"]), rel=1e-12)
    per_round = [f / s for f, s in zip(runs["forward"]["runs"], runs["steady"]["runs"])]
    assert row["ratio_spread"]["median"] == pytest.approx(statistics.median(per_round), rel=1e-12)
    assert row["ratio_spread"]["min"] == pytest.approx(min(per_round), rel=1e-12)
    # one and two gloo processes accumulate the same statistics (the checksum of every mean)
    scale = res["scaling"]
    assert scale["2_process_checksum"] == pytest.approx(scale["1_process_checksum"], rel=1e-9, abs=1e-9)
    assert scale["speedup"] == pytest.approx(scale["1_process_s"] / scale["2_process_s"], rel=1e-12)


def test_timing_interleaves_warms_up_and_takes_ratios_round_by_round():
    import statistics
    timing = load_benchmark("timing")
    calls = []
    t = timing.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=5,
                                warmup=2)
    assert calls == ["a", "b"] * 7                                   # 2 warm-up rounds + 5 timed, alternating
    assert len(t["a"]["runs"]) == 5 and t["a"]["median"] == statistics.median(t["a"]["runs"])
    fake = {"x": {"runs": [2.0, 4.0, 9.0]}, "y": {"runs": [1.0, 1.0, 3.0]}}
    r = timing.ratio(fake, "x", "y")
    assert r["runs"] == [2.0, 4.0, 3.0] and (r["median"], r["min"], r["max"]) == (3.0, 2.0, 4.0)
    assert timing.fmt(r, 1) == "3.0 [2.0, 4.0]"


def test_text_dictionary_cost_projects_from_the_timed_rounds(tmp_path):
    import json
    bench = load_benchmark("text_dictionary_cost")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "text_dictionary_cost.json").read_text())
    row = res["models"]["RN50"]
    per_prompt = row["seconds_per_batch"]["median"] / res["batch"]
    assert res["batch"] == 80                                         # one word with each of the 80 templates
    assert row["paper_dictionary_hours"]["median"] == pytest.approx(30_000 * 80 * per_prompt / 3600, rel=1e-12)
    assert "## Cost" in (tmp_path / "text_dictionary_cost.md").read_text()
