"""The shared attribution harness on the bundled scenes-rn model: NAD vs CLIP-specific, Captum, zennit baselines.

Runs :func:`nha_plugin.harness.runner.run_benchmark` with the default protocol (held-out scenes, seed 10000,
every registered method, every metric), then publishes ``results.json`` / ``results.md`` as
``benchmarks/results/harness_scenes_rn.{json,md}`` and the figures as ``harness_scenes_rn_*.png``.

    python benchmarks/harness_benchmark.py                      # default run (~10 min on 2 CPU cores)
    python benchmarks/harness_benchmark.py --quick              # 3 images, fewer steps (~2 min)
    python benchmarks/harness_benchmark.py --out /tmp/bench     # working folder (records; resumable)

Same options as ``nha benchmark``; a killed run resumes from ``--out`` (``--fresh`` discards an earlier run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nha_plugin.cli import benchmark as cli
from nha_plugin.files import write_bytes, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.configure(parser)
    parser.set_defaults(out="harness_out")
    parser.add_argument("--publish", default="harness_scenes_rn",
                        help="name under benchmarks/results/ ('' to skip publishing)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cfg = cli.config_from_args(args)
    status = cli.run(args)
    if status:
        return status
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s ({cfg.n} images, {len(cfg.methods)} methods)")
    if args.publish:
        out = Path(cfg.out)
        name = args.publish + ("_quick" if args.quick else "")
        write_bytes(RESULTS / f"{name}.json", (out / "results.json").read_bytes())
        md = (out / "results.md").read_text()
        md += f"\nWall time of the whole run: {wall:.0f} s (benchmarks/harness_benchmark.py, CPU).\n"
        write_text(RESULTS / f"{name}.md", md)
        for png in ["heatmaps.png"] + [p.name for p in sorted(out.glob("metric_*.png"))]:
            write_bytes(RESULTS / f"{name}_{png}", (out / png).read_bytes())
        print(f"published to {RESULTS}/{name}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
