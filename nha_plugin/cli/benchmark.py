"""``nha benchmark``: score NAD against Captum, zennit and CLIP-specific baselines on the same images.

Wire into the ``nha`` command with ``add_parser(subparsers)`` and dispatch ``run(args)``; also runnable alone:
``python -m nha_plugin.cli.benchmark [--quick] [--out DIR] ...``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..files import CorruptFileError
from ..harness import available_methods
from ..harness.runner import DEFAULT_METHODS, DEFAULT_METRICS, QUICK, BenchmarkConfig, run_benchmark
from ..runs import RunMismatchError

__all__ = ["add_parser", "run", "main"]

HELP = "score NAD against Captum, zennit and CLIP-specific baselines on the same images and metrics"


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``benchmark`` sub-command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("benchmark", help=HELP, description=HELP)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    d = BenchmarkConfig()
    p.add_argument("--model", default=d.model, help="model name for nha.load_clip (default: bundled scenes-rn)")
    p.add_argument("--dataset", default=d.dataset, help="scenes | photos | imagenet-s (needs --path)")
    p.add_argument("--path", default=None, help="gtsegs_ijcv.mat for --dataset imagenet-s")
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated methods (default: all: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--metrics", type=_csv, default=None,
                   help=f"comma-separated metric groups (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--n", type=int, default=None, help=f"number of images (default {d.n}; --quick {QUICK['n']})")
    p.add_argument("--n-subset", type=int, default=None,
                   help=f"images that get max-sensitivity and the randomisation check (default {d.n_subset})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="dataset seed (held out from training)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=d.out, help="output folder (results.json/.md, heatmaps.png, metric_*.png)")
    p.add_argument("--quick", action="store_true",
                   help=f"small run ({QUICK['n']} images, fewer steps): about 2 minutes")
    p.add_argument("--fresh", action="store_true",
                   help="discard the records of an earlier run in --out (needed when its settings differ)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed arguments (``--quick`` first, explicit options over it); exits
    with a message for an unknown method or metric group or a bad ``--n``."""
    cfg = BenchmarkConfig(model=args.model, dataset=args.dataset, path=args.path, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, out=args.out, quiet=args.quiet, fresh=args.fresh)
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    if args.methods:
        known = set(available_methods()) | set(DEFAULT_METHODS)
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise SystemExit(f"nha benchmark: unknown method(s) {unknown}; choose from {sorted(known)}")
        cfg.methods = tuple(args.methods)
    if args.metrics:
        unknown = [m for m in args.metrics if m not in DEFAULT_METRICS]
        if unknown:
            raise SystemExit(f"nha benchmark: unknown metric group(s) {unknown}; choose from {list(DEFAULT_METRICS)}")
        cfg.metrics = tuple(args.metrics)
    if args.n is not None:
        if args.n < 1:
            raise SystemExit("nha benchmark: --n must be at least 1")
        cfg.n = args.n
    if args.n_subset is not None:
        cfg.n_subset = args.n_subset
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; prints the table, writes the files.

    Returns:
        0 on success, 1 when no method ran, 2 when ``--out`` holds another run (rerun with ``--fresh``) or a
        damaged file (the one-line message names it).
    """
    cfg = config_from_args(args)
    try:
        results = run_benchmark(cfg)
    except (RunMismatchError, CorruptFileError) as err:
        first, *rest = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"nha benchmark: error: {first} {'; '.join(rest)}".rstrip(), file=sys.stderr)
        return 2
    if cfg.quiet:                                   # the runner prints the table only with progress output on
        from ..harness.report import table
        print(table(results))
    print(f"\nresults: {cfg.out}/results.json, {cfg.out}/results.md; figures: {cfg.out}/heatmaps.png, "
          f"{cfg.out}/metric_*.png")
    return 0 if results["methods"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nha benchmark", description=HELP)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
