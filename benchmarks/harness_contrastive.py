"""Class-discriminative maps: plain vs contrastive targets (readout.contrastive: class minus the mean over
classes) on scenes holding two objects of different classes, with the bundled scenes-rn model.

For each scene, each method explains both objects' classes; the figure of merit is the Pearson correlation of
the two maps (1: the map does not depend on the class) and the mass of each map on its own object against the
other object. Means come with 95% bootstrap intervals over scenes (harness.confidence), plain vs contrastive
compared pairwise on the same scenes.

    python benchmarks/harness_contrastive.py                  # 32 scenes, NAD spatial + 2 baselines (~3 min)
    python benchmarks/harness_contrastive.py --n 8 --results /tmp/c
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n, seed):
    """Scenes with two objects of different classes: (image, (mask_a, class_a), (mask_b, class_b))."""
    from nha_plugin.scenes import CATEGORIES, SHAPES, SceneDataset
    classes = list(SHAPES) + list(CATEGORIES)
    out = []
    ds = SceneDataset(8 * n, seed=seed)
    for scene in ds:
        objs = sorted(scene.objects, key=lambda o: -int(o.mask.sum()))
        other = [o for o in objs[1:] if o.name != objs[0].name]
        if other:
            out.append((scene.image, objs[0], other[0]))
        if len(out) == n:
            break
    return out, classes


def main(argv=None) -> int:
    from nha_plugin.files import write_json, write_text
    from nha_plugin.harness import confidence as CI
    from nha_plugin.harness.registry import explain
    from nha_plugin.harness.runner import BenchmarkConfig, build_forward, target_forward
    from nha_plugin.zoo import images_to_tensor
    from nha_plugin.markup import md_row

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="scenes with two objects of different classes")
    p.add_argument("--seed", type=int, default=10_000, help="scene seed (held out from training)")
    p.add_argument("--methods", default="nad_spatial,maskclip,saliency", help="comma-separated harness methods")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    args = p.parse_args(argv)
    start = time.perf_counter()
    scenes, classes = _pairs(args.n, args.seed)
    base = build_forward(BenchmarkConfig(), classes)
    x = images_to_tensor(np.stack([s[0] for s in scenes]))
    ta = torch.tensor([classes.index(s[1].name) for s in scenes])
    tb = torch.tensor([classes.index(s[2].name) for s in scenes])
    ma = np.stack([s[1].mask for s in scenes]).astype(bool)
    mb = np.stack([s[2].mask for s in scenes]).astype(bool)
    rows, results = [], {"protocol": {"scenes": len(scenes), "seed": args.seed, "model": "scenes-rn",
                                      "statistics": CI.METHOD_TEXT, "paired": CI.PAIRED_TEXT}, "methods": {}}
    for method in args.methods.split(","):
        per_mode = {}
        for mode in ("plain", "contrastive"):
            fwd = target_forward(base, mode)
            a = explain(method, fwd, x, ta).maps.double().numpy()
            b = explain(method, fwd, x, tb).maps.double().numpy()
            corr = np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a, b)])
            pos = lambda m: np.clip(m, 0, None)                                         # noqa: E731
            own = np.array([pos(u)[k].sum() / max(pos(u)[k].sum() + pos(u)[o].sum(), 1e-12)
                            for u, k, o in zip(a, ma, mb)])
            rec = [{"index": i, "correlation": float(c), "own_share": float(s)}
                   for i, (c, s) in enumerate(zip(corr, own))]
            per_mode[mode] = CI.statistics_of(rec, ("correlation", "own_share"))
        entry = {mode: {k: CI.summary_entry(v, args.seed) for k, v in s.items()} for mode, s in per_mode.items()}
        entry["contrastive_minus_plain"] = {
            k: CI.paired_comparison(per_mode["contrastive"][k], per_mode["plain"][k], args.seed,
                                    higher_is_better=(k == "own_share")) for k in ("correlation", "own_share")}
        results["methods"][method] = entry
        for mode in ("plain", "contrastive"):
            e = entry[mode]
            rows.append(md_row([method, mode] + [f"{e[k]['mean']:.3f} [{e[k]['ci95'][0]:.3f}, {e[k]['ci95'][1]:.3f}]"
                                                 for k in ("correlation", "own_share")]))
    wall = time.perf_counter() - start
    results["wall_seconds"] = wall
    out = Path(args.results)
    write_json(out / "harness_contrastive.json", results)
    md = ["# Plain vs contrastive targets", "",
          f"{len(scenes)} generated scenes (seed {args.seed}) with two objects of different classes, scenes-rn. "
          "correlation: Pearson r between the maps of the two classes (lower: more class-specific); own share: "
          "positive mass on the explained object / positive mass on both objects. Mean [95% bootstrap interval "
          "over scenes].", "", md_row(["method", "target", "correlation ↓", "own share ↑"]), "|---|---|---:|---:|"]
    md += rows + ["", "Contrastive minus plain (paired over scenes): " + "; ".join(
        f"{m} {k} {c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] {c['verdict']}"
        for m, e in results["methods"].items() for k, c in e["contrastive_minus_plain"].items()),
        "", f"Wall time {wall:.0f} s (benchmarks/harness_contrastive.py, CPU).", ""]
    write_text(out / "harness_contrastive.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
