"""``nha report``: a static site (leaderboard, per-image drill-down, atlas of units) that opens from ``file://``.

    nha report --out report                                   # scenes-rn: small benchmark + full atlas
    nha report --model scenes-vit --out report_vit            # CLIP-ViT: leaderboard and drill-down
    nha report --run benchmark_out --out report               # the leaderboard of an existing harness run
    nha report --model RN50 --pretrained openai --images DIR --no-benchmark --out report_rn50

Prints the path of ``index.html``. Reruns reuse the benchmark run (``OUT/run``) and the atlas
(``OUT/atlas-run``) of the same settings; ``--fresh`` starts over. Also runnable alone:
``python -m nha_plugin.cli.report report ...``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .common import positive_int, standalone_main

__all__ = ["add_parser", "run", "main", "HELP"]

# the one-line help (kept here too so the module runs without a row in cli.common.COMMANDS)
HELP = "a static browsable report: leaderboard with intervals, per-image maps, atlas of heads, neurons and pairs"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to ``subparsers``; returns its parser."""
    p = subparsers.add_parser("report", help=HELP, description=HELP)
    p.add_argument("--out", default="nha_report", help="site folder (default nha_report)")
    p.add_argument("--model", default="scenes-rn", help="model name for load_clip (default scenes-rn)")
    p.add_argument("--pretrained", default=None, help="weights tag or file for --model")
    p.add_argument("--run", default=None, help="an existing `nha benchmark` output folder for the leaderboard")
    p.add_argument("--no-benchmark", action="store_true", help="no leaderboard unless --run is given")
    p.add_argument("--no-atlas", action="store_true", help="leave the atlas of units out")
    p.add_argument("--images", default=None, help="folder of images for the atlas (default: generated scenes)")
    p.add_argument("--n-bench", type=positive_int, default=4, help="images of the small benchmark (default 4)")
    p.add_argument("--n-atlas", type=positive_int, default=48, help="images of the atlas statistics (default 48)")
    p.add_argument("--pool", default=None, help="word pool (scenes, imagenet, words, file:PATH)")
    p.add_argument("--k", type=positive_int, default=5, help="words per unit (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fresh", action="store_true", help="recompute instead of reusing OUT/run and OUT/atlas-run")
    return p


def run(args: argparse.Namespace) -> int:
    """Build the site; print the path of its index.html. Returns 0."""
    from ..report import ReportConfig, build_report
    cfg = ReportConfig(out=args.out, model=args.model, pretrained=args.pretrained, run=args.run,
                       benchmark=not args.no_benchmark, atlas=not args.no_atlas, images=args.images,
                       n_bench=args.n_bench,
                       n_atlas=args.n_atlas, pool=args.pool, k=args.k, progress=not args.quiet, fresh=args.fresh)
    print(build_report(cfg).resolve())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nha_plugin.cli.report report ...``."""
    return standalone_main(add_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
