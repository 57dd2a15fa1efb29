"""`nha demo` end to end on the bundled model: exact completeness, maps that land on the explained object."""
import json

from nha_plugin import cli
from nha_plugin.cli.demo import demo


def test_demo_on_scenes_rn(tmp_path, capsys):
    import torch
    summary = demo("scenes-rn", n=3, out=str(tmp_path), quiet=True)
    assert torch.is_grad_enabled(), "the demo must not switch autograd off for the rest of the process"
    out = capsys.readouterr().out
    assert "top pairs" in out and "completeness error" in out
    assert (tmp_path / "nad_heatmaps.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    for row in saved["results"]:
        assert row["completeness_abs_error"] < 1e-3 * abs(row["logit"])
        # the positive part of the map concentrates on the explained object far beyond its area share
        assert row["positive_mass_in_mask"] > 2 * row["mask_area_fraction"]


def test_demo_rejects_bad_n(capsys):
    import pytest
    with pytest.raises(SystemExit):
        cli.main(["demo", "--n", "0"])
    err = capsys.readouterr().err
    assert "argument --n: must be at least 1; got 0" in err and "Traceback" not in err


def test_user_errors_are_one_line_messages_not_tracebacks(tmp_path, capsys):
    from nha_plugin.cli import main as nha_main
    assert nha_main(["textspan", "--model", "scenes-rn", "--n", "4", "--out", str(tmp_path / "t.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nha textspan: error: expected a CLIP-ViT" in err and "Traceback" not in err
    assert nha_main(["segment", "--dataset", "pascal-context", "--root", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "VOCdevkit/VOC2010/JPEGImages" in capsys.readouterr().err
