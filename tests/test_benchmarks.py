"""The benchmark scripts run (tiny model smoke run); their figures live in benchmarks/results/."""
from pathlib import Path

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


def test_stats_throughput_quick(tmp_path):
    # a subprocess: the script spawns worker processes, which must import it by its file path
    import subprocess
    import sys
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stats_throughput.py"), "--quick",
                          "--out", str(tmp_path / "st")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ratio" in run.stdout


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
