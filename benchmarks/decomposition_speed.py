"""Plain forward vs full pair decomposition vs the reference's dense per-pair layout, side by side.

For each model: images/s of ``encode_image`` (plain forward); images/s of the trunk + the exact
decomposition + scores at every granularity (pair, head, neuron, token, spatial) for one target; images/s
of the dense (B, H, C, D) layout the reference materialises (small batch); bytes stored per image by each.
Prints a table with the ratio to the plain forward and writes JSON + Markdown under benchmarks/results/.

    python benchmarks/decomposition_speed.py                        # RN50 and RN50x16 on CPU, fp32
    python benchmarks/decomposition_speed.py --device cuda --dtype bf16 --batch 64
    python benchmarks/decomposition_speed.py --quick                # tiny model, seconds (CI smoke run)

Models are random-init (speed does not depend on the weights); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import open_clip
import torch

from nha_plugin.adapters import get_spec
from nha_plugin.decomposition import LEVELS, decompose_features
from nha_plugin.files import write_text

# the benchmarks are scripts, not a package: the shared timing helper sits beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fmt, ratio, time_interleaved  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = dict(embed_dim=64, vision_cfg=dict(layers=[1, 1, 1, 1], width=16, head_width=64, image_size=128),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))


def build(name: str, device: str, dtype: torch.dtype, tiny: dict = TINY):
    """The random-init image tower of open_clip model ``name`` (``"tiny"``: the config ``tiny``), in eval mode."""
    if name == "tiny":
        model = open_clip.model.CLIP(**tiny)
    else:
        model = open_clip.create_model(name, pretrained=None)
    return model.visual.to(device=device, dtype=dtype).eval()


def bench_model(name: str, device: str, dtype: torch.dtype, batch: int, dense_batch: int, repeats: int) -> dict:
    visual = build(name, device, dtype)
    spec = get_spec(visual).detached()
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    target = torch.randn(spec.output_dim, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            visual(x)

    def decomposition():
        with torch.no_grad():
            contrib = decompose_features(spec, spec.trunk(x))
            for level in LEVELS:
                contrib.scores(target, level=level)
            contrib.bias_score(target)
            contrib.positional_score(target)

    xd = x[:dense_batch]

    def dense():
        with torch.no_grad():
            contrib = decompose_features(spec, spec.trunk(xd))
            contrib.pair_contributions() @ target

    # forward, decomposition and dense alternate within each round: the ratios are taken round by round
    t = time_interleaved({"forward": forward, "decomposition": decomposition, "dense": dense}, repeats,
                         device=device)
    t_fwd, t_dec, t_dense = (t[key]["median"] for key in ("forward", "decomposition", "dense"))
    H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
    item = torch.tensor([], dtype=dtype).element_size()
    row = {
        "model": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "dense_batch": dense_batch, "H": H, "C": C, "D": D,
        "forward_img_s": batch / t_fwd, "decomposition_img_s": batch / t_dec, "dense_img_s": dense_batch / t_dense,
        "bytes_per_image_decomposition": H * C * item, "bytes_per_image_dense": H * C * D * item,
    }
    # per-round ratios of images/s; dense runs a smaller batch, so its seconds are scaled to images first
    per_round = {"forward": t["forward"], "decomposition": t["decomposition"],
                 "dense": {"runs": [s * batch / dense_batch for s in t["dense"]["runs"]]}}
    row["seconds"] = t
    row["decomposition_ratio_spread"] = ratio(per_round, "forward", "decomposition")
    row["dense_ratio_spread"] = ratio(per_round, "forward", "dense")
    row["repeats"] = repeats
    row["decomposition_ratio"] = row["decomposition_ratio_spread"]["median"]
    row["dense_ratio"] = row["dense_ratio_spread"]["median"]
    return row


POOL_DIMS = {"RN50": (2048, 32, 1024, 7), "RN50x16": (3072, 48, 768, 12), "RN50x64": (4096, 64, 1024, 14)}


def _pool_memory_worker(name: str, batch: int, queue) -> None:
    """Peak RSS growth of the attention-pool decomposition + scores at every level (one and 10 targets), on
    random layer4 features of the model's shape; the trunk is excluded (it is the model's own cost)."""
    import resource

    from nha_plugin.spec import AttentionPoolSpec
    C, H, D, g = POOL_DIMS[name]
    mk = lambda *s: torch.randn(*s) / s[-1] ** 0.5  # noqa: E731
    spec = AttentionPoolSpec(q_weight=mk(C, C), q_bias=torch.zeros(C), k_weight=mk(C, C), k_bias=torch.zeros(C),
                             v_weight=mk(C, C), v_bias=torch.zeros(C), c_weight=mk(D, C), c_bias=torch.zeros(D),
                             positional_embedding=mk(g * g + 1, C), num_heads=H, trunk=None)
    features = torch.relu(torch.randn(batch, C, g, g))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        contrib = decompose_features(spec, features)
        for target in (torch.randn(D), torch.randn(D, 10)):
            for level in LEVELS:
                contrib.scores(target, level=level)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"model": name, "batch": batch, "peak_rss_growth_mib": (after - before) / 1024,
               "dense_layout_mib": batch * H * C * D * 4 / 2 ** 20})


def in_fresh_process(worker, *args) -> dict:
    """Run ``worker(*args, queue)`` in a spawned process (so its peak RSS is its own) and return what it puts
    on the queue."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def pool_memory(name: str, batch: int) -> dict:
    return in_fresh_process(_pool_memory_worker, name, batch)


def add_device_arguments(p: argparse.ArgumentParser, dtypes: dict) -> None:
    """--device, --dtype (one of ``dtypes``) and --batch, resolved by :func:`device_settings`."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(dtypes), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")


def device_settings(args: argparse.Namespace, dtypes: dict):
    """``(cuda, dtype, batch)`` from the arguments of :func:`add_device_arguments`; None, said on stderr, when
    CUDA is asked for but not available."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("CUDA requested but not available; use --device cpu", file=sys.stderr)
        return None
    return cuda, dtypes[args.dtype or ("bf16" if cuda else "fp32")], args.batch or (64 if cuda else 4)


def machine_meta(device: str, dtype: torch.dtype, cuda: bool) -> dict:
    """Where and when a run happened: device, dtype, torch version, hardware, threads, UTC time."""
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "hardware": torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} "
            f"({os.cpu_count()} cpus)", "threads": torch.get_num_threads(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_results(out: str, stem: str, meta: dict, rows: list[dict], text: str) -> None:
    """``out/stem.json`` ({"meta", "rows"}) and ``out/stem.md`` (``text``), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / (stem + ".json"), json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_text(out / (stem + ".md"), text)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# decomposition_speed ({meta['device']}, {meta['dtype']})", "",
             f"{meta['when']} · torch {meta['torch']} · {meta['hardware']} · threads {meta['threads']}", "",
             "| model | batch | forward img/s | decomposition img/s | ratio median [min, max] | dense img/s (batch) |"
             " dense ratio median [min, max] | bytes/img ours | bytes/img dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['forward_img_s']:.2f} | {r['decomposition_img_s']:.2f} | "
                     f"{fmt(r['decomposition_ratio_spread'])} | {r['dense_img_s']:.2f} ({r['dense_batch']}) | "
                     f"{fmt(r['dense_ratio_spread'])} | {r['bytes_per_image_decomposition']:,} | "
                     f"{r['bytes_per_image_dense']:,} |")
    for m in meta.get("memory", []):
        lines.append("")
        lines.append(f"Memory, {m['model']} attention pool, batch {m['batch']} (CPU, fp32, trunk excluded): peak RSS "
                     f"growth {m['peak_rss_growth_mib']:.0f} MiB for the decomposition and scores at every level "
                     f"(1 and 10 targets); the dense (B, H, C, D) layout alone would take "
                     f"{m['dense_layout_mib']:,.0f} MiB.")
    repeats = rows[0]["repeats"] if rows else 0
    lines += ["", f"img/s from the median of {repeats} interleaved rounds (forward, decomposition, dense, forward, ...) "
              "after one warm-up round; each ratio is taken round by round: median [min, max] over the rounds.",
              "", "decomposition = trunk + exact pair coefficients + scores at pair, head, neuron, token and "
              "spatial level for one target (+ bias and positional terms). dense = the reference's (B, H, C, D) "
              "per-pair contributions, projected on the same target. Target: ratio >= 0.9."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["RN50", "RN50x16"])
    add_device_arguments(p, DTYPES)
    p.add_argument("--dense-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model only, for a smoke run")
    p.add_argument("--memory", nargs="*", default=["RN50x64"], help="attention-pool memory probe (batch 8)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    settings = device_settings(args, DTYPES)
    if settings is None:
        return 2
    cuda, dtype, batch = settings
    models = ["tiny"] if args.quick else args.models
    meta = machine_meta(args.device, dtype, cuda)
    rows = []
    for name in models:
        row = bench_model(name, args.device, dtype, batch, min(args.dense_batch, batch), args.repeats)
        rows.append(row)
        print(f"{name:8s} forward {row['forward_img_s']:8.2f} img/s | decomposition {row['decomposition_img_s']:8.2f} "
              f"img/s ({row['decomposition_ratio']:.3f}x) | dense {row['dense_img_s']:8.2f} img/s "
              f"({row['dense_ratio']:.3f}x) | bytes/img {row['bytes_per_image_decomposition']:,} vs "
              f"{row['bytes_per_image_dense']:,}", flush=True)
    if not args.quick:
        meta["memory"] = [pool_memory(name, 8) for name in args.memory]
    text = markdown(rows, meta)
    print(text)
    if not args.quick:
        write_results(args.out, f"decomposition_speed_{'cuda' if cuda else 'cpu'}", meta, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
