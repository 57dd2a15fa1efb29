"""Batched OMP (nha_plugin.text.sparse_decompose) vs scikit-learn's orthogonal_mp, side by side.

Part 1 (always): one dictionary (N atoms x D, default 30,000 x 768, the RN50x16 word pool's size) and the
same B targets (pair directions u[h,n]/||u|| of a random-init RN50x16, sampled over all heads) go to both
solvers with k non-zeros; prints seconds per target for each, the ratio, and how often the supports agree.
Part 2 (``--all-pairs``): all 147,456 RN50x16 pair directions x N atoms x k on ``--device`` (a GPU: the
contract is <= 30 s on one H100); ``--max-heads`` runs only some heads and extrapolates (flagged).

    python benchmarks/omp_speed.py                                  # CPU ratio, full sizes (~10 min)
    python benchmarks/omp_speed.py --device cuda --all-pairs        # plus all RN50x16 pairs on the GPU
    python benchmarks/omp_speed.py --quick                          # small sizes, seconds (smoke run)

The dictionary is random (centred, unit-norm atoms): OMP's cost does not depend on what the atoms mean,
and embedding 30k words with a random text tower would only add minutes. Nothing is downloaded.
Writes benchmarks/results/omp_speed_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from nha_plugin.adapters import get_spec
from nha_plugin.pool import pair_directions
from nha_plugin.files import write_json, write_text
from nha_plugin.text import prepare_dictionary, sparse_decompose

# the benchmarks are scripts, not a package: the shared timing helper sits beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fmt, spread, sync, time_interleaved  # noqa: E402


def rn50x16_spec():
    torch.manual_seed(0)
    return get_spec(open_clip.create_model("RN50x16", pretrained=None).visual.eval()).detached()


def sample_directions(spec, n: int, seed: int) -> torch.Tensor:
    """n unit pair directions (n, D) sampled uniformly over all H*C pairs."""
    H, C = spec.num_heads, spec.num_neurons
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(H * C, generator=g)[:n].sort().values
    out = []
    for h in flat.div(C, rounding_mode="floor").unique().tolist():
        cols = flat[flat.div(C, rounding_mode="floor") == h] % C
        out.append(pair_directions(spec, heads=slice(h, h + 1))[0, cols])
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, default=30000, help="dictionary size N")
    p.add_argument("--targets", type=int, default=512, help="targets B solved by nha (one batched call)")
    p.add_argument("--sklearn-targets", type=int, default=32,
                   help="the first S of those targets solved by scikit-learn too (its cost per target does not "
                        "depend on B); both are compared per target and on these S")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--screen", type=int, default=8, help="also time the bf16-screened variant (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    p.add_argument("--all-pairs", action="store_true", help="all RN50x16 pairs on --device")
    p.add_argument("--max-heads", type=int, default=None, help="--all-pairs: only this many heads, extrapolated")
    p.add_argument("--quick", action="store_true", help="N=2000, B=32, k=16 (smoke run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.atoms, args.targets, args.sklearn_targets, args.k = 2000, 32, 32, 16
    args.sklearn_targets = min(args.sklearn_targets, args.targets)
    from sklearn.linear_model import orthogonal_mp
    from threadpoolctl import threadpool_info

    spec = rn50x16_spec()
    D = spec.output_dim
    g = torch.Generator().manual_seed(1)
    A = prepare_dictionary(torch.randn(args.atoms, D, generator=g))
    Y = sample_directions(spec, args.targets, seed=2)
    N, B, k, S = args.atoms, args.targets, args.k, args.sklearn_targets
    print(f"OMP: {B} RN50x16 pair directions (D={D}) x {N} atoms, k={k}; torch threads {torch.get_num_threads()}, "
          f"os.cpu_count {os.cpu_count()}")

    X = np.asfortranarray(A.T.numpy())                                 # (D, N), float32, as sklearn wants
    screens = {"exact": None}
    if args.screen:
        screens[f"screen={args.screen}"] = args.screen
    out_codes, out_ref = {}, {}

    def sklearn_run():
        out_ref["ref"] = orthogonal_mp(X, Y[:S].T.numpy(), n_nonzero_coefs=k).T   # (S, N)

    def ours(name):
        def run():
            out_codes[name] = sparse_decompose(Y, A, k=k, device=args.device, screen=screens[name])
        return run

    # scikit-learn on S targets and each nha variant on all B alternate within every round; the per-target
    # speed ratio is taken round by round, so a machine whose load drifts hits both alike
    fns = {"sklearn": sklearn_run, **{name: ours(name) for name in screens}}
    times = time_interleaved(fns, repeats=args.repeats, device=args.device)
    ref = out_ref["ref"]
    t_sk = times["sklearn"]["median"] * B / S                          # scaled to all B targets
    full = (ref != 0).sum(axis=1) == k                                 # sklearn stops early on float32 ties
    print(f"scikit-learn orthogonal_mp (CPU) on {S} targets: {1e3 * t_sk / B:.1f} ms/target; "
          f"{int((~full).sum())} targets stopped early (fewer than k atoms)")

    rows = {}
    for name in screens:
        codes, t = out_codes[name], times[name]["median"]
        same = [set(np.flatnonzero(ref[b])) == set(codes.indices[b].cpu().tolist()) for b in range(S)]
        dense = codes.dense(N)[:S].cpu().double().numpy()
        err = float(np.abs(dense - ref).max())
        same_full = float(np.mean([sm for sm, f in zip(same, full) if f])) if full.any() else float("nan")
        err_full = float(np.abs(dense[full] - ref[full]).max()) if full.any() else float("nan")
        per_round = spread([(a / S) / (b / B) for a, b in zip(times["sklearn"]["runs"], times[name]["runs"])])
        rows[name] = {"seconds": t, "seconds_spread": times[name], "ms_per_target": 1e3 * t / B,
                      "ratio_vs_sklearn": per_round["median"], "ratio_vs_sklearn_spread": per_round,
                      "same_support_fraction": float(np.mean(same)), "max_coefficient_difference": err,
                      "same_support_fraction_where_sklearn_gave_k": same_full,
                      "max_coefficient_difference_where_sklearn_gave_k": err_full}
        print(f"nha sparse_decompose {name} ({args.device}): {t:.2f} s, {1e3 * t / B:.1f} ms/target, "
              f"{fmt(per_round, 1)}x scikit-learn; identical supports {np.mean(same):.1%} ({same_full:.1%} where "
              f"scikit-learn gave k atoms, max |coef diff| there {err_full:.1e})")

    result = {"problem": {"atoms": N, "dim": D, "targets": B, "sklearn_targets": S, "k": k,
                          "targets_from": "random-init RN50x16 pairs",
                          "dictionary": "random, centred, unit-norm rows", "dtype": "float32"},
              "sklearn": {"seconds_scaled_to_all_targets": t_sk, "ms_per_target": 1e3 * t_sk / B, "device": "cpu",
                          "seconds_spread_on_sklearn_targets": times["sklearn"], "repeats": args.repeats,
                          "targets_stopped_early": int((~full).sum())},
              "nha": rows, "device": args.device,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "blas": [{k2: i.get(k2) for k2 in ("internal_api", "num_threads")} for i in threadpool_info()],
                          "loadavg": os.getloadavg(), "torch": torch.__version__},
              "all_pairs": None}
    if args.device.startswith("cuda"):
        result["machine"]["gpu"] = torch.cuda.get_device_name()

    if args.all_pairs:
        H, C = spec.num_heads, spec.num_neurons
        heads = range(args.max_heads if args.max_heads else H)
        A_dev = A.to(args.device)
        sparse_decompose(Y[:8], A_dev, k=k, device=args.device)
        sync(args.device)
        start = time.perf_counter()
        for h in heads:
            u = torch.nn.functional.normalize(pair_directions(spec, heads=slice(h, h + 1))[0].to(args.device), dim=1)
            sparse_decompose(u, A_dev, k=k, device=args.device)
        sync(args.device)
        t_all = time.perf_counter() - start
        done = len(heads) * C
        est = t_all * H * C / done
        result["all_pairs"] = {"pairs_done": done, "pairs_total": H * C, "seconds": t_all,
                               "seconds_all_pairs": est, "extrapolated": done < H * C,
                               "sklearn_estimate_seconds": t_sk / B * H * C}
        print(f"all RN50x16 pairs ({H * C} x {N} atoms, k={k}) on {args.device}: "
              f"{'~' if done < H * C else ''}{est:.1f} s{' (extrapolated from %d heads)' % len(heads) if done < H * C else ''}"
              f"; scikit-learn (this CPU) would take ~{t_sk / B * H * C / 3600:.1f} h")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else args.device.split(":")[0]
    stem = out / f"omp_speed_{tag}{'_quick' if args.quick else ''}"
    write_json(stem.with_suffix(".json"), result)
    md = [f"# OMP speed ({args.device})", "",
          f"{B} RN50x16 pair directions (D={D}), {N} atoms, k={k}, float32; nha solves all {B} in one call, "
          f"scikit-learn the first {S} (its time per target does not depend on B; agreement is checked on those). "
          f"torch threads {torch.get_num_threads()}; load average at the end {os.getloadavg()[0]:.1f}. Median of "
          f"{args.repeats} interleaved rounds (scikit-learn, nha exact, nha screened, ...) after a warm-up round; the "
          "ratio is taken round by round: median [min, max].", "",
          f"scikit-learn stopped early (fewer than k atoms, float32 near-dependence) on {int((~full).sum())} targets.", "",
          "| solver | s | ms/target | vs scikit-learn median [min, max] | identical supports (all / where scikit-learn gave k) |",
          "|---|---|---|---|---|",
          f"| scikit-learn orthogonal_mp (CPU) | {t_sk:.1f} (scaled from {S}) | {1e3 * t_sk / B:.1f} | 1.0x | - |"]
    for name, r in rows.items():
        md.append(f"| nha sparse_decompose {name} ({args.device}) | {r['seconds']:.1f} | {r['ms_per_target']:.1f} | "
                  f"{fmt(r['ratio_vs_sklearn_spread'], 1)}x | {r['same_support_fraction']:.1%} / "
                  f"{r['same_support_fraction_where_sklearn_gave_k']:.1%} |")
    if result["all_pairs"]:
        a = result["all_pairs"]
        md += ["", f"All {a['pairs_total']} RN50x16 pairs on {args.device}: {a['seconds_all_pairs']:.1f} s"
               + (" (extrapolated)" if a["extrapolated"] else "")]
    write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
