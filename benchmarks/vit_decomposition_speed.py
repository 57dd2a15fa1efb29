"""CLIP-ViT: plain forward vs the exact decomposition with scores at every level, side by side in one run.

For each model: images/s of the image tower's own forward (``encode_image``); images/s of
``nha_plugin.vit.decompose`` (the forward recomputed from the weights, keeping class-token attention rows and
per-token values) plus scores at every level (component, layer, head, token, spatial) and the rest terms for
one target; the completeness error of that run; bytes kept per image by the decomposition vs the dense
(L, H, N, D) per-entry table. Prints a table with the ratio to the plain forward and writes JSON + Markdown
under benchmarks/results/.

    python benchmarks/vit_decomposition_speed.py                            # ViT-B-32 and ViT-B-16, CPU, fp32
    python benchmarks/vit_decomposition_speed.py --device cuda --dtype bf16 --batch 64
    python benchmarks/vit_decomposition_speed.py --quick                    # tiny model, seconds (smoke run)

Models are random-init (speed does not depend on the weights); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import open_clip
import torch

from nha_plugin import vit
from nha_plugin.vit.decomposition import LEVELS

# the benchmarks are scripts, not a package: the CLIP-ResNet benchmark beside this file holds the shared harness
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decomposition_speed as rn_speed  # noqa: E402
from timing import fmt, ratio, time_interleaved  # noqa: E402

DTYPES = {**rn_speed.DTYPES, "fp64": torch.float64}
TINY = dict(embed_dim=32, vision_cfg=dict(layers=3, width=64, head_width=16, patch_size=16, image_size=64),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))


def build(name: str, device: str, dtype: torch.dtype):
    return rn_speed.build(name, device, dtype, tiny=TINY)


def bench_model(name: str, device: str, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    visual = build(name, device, dtype)
    spec = vit.vit_spec(visual)
    size = spec.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=g).to(device=device, dtype=dtype)
    target = torch.randn(spec.output_dim, generator=g).to(device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            visual(x)

    def decomposition():
        with torch.no_grad():
            c = vit.decompose(spec, x)
            for level in LEVELS:
                c.scores_and_rest(target, level=level)
        return c

    t = time_interleaved({"forward": forward, "decomposition": decomposition}, repeats, device=device)
    t_fwd, t_dec = t["forward"]["median"], t["decomposition"]["median"]
    c = decomposition()
    with torch.no_grad():
        errors = {level: float(c.completeness_error(target, level=level).max()) for level in LEVELS}
    L, H, N, W, D = spec.layers, spec.heads, spec.tokens, spec.width, spec.output_dim
    item = torch.tensor([], dtype=dtype).element_size()
    kept = (L * N * W + L * H * (N + spec.head_dim) + (L + 1) * W + 2) * item   # values, attention, head outputs
    row = {
        "model": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "L": L, "H": H, "N": N, "W": W, "D": D,
        "forward_img_s": batch / t_fwd, "decomposition_img_s": batch / t_dec,
        "max_completeness_error": max(errors.values()), "completeness_error_by_level": errors,
        "bytes_per_image_decomposition": kept, "bytes_per_image_dense": L * H * N * D * item,
    }
    row["seconds"] = t
    row["decomposition_ratio_spread"] = ratio(t, "forward", "decomposition")     # images/s ratio, per round
    row["decomposition_ratio"] = row["decomposition_ratio_spread"]["median"]
    return row


def _memory_worker(name: str, batch: int, queue) -> None:
    """Peak RSS growth of the decomposition + scores at every level (one and 10 targets) beyond the model's own
    forward, in a fresh process: build the image tower, run its forward (peak 1), then decompose and score
    (peak 2). ``ru_maxrss`` only grows, so peak 2 - peak 1 is what the decomposition adds."""
    import resource

    cfg = open_clip.get_model_config(name)
    torch.manual_seed(0)
    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"]).eval()
    spec = vit.vit_spec(visual)
    x = torch.randn(batch, 3, *spec.image_size)
    with torch.no_grad():
        start = time.perf_counter()
        visual(x)
        t_fwd = time.perf_counter() - start
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        c = vit.decompose(spec, x)
        for target in (torch.randn(spec.output_dim), torch.randn(spec.output_dim, 10)):
            for level in LEVELS:
                c.scores_and_rest(target, level=level)
        t_dec = time.perf_counter() - start
        error = float(c.completeness_error(target, level="spatial").max())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    L, H, N, D = spec.layers, spec.heads, spec.tokens, spec.output_dim
    queue.put({"model": name, "batch": batch, "peak_rss_growth_mib": (after - before) / 1024,
               "dense_layout_mib": batch * L * H * N * D * 4 / 2 ** 20, "forward_s": t_fwd,
               "decomposition_and_scores_s": t_dec, "completeness_error_spatial_10_targets": error})


def memory_probe(name: str, batch: int) -> dict:
    return rn_speed.in_fresh_process(_memory_worker, name, batch)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# vit_decomposition_speed ({meta['device']}, {meta['dtype']})", "",
             f"{meta['when']} · torch {meta['torch']} · {meta['hardware']} · threads {meta['threads']} · "
             f"load average before the run {meta['load_average']}", "",
             "| model | batch | forward img/s | decomposition + all scores img/s | ratio median [min, max] | max rel. completeness "
             "error | bytes/img kept | bytes/img dense (L,H,N,D) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['forward_img_s']:.2f} | {r['decomposition_img_s']:.2f} | "
                     f"{fmt(r['decomposition_ratio_spread'])} | {r['max_completeness_error']:.1e} | "
                     f"{r['bytes_per_image_decomposition']:,} | {r['bytes_per_image_dense']:,} |")
    for m in meta.get("memory", []):
        lines += ["", f"Memory, {m['model']}, batch {m['batch']} (CPU, fp32, one process): the decomposition and "
                  f"scores at every level (1 and 10 targets) raise the peak RSS by {m['peak_rss_growth_mib']:.0f} MiB "
                  f"beyond the model's own forward; the dense (B, L, H, N, D) table alone would take "
                  f"{m['dense_layout_mib']:,.0f} MiB. Single run: forward {m['forward_s']:.1f} s, decomposition + "
                  f"all scores {m['decomposition_and_scores_s']:.1f} s; completeness error (spatial, 10 targets) "
                  f"{m['completeness_error_spatial_10_targets']:.1e}."]
    lines += ["", f"Median of {meta['repeats']} rounds after a warm-up round; forward and decomposition alternate within "
              "each round and the ratio is taken round by round (median [min, max]). "
              "forward = the image tower's own forward (open_clip, no grad). decomposition = "
              "`nha_plugin.vit.decompose` (the forward recomputed from the weights, keeping class-token attention "
              "rows and per-token values of every layer) + scores and rest terms at component, layer, head, token "
              "and spatial level for one target direction, projected back through P, LN_post and W_o (the dense "
              "(B, L, H, N, D) table is never built). Random-init open_clip models, nothing downloaded.", "",
              meta["note"], "", f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} "
              f"{meta['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    rn_speed.add_device_arguments(p, DTYPES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", nargs="*", default=["ViT-H-14"], help="peak-memory probe at batch 1 (none: skip)")
    p.add_argument("--quick", action="store_true", help="tiny model only, no files written (smoke run)")
    p.add_argument("--note", default="The machine was shared with other jobs during the run (2 cores for several "
                   "processes): absolute img/s are low and noisy; the ratio, measured side by side, is the figure.")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    settings = rn_speed.device_settings(args, DTYPES)
    if settings is None:
        return 2
    cuda, dtype, batch = settings
    models = ["tiny"] if args.quick else args.models
    meta = {**rn_speed.machine_meta(args.device, dtype, cuda),
            "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()), "note": args.note,
            "repeats": args.repeats, "command": " ".join(["python", "benchmarks/vit_decomposition_speed.py",
                                                          *(argv if argv is not None else sys.argv[1:])])}
    rows = []
    for name in models:
        row = bench_model(name, args.device, dtype, batch, args.repeats)
        rows.append(row)
        print(f"{name:9s} forward {row['forward_img_s']:8.2f} img/s | decomposition {row['decomposition_img_s']:8.2f} "
              f"img/s ({row['decomposition_ratio']:.3f}x) | completeness {row['max_completeness_error']:.1e}",
              flush=True)
    if not args.quick and args.memory:
        meta["memory"] = [memory_probe(name, 1) for name in args.memory]
    text = markdown(rows, meta)
    print(text)
    if not args.quick:
        rn_speed.write_results(args.out, f"vit_decomposition_speed_{'cuda' if cuda else 'cpu'}", meta, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
