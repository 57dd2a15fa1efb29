"""The shared attribution harness on the bundled scenes-rn model: NAD vs CLIP-specific, Captum, zennit baselines.

Runs :func:`nha_plugin.harness.runner.run_benchmark` with the default protocol (held-out scenes, seed 10000,
every registered method, every metric), then publishes ``results.json`` / ``results.md`` as
``benchmarks/results/harness_scenes_rn.{json,md}`` and the figures as ``harness_scenes_rn_*.png``.

    python benchmarks/harness_benchmark.py                      # default run (~10 min on 2 CPU cores)
    python benchmarks/harness_benchmark.py --quick              # 3 images, fewer steps (~2 min)
    python benchmarks/harness_benchmark.py --out /tmp/bench     # working folder (records; resumable)

Same options as ``nha benchmark``; a killed run resumes from ``--out``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nha_plugin.cli import benchmark as cli

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
    from nha_plugin.harness.runner import run_benchmark
    run_benchmark(cfg)
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s ({cfg.n} images, {len(cfg.methods)} methods)")
    if args.publish:
        out = Path(cfg.out)
        RESULTS.mkdir(exist_ok=True)
        suffix = "_quick" if args.quick else ""
        shutil.copy(out / "results.json", RESULTS / f"{args.publish}{suffix}.json")
        md = (out / "results.md").read_text()
        md += f"\nWall time of the whole run: {wall:.0f} s (benchmarks/harness_benchmark.py, CPU).\n"
        (RESULTS / f"{args.publish}{suffix}.md").write_text(md)
        for png in ["heatmaps.png"] + [p.name for p in sorted(out.glob("metric_*.png"))]:
            shutil.copy(out / png, RESULTS / f"{args.publish}{suffix}_{png}")
        print(f"published to {RESULTS}/{args.publish}{suffix}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
