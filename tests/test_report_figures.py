"""Reports of the segmentation and the shift monitor: class colours that match colour names, user strings escaped in
the Markdown they write, the shift figure's group labels clear of its ticks."""
import json
from pathlib import Path

import numpy as np
import pytest

from nha_plugin.applications.segmentation import report as seg_report
from nha_plugin.applications.shift import report as shift_report

ROOT = Path(__file__).resolve().parents[1]
SCENE_CLASSES = ["circle", "square", "triangle", "star", "cross", "cat", "astronaut", "coffee cup", "rocket",
                 "motorcycle", "white", "black", "gray", "grass", "gravel", "brick"]


def _min_distance(colours) -> float:
    c = np.asarray(colours)
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    return float(d[~np.eye(len(c), dtype=bool)].min())


def test_colour_classes_are_drawn_in_their_colour_and_others_stay_distinct():
    pal = seg_report.palette(SCENE_CLASSES)
    assert pal.shape == (17, 3) and (pal >= 0).all() and (pal <= 1).all()
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (128 / 255,) * 3}
    for name, rgb in named.items():
        assert np.allclose(pal[SCENE_CLASSES.index(name)], rgb), name
    assert _min_distance(pal) > 0.25                         # every class and the ignore colour apart
    assert not np.allclose(pal[-1], 0.0)                     # "black" is a class, so ignored pixels are not black
    red = seg_report.palette(["red", "Light Blue", "sky"])
    assert np.allclose(red[0], (1, 0, 0)) and np.allclose(red[1], (173 / 255, 216 / 255, 230 / 255))
    assert np.allclose(red[-1], 0.0)                         # no black class: ignored pixels black
    many = seg_report.palette(59)                            # Context-59 size: past tab20, still apart
    assert many.shape == (60, 3) and _min_distance(many[:-1]) > 0.05


def _result(names):
    K = len(names)
    iou = [0.5] * (K - 1) + [None]
    return {"methods": {"nad": {"miou": 0.5, "pixacc": 0.6, "macc": 0.7, "iou": iou},
                        "x|y": {"miou": 0.4, "pixacc": 0.6, "macc": 0.7, "iou": iou}},
            "class_names": names}


def _cells(line):
    """Cells of a Markdown table row, split on unescaped pipes."""
    import re
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_segmentation_markdown_escapes_user_strings():
    names = ["cat", "a|b", "<script>x</script>"]
    md = seg_report.results_markdown(_result(names), "run | <b>", ["root: /data|x", "line\nbreak"])
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [ln for ln in rows if ln.startswith("| method | cat")][0]
    assert len(_cells(header)) == 1 + len(names)
    per_class = rows[rows.index(header) + 2:]
    assert per_class and all(len(_cells(r)) == 1 + len(names) for r in per_class)
    assert all(len(_cells(r)) == 5 for r in rows[:4] if not r.startswith("|---"))
    assert "- line break" in md


@pytest.fixture(scope="module")
def shift_result():
    report = json.loads((ROOT / "benchmarks" / "results" / "shift_scenes_rn.json").read_text())
    report["runs"] = report["runs"][:1]
    run = report["runs"][0]
    first = next(iter(run["concepts"].values()))
    run["concepts"] = {"a|b <i>$x$</i>": first}
    return report


def test_shift_markdown_escapes_user_strings(shift_result):
    md = shift_report.markdown(shift_result)
    assert "<i>" not in md and "a\\|b &lt;i&gt;" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| a\\|b")]
    assert table and len(_cells(table[0])) == 2 + 2 * len(shift_report.METHODS)


def test_shift_figure_labels_clear_of_ticks(shift_result, tmp_path, monkeypatch):
    figures = []
    original = shift_report.save_figure

    def keep(path, fig, **kw):
        figures.append(fig)
        return original(path, fig, **kw)

    monkeypatch.setattr(shift_report, "save_figure", keep)
    shift_report.plot(shift_result, tmp_path / "shift.png")
    assert (tmp_path / "shift.png").stat().st_size > 10_000
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = figures[0]
    canvas = FigureCanvasAgg(fig)                            # the report closed the figure: draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    top = fig.axes[0]
    assert len(top.child_axes) == 1                          # the groups' own top axis
    group_labels = [t for t in top.child_axes[0].get_xticklabels() if t.get_text()]
    want = [str(g["group"]) for g in next(iter(shift_result["runs"][0]["concepts"].values()))["groups"]]
    assert [t.get_text() for t in group_labels] == want
    others = [t for t in top.get_xticklabels() + top.get_yticklabels() if t.get_text()]
    others += [top.xaxis.label, top.yaxis.label, top.title] + top.texts
    for g in group_labels:
        box = g.get_window_extent(renderer)
        for o in others:
            assert not box.overlaps(o.get_window_extent(renderer)), (g.get_text(), o.get_text())
    assert r"\$x\$" in top.title.get_text()                 # shown as typed, not as mathtext
