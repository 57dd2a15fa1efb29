"""Fill the README's and the docs' result blocks from benchmarks/results/, so no figure is typed by hand.

A block is written in a page as::

    <!-- results:harness_scenes_rn.md#Leaderboard -->
    ...(generated: do not edit)...
    <!-- /results -->

``FILE`` is a file in ``benchmarks/results/``; ``#Heading`` (optional) picks the text under that Markdown
heading, up to the next heading of any level, instead of the whole file. Images are linked,
not inlined: a block may name a ``.png`` and gets a Markdown image link to it.

    python benchmarks/results_blocks.py           # rewrite the blocks in README.md and docs/**.md
    python benchmarks/results_blocks.py --check   # exit 1 and name each stale block (what the tests run)
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Iterable, List, Tuple

from nha_plugin.files import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<ref>[^\n]+?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
HEADING = re.compile(r"^(#+) +(.*?) *$")


def publish(folder: Path, name: str, result: dict, markdown: str) -> None:
    """Write a benchmark's ``<name>.json`` and ``<name>.md`` into ``folder`` (atomically) and print the Markdown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", result)
    write_text(folder / f"{name}.md", markdown)
    print(markdown)


def pages(root: Path = ROOT) -> List[Path]:
    """The pages that may hold result blocks: README.md and every Markdown file under docs/."""
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def section(text: str, heading: str, source: str) -> str:
    """The body under ``heading`` in Markdown ``text`` (up to the next heading of any level)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = HEADING.match(line)
        if m and m.group(2) == heading:
            end = next((j for j in range(i + 1, len(lines)) if HEADING.match(lines[j])), len(lines))
            return "\n".join(lines[i + 1:end]).strip("\n")
    found = [HEADING.match(l).group(2) for l in lines if HEADING.match(l)]
    raise KeyError(f"{source} has no heading {heading!r}; its headings are {found}")


def render_ref(ref: str, page: Path, results: Path = RESULTS) -> str:
    """The generated text of one block reference ``FILE[#Heading]`` as seen from ``page``."""
    name, _, heading = ref.partition("#")
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"{page.name}: result block names {name!r}, which is not a file in {results}; "
                                "run the benchmark that writes it")
    if path.suffix == ".png":
        return f"![{heading or path.stem}]({os.path.relpath(path, page.parent)})"
    text = path.read_text(encoding="utf-8")
    return section(text, heading, name) if heading else text.strip("\n")


def render(text: str, page: Path, results: Path = RESULTS) -> str:
    """``text`` with every result block refilled from the results files."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{render_ref(m.group('ref'), page, results)}\n{m.group(4)}", text)


def stale(paths: Iterable[Path], results: Path = RESULTS) -> List[Tuple[Path, str]]:
    """``(page, reference)`` of every block whose text differs from what the results files give."""
    out = []
    for page in paths:
        text = page.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group("body").rstrip("\n") != render_ref(m.group("ref"), page, results):
                out.append((page, m.group("ref")))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(pages())
        for page, ref in bad:
            print(f"{page.relative_to(ROOT)}: block {ref} is stale; run python benchmarks/results_blocks.py",
                  file=sys.stderr)
        return 1 if bad else 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        new = render(text, page)
        if new != text:
            write_text(page, new)
            print(f"updated {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
