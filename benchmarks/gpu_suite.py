"""Every GPU figure of issue 17 §1 in one command, written to benchmarks/results/gpu_*.json and .md.

Sections (each timed with :mod:`timing`: interleaved rounds after a warm-up, median [min, max]):
- ``decomposition``: plain forward vs full decomposition (all levels, one target) for RN50 (batch 128) and
  RN50x16 (batch 64), fp32 and bf16, peak memory of each; the dense per-pair layout at batch 1 for the ratio;
- ``vit``: the ViT decomposition vs forward (ViT-B-16, ViT-L-14 shapes);
- ``omp``: OMP of all RN50x16 pair directions (147,456) against a 30,000-atom dictionary, k = 64, exact and
  screened, and scikit-learn's time per target on the same data (CPU) for the ratio;
- ``stats``: the statistics pass vs forward inside a torch.distributed group of world size 1 (NCCL on a GPU,
  gloo on CPU), and ``harness``: seconds per image of every harness method.

    python benchmarks/gpu_suite.py                      # on one GPU (the contract: under 8 minutes on an H100)
    python benchmarks/gpu_suite.py --tiny --out /tmp/g  # tiny sizes on CPU (the test suite runs this)

Every ratio is ``(median seconds of numerator / its items) / (median seconds of denominator / its items)``,
stored with the per-round spread; a speed ratio puts the baseline (forward, scikit-learn) in the numerator.
Models are random-init and nothing is downloaded (the bundled scenes-rn model is used by --tiny).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from nha_plugin.files import write_json, write_text

# the benchmarks are scripts, not a package: their shared helpers sit beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decomposition_speed as rn_speed  # noqa: E402
import stats_throughput  # noqa: E402
import vit_decomposition_speed as vit_speed  # noqa: E402
from timing import fmt, spread, time_interleaved  # noqa: E402

SECTIONS = ("decomposition", "vit", "omp", "stats", "harness")


def settings(tiny: bool) -> dict:
    """Sizes of every section: the issue's on a GPU, seconds-long ones with ``tiny``."""
    if tiny:
        return {"rn": [("tiny", 2)], "dtypes": ["fp32"], "vit": [("tiny", 2)], "omp_atoms": 300, "omp_k": 4,
                "omp_heads": 1, "omp_pairs": 64, "sklearn_targets": 4, "stats_model": "scenes-rn", "stats_batch": 4,
                "harness_methods": ["nad_spatial", "random"], "harness_batch": 2}
    return {"rn": [("RN50", 128), ("RN50x16", 64)], "dtypes": ["fp32", "bf16"],
            "vit": [("ViT-B-16", 64), ("ViT-L-14", 16)], "omp_atoms": 30000, "omp_k": 64, "omp_heads": None,
            "sklearn_targets": 8, "stats_model": "RN50", "stats_batch": 64, "harness_methods": None,
            "harness_batch": 8}


def ratio_entry(times: dict, numerator: str, denominator: str, num_items: int = 1, den_items: int = 1) -> dict:
    """The ratio of two timed callables per item, from their medians, with the round-by-round spread.

    Args:
        times: :func:`timing.time_interleaved` output. numerator, denominator: keys of ``times``.
        num_items, den_items: items (images, targets) each call handles, so unequal batches compare per item.
    """
    per_round = [(a / num_items) / (b / den_items)
                 for a, b in zip(times[numerator]["runs"], times[denominator]["runs"])]
    return {"numerator": numerator, "denominator": denominator, "numerator_items": num_items,
            "denominator_items": den_items,
            "of_medians": (times[numerator]["median"] / num_items) / (times[denominator]["median"] / den_items),
            "per_round": spread(per_round)}


def peak_mib(fn, device: str):
    """Peak GPU memory (MiB) allocated during one call of ``fn``; None on CPU (see stats_throughput for RSS)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def section_decomposition(cfg: dict, device: str, repeats: int) -> list:
    from nha_plugin.adapters import get_spec
    from nha_plugin.decomposition import LEVELS, decompose_features
    rows = []
    for name, batch in cfg["rn"]:
        for dt in cfg["dtypes"]:
            dtype = rn_speed.DTYPES[dt]
            visual = rn_speed.build(name, device, dtype)
            spec = get_spec(visual).detached()
            size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
            x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            target = torch.randn(spec.output_dim, device=device, dtype=dtype)

            @torch.no_grad()
            def forward():
                visual(x)

            @torch.no_grad()
            def decomposition():
                contrib = decompose_features(spec, spec.trunk(x))
                for level in LEVELS:
                    contrib.scores(target, level=level)

            @torch.no_grad()
            def dense():                                  # the reference's (1, H, C, D) layout, at batch 1
                (decompose_features(spec, spec.trunk(x[:1])).pair_contributions() @ target).sum()

            fns = {"forward": forward, "decomposition": decomposition, "dense_batch1": dense}
            t = time_interleaved(fns, repeats, device=device)
            rows.append({"model": name, "dtype": dt, "batch": batch, "seconds": t,
                         "peak_mib": {key: peak_mib(fn, device) for key, fn in fns.items()},
                         "ratios": {"decomposition_vs_forward": ratio_entry(t, "forward", "decomposition"),
                                    "dense_vs_forward": ratio_entry(t, "forward", "dense_batch1", batch, 1)}})
    return rows


def section_vit(cfg: dict, device: str, repeats: int) -> list:
    rows = []
    for name, batch in cfg["vit"]:
        r = vit_speed.bench_model(name, device, torch.float32, batch, repeats)
        rows.append({"model": name, "dtype": "fp32", "batch": batch, "seconds": r["seconds"],
                     "max_completeness_error": r["max_completeness_error"],
                     "ratios": {"decomposition_vs_forward": ratio_entry(r["seconds"], "forward", "decomposition")}})
    return rows


def section_omp(cfg: dict, device: str, repeats: int, screen: int = 8) -> list:
    import numpy as np
    from sklearn.linear_model import orthogonal_mp

    from nha_plugin.adapters import get_spec
    from nha_plugin.pool import pair_directions
    from nha_plugin.text import prepare_dictionary, sparse_decompose
    torch.manual_seed(0)
    spec = get_spec(rn_speed.build("tiny" if cfg["omp_heads"] else "RN50x16", "cpu", torch.float32)).detached()
    heads = slice(0, cfg["omp_heads"]) if cfg["omp_heads"] else slice(None)
    U = torch.nn.functional.normalize(pair_directions(spec, heads=heads).flatten(0, 1).float(), dim=1)   # (P, D)
    U = U[:cfg["omp_pairs"]] if cfg.get("omp_pairs") else U
    g = torch.Generator().manual_seed(1)
    A = prepare_dictionary(torch.randn(cfg["omp_atoms"], U.shape[1], generator=g))
    k, S, P = cfg["omp_k"], cfg["sklearn_targets"], U.shape[0]
    U_dev, A_dev = U.to(device), A.to(device)
    X = np.asfortranarray(A.T.numpy())
    picks = torch.randperm(P, generator=g)[:S]
    Y_sk = U[picks].T.numpy()
    fns = {"sklearn_cpu": lambda: orthogonal_mp(X, Y_sk, n_nonzero_coefs=k),
           "exact": lambda: sparse_decompose(U_dev, A_dev, k=k, device=device, progress=False),
           f"screen={screen}": lambda: sparse_decompose(U_dev, A_dev, k=k, device=device, screen=screen,
                                                       progress=False)}
    t = time_interleaved(fns, repeats, device=device)
    return [{"pairs": P, "atoms": cfg["omp_atoms"], "k": k, "sklearn_targets": S, "seconds": t,
             "ratios": {f"{name}_vs_sklearn_per_target": ratio_entry(t, "sklearn_cpu", name, S, P)
                        for name in ("exact", f"screen={screen}")}}]


def section_stats(cfg: dict, device: str, repeats: int) -> list:
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from nha_plugin.stats import collect
    visual, size = stats_throughput.build(cfg["stats_model"], device)
    x = torch.randn(cfg["stats_batch"], 3, size, size, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        # world size 1 in a real process group: the sharded code path (NCCL on a GPU) is what is timed
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            @torch.no_grad()
            def forward():
                visual(x)

            def statistics():
                collect(visual, TensorDataset(x), batch_size=x.shape[0], progress=False)

            t = time_interleaved({"forward": forward, "statistics": statistics}, repeats, device=device)
        finally:
            dist.destroy_process_group()
    return [{"model": cfg["stats_model"], "batch": cfg["stats_batch"], "seconds": t,
             "ratios": {"statistics_vs_forward": ratio_entry(t, "forward", "statistics")}}]


def section_harness(cfg: dict, device: str, repeats: int) -> list:
    from nha_plugin.harness.registry import available_methods, explain
    from nha_plugin.harness.runner import DEFAULT_METHODS, methods_for
    from nha_plugin.models import load_clip
    from nha_plugin.readout import LinearReadout
    if cfg["harness_methods"]:                         # tiny: the bundled model
        model = load_clip("scenes-rn")[0].to(device).eval()
    else:
        import open_clip
        model = open_clip.create_model("RN50", pretrained=None).to(device).eval()
    D = model.visual.output_dim
    forward = LinearReadout(model, torch.nn.functional.normalize(torch.randn(D, 10), dim=0).to(device))
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    x = torch.randn(cfg["harness_batch"], 3, size, size, device=device)
    names = [m for m in methods_for(model, cfg["harness_methods"] or DEFAULT_METHODS) if m in available_methods()]
    seeds = list(range(x.shape[0]))
    fns = {m: (lambda m=m: explain(m, forward, x, 0, seeds=seeds)) for m in names}
    t = time_interleaved(fns, repeats, device=device)
    return [{"method": m, "batch": x.shape[0], "seconds": t[m], "seconds_per_image": t[m]["median"] / x.shape[0]}
            for m in names]


def markdown(section: str, rows: list, meta: dict) -> str:
    lines = [f"# gpu_suite: {section} ({meta['hardware']})", "",
             f"{meta['when']} · torch {meta['torch']} · {meta['repeats']} interleaved rounds after a warm-up"
             f"{' · TINY sizes (smoke run, not figures)' if meta['tiny'] else ''}", ""]
    if section == "harness":
        lines += ["| method | batch | s/img median [min, max] |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['batch']} | {fmt(r['seconds'], 4, 1 / r['batch'])} |" for r in rows]
        return "\n".join(lines) + "\n"
    lines += ["| row | ratio | of medians | per round median [min, max] | seconds median [min, max] |",
              "|---|---|---|---|---|"]
    for r in rows:
        label = " ".join(str(r[key]) for key in ("model", "dtype", "batch", "pairs", "atoms", "k") if key in r)
        secs = "; ".join(f"{key} {fmt(v, 4)}" for key, v in r["seconds"].items())
        for name, q in r["ratios"].items():
            lines.append(f"| {label} | {name} | {q['of_medians']:.3f} | {fmt(q['per_round'])} | {secs} |")
    if section == "decomposition":
        lines += ["", "peak MiB (one call each): " + "; ".join(
            f"{r['model']} {r['dtype']}: " + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} n/a"
                                                       for k, v in r["peak_mib"].items()) for r in rows)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (seconds; the test suite runs this)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: CUDA requested but not available; run on a GPU machine, or pass --tiny for a CPU "
              "smoke run", file=sys.stderr)
        return 2
    cfg = settings(args.tiny)
    meta = {**rn_speed.machine_meta(device, torch.float32, device.startswith("cuda")), "repeats": args.repeats,
            "tiny": args.tiny}
    run = {"decomposition": section_decomposition, "vit": section_vit, "omp": section_omp,
           "stats": section_stats, "harness": section_harness}
    for section in args.sections:
        rows = run[section](cfg, device, args.repeats)
        write_json(Path(args.out) / f"gpu_{section}.json", {"meta": meta, "rows": rows})
        text = markdown(section, rows, meta)
        write_text(Path(args.out) / f"gpu_{section}.md", text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
