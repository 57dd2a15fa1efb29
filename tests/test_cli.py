"""`nha demo` end to end on the bundled model: exact completeness, maps that land on the explained object; every
command's help and its one-line errors."""
import json
import re

import pytest

from nha_plugin import cli
from nha_plugin.cli.common import COMMANDS, UsageError, command_help
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
    with pytest.raises(UsageError) as info:       # a mistake in the command line: SystemExit(2), like argparse's
        nha_main(["textspan", "--model", "scenes-rn", "--n", "4", "--out", str(tmp_path / "t.json"), "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "nha textspan: error: expected a CLIP-ViT" in err and "Traceback" not in err
    assert nha_main(["segment", "--dataset", "pascal-context", "--root", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "VOCdevkit/VOC2010/JPEGImages" in capsys.readouterr().err


def _option_blocks(text: str) -> dict:
    """``{--option: its help text}`` from an argparse help page (an option's help may wrap over lines)."""
    blocks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)          # the option strings, before the help column
        if m:
            current = [t for t in re.split(r"[ ,]+", m.group(1)) if t.startswith("-")][-1]
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_is_plain_and_shows_each_default(command, capsys):
    from nha_plugin.cli.main import build_parser
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert " ".join(command_help(command).split()) in " ".join(out.split())   # the table's line, as `nha --help`
    assert "``" not in out and not re.search(r":(func|class|mod|attr|data):`", out), "reST markup in the help"
    parser, _ = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    blocks = _option_blocks(out)
    for action in sub._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help":
            continue
        flag = action.option_strings[-1]
        assert action.help, f"nha {command} {flag} has no help"
        assert re.search(r"default|required", blocks[flag], re.I), f"nha {command} {flag}: no default shown"


def test_top_level_help_lists_every_command_without_loading_torch(capsys):
    import subprocess
    import sys
    code = ("import sys\nfrom nha_plugin.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("argv,phrase", [
    (["describe", "--device", "nosuchdevice"], "is not a device torch knows"),
    (["demo", "--device", "cuda:99"], "cuda"),
    (["benchmark", "--methods", "nad_heds", "--quiet"], "did you mean 'nad_heads'?"),
    (["benchmark", "--dataset", "scene"], "did you mean 'scenes'?"),
    (["describe", "--unit", "heads:3"], "did you mean 'head:3'?"),
    (["describe", "--unit", "pair:3,17"], "did you mean 'pair:H3N17'?"),
    (["demo", "--model", "RN5O"], "did you mean"),
])
def test_command_line_mistakes_are_one_line_with_exit_2(argv, phrase, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and phrase in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
