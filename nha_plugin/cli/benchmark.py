"""``nha benchmark``: score NAD against Captum, zennit and CLIP-specific baselines on the same images.

Wire into the ``nha`` command with ``add_parser(subparsers)`` and dispatch ``run(args)``; also runnable alone:
``python -m nha_plugin.cli.benchmark [--quick] [--out DIR] ...``. Under torchrun the images are dealt over the
processes (gloo on CPU, NCCL on GPU, one GPU per LOCAL_RANK) and rank 0 writes the results:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m nha_plugin.cli.benchmark --dataset imagenet-s --path gtsegs_ijcv.mat --out /shared/bench --device cuda
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..harness import available_methods
from ..harness.runner import DEFAULT_METHODS, DEFAULT_METRICS, QUICK, BenchmarkConfig, run_benchmark
from .common import (Parser, UsageError, check_choices, check_file, check_output_folder, command_help, dispatch,
                     model_name_problem, non_negative_int, positive_int)

__all__ = ["add_parser", "configure", "config_from_args", "run", "main"]

DATASETS = ("scenes", "photos", "imagenet-s")


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``benchmark`` sub-command to an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser("benchmark", help=command_help("benchmark"), description=command_help("benchmark"))
    configure(p)
    return p


def _quick_help() -> str:
    c = QUICK["captum"]
    return (f"a small run: {QUICK['n']} images, every metric on each, {QUICK['del_ins_steps']} deletion/insertion steps, {QUICK['infidelity_samples']} infidelity and "
            f"{QUICK['sensitivity_samples']} sensitivity samples, randomising "
            f"{', '.join(QUICK['randomisation_stages'])}; "
            f"integrated gradients {c.ig_steps} steps, GradientShap {c.gradshap_samples} samples, occlusion window "
            f"{c.occlusion_window} px; options given explicitly override it (about 2 minutes on a CPU)")


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``benchmark`` options to a parser."""
    d = BenchmarkConfig()
    p.add_argument("--model", default=d.model, help="scenes-rn (bundled) or any model name load_clip reads")
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS, help="scenes | photos | imagenet-s (needs --path)")
    p.add_argument("--path", default=None, help="--dataset imagenet-s: the gtsegs_ijcv.mat file (default: none)")
    p.add_argument("--methods", type=_csv, default=None,
                   help=f"comma-separated methods (default: all: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--metrics", type=_csv, default=None,
                   help=f"comma-separated metric groups (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--n", type=positive_int, default=None,
                   help=f"number of images (default {d.n}; --quick {QUICK['n']})")
    p.add_argument("--n-subset", type=non_negative_int, default=None,
                   help="images that get max-sensitivity and the randomisation check (default: every image)")
    p.add_argument("--target-mode", choices=("plain", "contrastive"), default=d.target_mode,
                   help="plain: the target's logit; contrastive: the logit minus the mean over classes")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per method call")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="dataset seed (held out from training)")
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    p.add_argument("--out", default=d.out, help="output folder (results.json/.md, heatmaps.png, metric_*.png)")
    p.add_argument("--quick", action="store_true", help=_quick_help())
    p.add_argument("--fresh", action="store_true",
                   help="discard the records of an earlier run in --out (needed when its settings differ)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The :class:`BenchmarkConfig` of parsed arguments (``--quick`` first, explicit options over it).

    Args:
        args: the parsed ``benchmark`` arguments.

    Returns:
        The configuration.

    Raises:
        UsageError: an unknown method or metric group (naming the closest), ``--path`` missing or not a file.
    """
    cfg = BenchmarkConfig(model=args.model, dataset=args.dataset, path=args.path, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, out=args.out, quiet=args.quiet, fresh=args.fresh,
                          target_mode=args.target_mode)
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    if args.methods:
        check_choices("--methods", args.methods, sorted(set(available_methods()) | set(DEFAULT_METHODS)), "method")
        cfg.methods = tuple(args.methods)
    if args.metrics:
        check_choices("--metrics", args.metrics, DEFAULT_METRICS, "metric group")
        cfg.metrics = tuple(args.metrics)
    if args.n is not None:
        cfg.n = args.n
    if args.n_subset is not None:
        cfg.n_subset = args.n_subset
    if args.dataset == "imagenet-s":
        if not args.path:
            raise UsageError("--dataset imagenet-s needs --path to gtsegs_ijcv.mat (the ImageNet-Segmentation file)")
        check_file("--path", args.path, "gtsegs_ijcv.mat, the ImageNet-Segmentation file (MATLAB v7.3)")
    elif args.path:
        raise UsageError(f"--path is read by --dataset imagenet-s only; --dataset {args.dataset} generates its images")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; prints the table, writes the files.

    Returns:
        0 on success, 1 when no method ran; a refused ``--out`` (another run: rerun with ``--fresh``) or a damaged
        file is reported by :func:`nha_plugin.cli.common.dispatch` (one line, 2).
    """
    cfg = config_from_args(args)
    problem = model_name_problem(cfg.model)
    if problem:
        raise UsageError(problem)
    check_output_folder("--out", cfg.out)
    import torch.distributed as dist

    from ..runs import init_distributed
    created = init_distributed(cfg.device)
    try:
        results = run_benchmark(cfg)
    finally:
        if created:
            dist.destroy_process_group()
    if not results:                                 # another rank than 0 under torchrun: rank 0 reports
        return 0
    if cfg.quiet:                                   # the runner prints the table only with progress output on
        from ..harness.report import table
        print(table(results))
    print(f"\nresults: {cfg.out}/results.json, {cfg.out}/results.md; figures: {cfg.out}/heatmaps.png, "
          f"{cfg.out}/metric_*.png")
    return 0 if results["methods"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nha_plugin.cli.benchmark [options]``: the benchmark alone (``argv`` without the sub-command)."""
    parser = Parser(prog="nha benchmark", description=command_help("benchmark"))
    configure(parser)
    return dispatch("benchmark", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
