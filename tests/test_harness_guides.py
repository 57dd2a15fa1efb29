"""The ```python blocks of docs/guides/quantus.md and zennit.md run as a user would copy them (bundled
scenes-rn, CPU), and what they print agrees with an independent computation."""
import re
from pathlib import Path

import numpy as np
import pytest

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"


def _run_blocks(name):
    text = (GUIDES / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python block in {name}"
    namespace = {"__name__": "__guide__"}
    for block in blocks:
        exec(compile(block, f"{name}", "exec"), namespace)             # noqa: S102 - our own documentation
    return namespace


def test_quantus_guide_runs_and_its_pointing_game_is_the_harness_one(capsys):
    ns = _run_blocks("quantus.md")
    from nha_plugin.harness import metrics as M
    maps = ns["explain_func"](ns["model"], ns["x"], ns["y"])
    printed = capsys.readouterr().out
    expected = [bool(M.pointing_game(m[0], k[0])) for m, k in zip(maps, ns["s"])]
    line = next(ln for ln in printed.splitlines() if ln.startswith("pointing game"))
    assert [w == "True" for w in re.findall(r"True|False", line)] == expected


def test_zennit_guide_runs_and_its_table_ends_at_the_input_relevance(capsys):
    ns = _run_blocks("zennit.md")
    printed = [ln.split() for ln in capsys.readouterr().out.splitlines() if "fraction" in ln]
    assert [r[0] for r in printed] == ["logit", "attnpool", "layer4", "layer3", "layer2", "layer1", "input"]
    logit = float(ns["logits"][0, ns["target"]])
    assert float(printed[0][2]) == pytest.approx(1.0)
    # the table's input fraction is the guide's own lrp_attribute relevance over the logit (3 printed decimals)
    assert float(printed[-1][2]) == pytest.approx(float(ns["relevance"].sum()) / logit, abs=6e-4)
    assert np.isfinite(float(printed[-1][4]))
