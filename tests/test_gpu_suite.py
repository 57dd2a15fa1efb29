"""benchmarks/gpu_suite.py runs end to end on CPU with --tiny, so the GPU suite cannot rot before a GPU runs it."""
import statistics

from conftest import load_benchmark

from nha_plugin.files import read_json


def test_gpu_suite_tiny_writes_every_section_and_ratios_come_from_the_medians(tmp_path):
    suite = load_benchmark("gpu_suite")
    assert suite.main(["--tiny", "--repeats", "2", "--out", str(tmp_path)]) == 0
    for section in suite.SECTIONS:
        assert (tmp_path / f"gpu_{section}.md").read_text().startswith(f"# gpu_suite: {section}")
        payload = read_json(tmp_path / f"gpu_{section}.json")
        assert payload["meta"]["tiny"] is True and payload["rows"]
        for row in payload["rows"]:
            seconds = row["seconds"] if section != "harness" else {row["method"]: row["seconds"]}
            for s in seconds.values():       # every figure is the median of its two timed rounds, with its range
                assert len(s["runs"]) == 2 and all(x > 0 for x in s["runs"])
                assert s["median"] == statistics.median(s["runs"])
                assert (s["min"], s["max"]) == (min(s["runs"]), max(s["runs"]))
            if section == "harness":
                assert abs(row["seconds_per_image"] - row["seconds"]["median"] / row["batch"]) <= 1e-12
                continue
            for q in row["ratios"].values():
                num, den = seconds[q["numerator"]], seconds[q["denominator"]]
                expected = (num["median"] / q["numerator_items"]) / (den["median"] / q["denominator_items"])
                assert abs(q["of_medians"] - expected) <= 1e-12 * expected
                rounds = [(a / q["numerator_items"]) / (b / q["denominator_items"])
                          for a, b in zip(num["runs"], den["runs"])]
                assert abs(q["per_round"]["median"] - statistics.median(rounds)) <= 1e-12 * max(rounds)


def test_gpu_suite_without_cuda_says_what_to_do(capsys, monkeypatch):
    import torch
    suite = load_benchmark("gpu_suite")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # as on a machine without a GPU
    assert suite.main(["--sections", "omp"]) == 2
    assert "--tiny" in capsys.readouterr().err
