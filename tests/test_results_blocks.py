"""Every figure in the README comes from benchmarks/results/: the result blocks equal the files they name, and
no number is typed into the README's prose outside a block."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_blocks", ROOT / "benchmarks" / "results_blocks.py")
RB = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RB)

# a measured figure: a decimal, a percentage, a ratio like 0.91x / 10.5×, a time like 4,233 s
FIGURE = re.compile(r"\d+\.\d+|\d+(?:\.\d+)? ?%|\d+(?:\.\d+)? ?[x×](?![\w])|\d[\d,]* ?(?:s|ms|MB|GB|GiB)\b")


def test_every_result_block_is_fresh():
    stale = RB.stale(RB.pages())
    assert not stale, ("result blocks differ from benchmarks/results/ (run python benchmarks/results_blocks.py): "
                       + ", ".join(f"{p.relative_to(ROOT)}:{r}" for p, r in stale))


def _prose(text: str) -> str:
    """The README without result blocks, code fences, inline code, links' targets and HTML comments."""
    text = RB.BLOCK.sub("", text)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


# settings, not measurements
SETTINGS = {"95%"}          # the confidence level of every interval


def test_readme_types_no_figure_outside_a_block():
    found = [f for f in FIGURE.findall(_prose((ROOT / "README.md").read_text())) if f not in SETTINGS]
    assert not found, f"figures typed into README.md outside result blocks: {found}"


def test_a_block_is_refilled_from_its_file_and_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.md").write_text("# R\n\n## A (x, y)\n\nalpha 1.5\n\n### A.1\n\ndeep\n\n## B\n\nbeta\n")
    page = tmp_path / "page.md"
    text = "x\n<!-- results:r.md#A (x, y) -->\nold\n<!-- /results -->\ny\n<!-- results:r.md#B -->\n<!-- /results -->\n"
    out = RB.render(text, page, results)
    assert out == ("x\n<!-- results:r.md#A (x, y) -->\nalpha 1.5\n<!-- /results -->\n"
                   "y\n<!-- results:r.md#B -->\nbeta\n<!-- /results -->\n")
    page.write_text(out)
    assert RB.stale([page], results) == []
    (results / "r.md").write_text("# R\n\n## A (x, y)\n\nalpha 2.5\n\n## B\n\nbeta\n")
    assert RB.stale([page], results) == [(page, "r.md#A (x, y)")]
    with pytest.raises(KeyError, match="no heading 'C'"):
        RB.render("<!-- results:r.md#C -->\n<!-- /results -->", page, results)
    with pytest.raises(FileNotFoundError, match="run the benchmark"):
        RB.render("<!-- results:missing.md -->\n<!-- /results -->", page, results)


def test_zoo_results_markdown_is_the_scripts_rendering_of_its_json():
    spec = importlib.util.spec_from_file_location("zoo_scenes", ROOT / "benchmarks" / "zoo_scenes.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    result = json.loads((RB.RESULTS / "zoo_scenes.json").read_text())
    assert (RB.RESULTS / "zoo_scenes.md").read_text() == zoo.markdown(result)
    assert set(result["models"]) == set(zoo.MODELS) and result["n_per_task"] >= 1000
