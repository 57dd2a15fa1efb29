"""Dataset-statistics throughput vs the plain forward, memory per image, and 1-vs-2-process gloo scaling.

For each model, in one run and interleaved (so both see the same machine load): images/s of the plain
forward (``encode_image``) and of ``nha_plugin.stats`` accumulation (trunk + exact pair coefficients +
every streamed statistic: Chan-merged means and neuron co-moments, head norms/co-moments, per-pair top-k
lists), and their ratio. Peak memory per image: on CPU the growth of the process's peak RSS
(Linux ``VmHWM``, reset before the batch) over one batch, each measured in a fresh spawned process; on CUDA
``torch.cuda.max_memory_allocated`` growth. Then the same statistics over the same images with 1 process
and with 2 gloo processes (dataset sharded by index, merged exactly), wall time measured inside the
workers between barriers (process start-up excluded).

    python benchmarks/stats_throughput.py                         # scenes-rn and RN50 (random init) on CPU
    python benchmarks/stats_throughput.py --device cuda --batch 64 --models scenes-rn,RN50,RN50x16
    python benchmarks/stats_throughput.py --quick                 # tiny settings (smoke run)

Nothing is downloaded: scenes-rn is bundled, other open_clip models are random-init (speed does not
depend on the weights).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from nha_plugin.files import write_json, write_text

# the benchmarks are scripts, not a package: the shared timing helper sits beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fmt, ratio, time_interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(name: str, device: str):
    if name == "scenes-rn":
        import nha_plugin as nha
        model = nha.load_clip("scenes-rn")[0]
    else:
        import open_clip
        model = open_clip.create_model(name, pretrained=None)
    visual = model.visual.to(device).eval()
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return visual, size


def throughput(name: str, device: str, batch: int, batches: int, repeats: int, warm_images: int) -> dict:
    from nha_plugin.adapters import get_spec
    from nha_plugin.models import decompose
    from nha_plugin.stats import DatasetStats, collect
    visual, size = build(name, device)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, size, size, generator=g).to(device) for _ in range(batches)]
    spec = get_spec(visual)
    # steady state: top-k lists already full, as after the first images of a long pass
    warm = DatasetStats.empty(spec)
    with torch.no_grad():
        for start in range(0, warm_images, batch):
            x = torch.randn(min(batch, warm_images - start), 3, size, size, generator=g).to(device)
            warm.update(decompose(spec, x).pair_coefficients, torch.arange(start, start + x.shape[0]))

    def forward():
        with torch.no_grad():
            for x in data:
                visual(x)

    def cold():
        collect(visual, data, progress=False)

    def steady():
        st = warm.clone()
        for b, x in enumerate(data):
            st.update(decompose(spec, x).pair_coefficients, torch.arange(batch * b, batch * (b + 1)) + warm_images)

    t = time_interleaved({"forward": forward, "cold": cold, "steady": steady}, repeats, device=device)
    n = batch * batches
    state_bytes = sum(t.numel() * t.element_size() for t in warm.state_tensors().values())
    row = {"model": name, "device": device, "batch": batch, "images": n, "repeats": repeats,
           "warm_images": warm_images, "H": spec.num_heads, "C": spec.num_neurons, "D": spec.output_dim,
           "head_covariance": warm.head_comoment is not None, "statistics_state_mib": state_bytes / 2 ** 20,
           "forward_img_s": n / t["forward"]["median"], "stats_cold_img_s": n / t["cold"]["median"],
           "stats_img_s": n / t["steady"]["median"], "seconds": t,
           # images/s ratios taken round by round (forward seconds over statistics seconds)
           "ratio_spread": ratio(t, "forward", "steady"), "ratio_cold_spread": ratio(t, "forward", "cold")}
    row["ratio"] = row["ratio_spread"]["median"]
    row["ratio_cold"] = row["ratio_cold_spread"]["median"]
    return row


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_worker(name: str, device: str, batch: int, what: str, queue) -> None:
    import gc

    from nha_plugin.stats import collect
    torch.set_num_threads(1)
    visual, size = build(name, device)
    x = torch.randn(batch, 3, size, size).to(device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:     # reset the peak (VmHWM) to the current RSS
            f.write("5")
        before = _status_kib("VmRSS") * 1024
    with torch.no_grad():
        if what == "forward":
            visual(x)
        else:
            collect(visual, [x], progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        after = torch.cuda.max_memory_allocated()
    else:
        after = _status_kib("VmHWM") * 1024
    queue.put((after - before) / batch / 2 ** 20)


def memory(name: str, device: str, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for what in ("forward", "stats"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_worker, args=(name, device, batch, what, queue))
        proc.start()
        out[f"{what}_peak_mib_per_image"] = queue.get(timeout=600)
        proc.join()
    out["memory_method"] = ("torch.cuda.max_memory_allocated growth" if device.startswith("cuda") else
                            "peak RSS growth over one batch in a fresh process (Linux VmHWM reset via "
                            "/proc/self/clear_refs, then VmHWM - VmRSS before), per image; the statistics' "
                            "fixed state is included")
    return out


def _scaling_worker(rank: int, world: int, init: str, name: str, n: int, batch: int, queue) -> None:
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from nha_plugin.stats import collect
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        visual, size = build(name, "cpu")
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
        collect(visual, TensorDataset(x[:batch]), batch_size=batch, progress=False)       # warm-up
        dist.barrier()
        start = time.perf_counter()
        st = collect(visual, TensorDataset(x), batch_size=batch, progress=False)
        dist.barrier()
        if rank == 0:
            queue.put({"seconds": time.perf_counter() - start, "count": st.count,
                       "mean_checksum": float(st.pair_mean.sum())})
    finally:
        dist.destroy_process_group()


def scaling(name: str, n: int, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {"model": name, "images": n, "batch": batch, "threads_per_process": 1}
    for world in (1, 2):
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            procs = [ctx.Process(target=_scaling_worker, args=(r, world, init, name, n, batch, queue))
                     for r in range(world)]
            for p in procs:
                p.start()
            res = queue.get(timeout=1200)
            for p in procs:
                p.join()
        out[f"{world}_process_s"] = res["seconds"]
        out[f"{world}_process_checksum"] = res["mean_checksum"]
    out["speedup"] = out["1_process_s"] / out["2_process_s"]
    return out


def markdown(rows: list, mem: list, scale: dict, meta: dict) -> str:
    lines = [f"# stats_throughput ({meta['device']})", "",
             f"{meta['when']} · torch {meta['torch']} · {meta['hardware']} · threads {meta['threads']} · "
             f"load average {meta['load_before']} before, {meta['load_after']} after", "", meta["note"], "",
             f"statistics img/s: steady state (the statistics already hold {rows[0]['warm_images'] if rows else 0} "
             "images, so the top-k lists are full, as in any long pass); cold: a fresh `collect` over the same "
             "batches (every list still filling, the worst case). img/s from the median of "
             f"{rows[0]['repeats'] if rows else 0} interleaved rounds (forward, cold, steady, forward, ...) after a "
             "warm-up round; ratios taken round by round, median [min, max].", "",
             "| model | H x C, D | batch x images | forward img/s | statistics img/s | ratio median [min, max] | "
             "cold img/s | cold ratio median [min, max] | state MiB | forward peak MiB/img | statistics peak MiB/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, m in zip(rows, mem):
        lines.append(f"| {r['model']} | {r['H']} x {r['C']}, {r['D']} | {r['batch']} x {r['images']} | "
                     f"{r['forward_img_s']:.2f} | {r['stats_img_s']:.2f} | {fmt(r['ratio_spread'])} | "
                     f"{r['stats_cold_img_s']:.2f} | {fmt(r['ratio_cold_spread'])} | "
                     f"{r['statistics_state_mib']:.1f}{' (+head cov)' if r['head_covariance'] else ''} | "
                     f"{m['forward_peak_mib_per_image']:.2f} | {m['stats_peak_mib_per_image']:.2f} |")
    lines += ["", f"Memory: {mem[0]['memory_method']}." if mem else "", ""]
    if scale:
        lines += [f"## gloo scaling ({scale['model']}, {scale['images']} images, batch {scale['batch']}, "
                  "1 thread per process)", "", "| processes | wall s | speed-up |", "|---|---|---|",
                  f"| 1 | {scale['1_process_s']:.2f} | 1.00 |",
                  f"| 2 | {scale['2_process_s']:.2f} | {scale['speedup']:.2f} |", "",
                  "Both runs give the same statistics (checksum of the pair mean: "
                  f"{scale['1_process_checksum']:.12g} vs {scale['2_process_checksum']:.12g})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="scenes-rn,RN50", help="comma-separated (scenes-rn or open_clip names)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 32; RN50-size models 8)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warm", type=int, default=200, help="images already in the statistics for the steady state")
    ap.add_argument("--scaling-images", type=int, default=192, help="images for the 1-vs-2-process run (0: skip)")
    ap.add_argument("--quick", action="store_true", help="scenes-rn only, 1 batch of 8, 2 repeats, 32-image scaling")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/stats_throughput_DEVICE)")
    args = ap.parse_args(argv)
    models = ["scenes-rn"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        args.batch, args.batches, args.repeats, args.scaling_images, args.warm = 8, 1, 2, 32, 16
    load_before = os.getloadavg()[0]
    rows, mem = [], []
    for name in models:
        batch = args.batch or (32 if name == "scenes-rn" or args.device.startswith("cuda") else 8)
        rows.append(throughput(name, args.device, batch, args.batches, args.repeats, args.warm))
        mem.append(memory(name, args.device, batch))
        print(json.dumps(rows[-1] | mem[-1]))
    scale = scaling("scenes-rn", args.scaling_images, 16) if args.scaling_images and args.device == "cpu" else {}
    if scale:
        print(json.dumps(scale))
    meta = {"device": args.device, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "hardware": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else f"{platform.machine()} ({os.cpu_count()} cpus)"),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            # a load above the core count means other jobs shared the machine during the run
            "note": ("The machine was shared with other jobs during the run (see the load averages): absolute "
                     "numbers are noisy; forward and statistics were timed interleaved so the ratio is fair."
                     if args.device == "cpu" and max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1)
                     else "")}
    stem = Path(args.out) if args.out else RESULTS / f"stats_throughput_{args.device.split(':')[0]}"
    payload = {"meta": meta, "throughput": [r | m for r, m in zip(rows, mem)], "scaling": scale}
    write_json(stem.with_suffix(".json"), payload)
    write_text(stem.with_suffix(".md"), markdown(rows, mem, scale, meta))
    print(markdown(rows, mem, scale, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
