"""ResNet and ViT attribution methods side by side: scenes-rn (NAD and its baselines) and scenes-vit (the exact
ViT decomposition's spatial map, TextSpan-style map, ViT MaskCLIP, class attention) on the same held-out scenes,
the same targets, the same runner and metrics.

    python benchmarks/harness_side_by_side.py                 # 16 held-out scenes; full run in benchmark_out/side_by_side,
                                                              # the merged table in benchmarks/results/harness_side_by_side.{json,md}
    python benchmarks/harness_side_by_side.py --n 4 --out /tmp/sbs --results /tmp/sbs
    python benchmarks/harness_side_by_side.py --fresh         # discard an earlier run in --out with other settings
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from nha_plugin.files import write_bytes
    from nha_plugin.harness.report import table
    from nha_plugin.harness.runner import BenchmarkConfig
    from nha_plugin.harness.side_by_side import run_side_by_side

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="held-out scenes (same for both models)")
    p.add_argument("--out", default=str(ROOT / "benchmark_out" / "side_by_side"), help="full run (maps, records)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the merged table goes")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    metrics = ("pointing_game", "mass_in_mask", "segmentation", "deletion_insertion", "randomisation",
               "completeness_error", "seconds_per_image")
    common = dict(n=args.n, metrics=metrics, del_ins_steps=8, quiet=args.quiet, fresh=args.fresh)
    merged = run_side_by_side({
        "scenes-rn": BenchmarkConfig(model="scenes-rn", methods=(
            "nad_spatial", "nad_neurons", "maskclip", "class_attention", "saliency", "centre"), **common),
        "scenes-vit": BenchmarkConfig(model="scenes-vit", methods=(
            "vit_spatial", "textspan_vit", "vit_maskclip", "vit_class_attention", "saliency", "centre"), **common),
    }, args.out)
    print(table(merged))
    out, results = Path(args.out), Path(args.results)
    for suffix in (".json", ".md"):
        write_bytes(results / f"harness_side_by_side{suffix}", (out / f"side_by_side{suffix}").read_bytes())
    for label in ("scenes-rn", "scenes-vit"):
        write_bytes(results / f"harness_side_by_side_{label}_heatmaps.png", (out / label / "heatmaps.png").read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
