"""Distribution-shift monitor on scenes-rn: NAD top-k pairs vs cos(y, t), neurons-only and heads-only, plus
dataset-level two-sample tests (MMD, classifier, KS), on the planted "years" sampler.

    python benchmarks/shift_scenes.py                    # ~10 min on 1 CPU core; resumes after a kill
    python benchmarks/shift_scenes.py --quick            # a smoke run (small n) into a scratch folder

Main runs (one per concept and seed): ``nha shift --concept C --seed S`` with the defaults below, i.e.
``scenes.years(concept, shares=(0.05, 0.15, 0.3, 0.5), n_per_group=200, seed=S)``; pair signs and
neuron/head PC0s fitted on 500 generic scenes (``SceneDataset(500, seed=424242)``, the analogue of the
paper's 1000 ImageNet images); k = 5 pairs, 5 neurons, 1 head; CLIP's 80 ImageNet templates; 500 MMD
permutations. Ablations (seed 0): signs and PC0s fitted on the reference year instead (``--fit reference``),
unsigned pairs (``--unsigned``), and k = 20 pairs.

Writes benchmarks/results/shift_scenes_rn.{json,md,png}. Each run keeps its report and its run folder
(``<name>.parts``, see ``nha shift``) under --work, so a killed benchmark resumes where it stopped; --fresh
recomputes every run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONCEPTS = ("yellow", "cat", "star")          # a colour, a photo category, a shape
SEEDS = (0, 1)
ABLATIONS = {"fit on the reference year (paper's sign rule there)": ["--fit", "reference"],
             "unsigned pairs (+1)": ["--unsigned"],
             "k = 20 pairs": ["--k", "20"]}


def _run_shift(concept: str, seed: int, work: Path, name: str, sizes: tuple, extra: list, fresh: bool,
               commands: list) -> dict:
    """Run ``nha shift`` for one concept and seed into ``work`` (resuming its saved parts unless ``fresh``), note
    the command in ``commands`` and return the run of its report.

    Args:
        sizes: (images per year, fit images, MMD permutations).
        extra: more ``nha shift`` options (the ablations).
    """
    from nha_plugin.cli.shift import main as shift_main
    from nha_plugin.files import read_json

    n, fit, perms = sizes
    cmd = ["shift", "--concept", concept, "--seed", str(seed), "--n-per-group", str(n), "--fit-images", str(fit),
           "--permutations", str(perms), "--out", str(work), "--name", name, "--quiet", *extra]
    commands.append("nha " + " ".join(cmd).replace(str(work), "WORK"))
    status = shift_main(cmd + ["--fresh"] * fresh)
    if status != 0:
        raise SystemExit(f"shift_scenes: 'nha {' '.join(cmd)}' failed (exit {status}); see the error above")
    return read_json(work / f"{name}.json")["runs"][0]


def _summary_rows(runs: list) -> list:
    rows = []
    for run in runs:
        for c, res in run["concepts"].items():
            rows.append({"concept": c, "seed": run["protocol"]["seed"], "per_image_r": res["per_image_r"],
                         "group_mean_r": res["group_mean_r"], "pairs": res["units"]["pairs"]})
    return rows


def _markdown_summary(title: str, rows: list) -> list:
    from nha_plugin.applications.shift.report import METHOD_LABELS, METHODS, fmt
    lines = [f"### {title}", "",
             "| concept | seed | " + " | ".join(f"r/image {METHOD_LABELS[m]}" for m in METHODS) + " | "
             + " | ".join(f"r/group {METHOD_LABELS[m]}" for m in METHODS) + " |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['seed']} | " + " | ".join(fmt(r["per_image_r"][m]) for m in METHODS)
                     + " | " + " | ".join(fmt(r["group_mean_r"][m]) for m in METHODS) + " |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small n, into --work only (no result files)")
    p.add_argument("--work", default=str(Path(os.environ.get("NHA_CACHE_DIR", Path.home() / ".cache" / "nha_plugin"))
                                         / "shift_scenes_rn"),
                   help="scratch folder (per-run reports and run folders, resumable)")
    p.add_argument("--out", default=str(ROOT / "results"), help="where shift_scenes_rn.{json,md,png} go")
    p.add_argument("--fresh", action="store_true", help="recompute every run (discard the saved parts in --work)")
    args = p.parse_args(argv)

    from nha_plugin.applications.shift import write_report
    from nha_plugin.files import write_text

    sizes = (24, 64, 50) if args.quick else (200, 500, 500)
    n, fit, perms = sizes
    work = Path(args.work) / ("quick" if args.quick else "full")
    t0 = time.time()
    runs, commands = [], []
    for seed in SEEDS:
        for concept in CONCEPTS:
            name = f"{concept}-seed{seed}"
            runs.append(_run_shift(concept, seed, work, name, sizes, [], args.fresh, commands))
    ablations = {}
    for title, extra in ABLATIONS.items():
        found = []
        for concept in CONCEPTS:
            name = f"{concept}-seed0-{'-'.join(e.strip('-') for e in extra)}"
            found.append(_run_shift(concept, 0, work, name, sizes, extra, args.fresh, commands))
        ablations[title] = {"protocol": found[0]["protocol"], "rows": _summary_rows(found)}
    seconds = time.time() - t0
    if args.quick:
        print(f"quick run done in {seconds:.0f} s; results under {work}")
        return 0

    protocol = {"benchmark": "python benchmarks/shift_scenes.py", "model": "scenes-rn (bundled)",
                "sampler": "nha_plugin.scenes.years(concept, shares=(0.05, 0.15, 0.3, 0.5), "
                           f"n_per_group={n}, seed=S)", "concepts": list(CONCEPTS), "seeds": list(SEEDS),
                "fit": f"SceneDataset({fit}, seed=424242) (generic scenes)", "k": "5 pairs / 5 neurons / 1 head",
                "mmd_permutations": perms, "commands (WORK = --work folder)": commands,
                "wall_seconds_last_invocation": round(seconds, 1),
                "threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    report = {"protocol": protocol, "runs": runs, "ablations": ablations}
    paths = write_report(report, args.out, "shift_scenes_rn")
    md = paths["md"].read_text().split("\n")
    summary = ["# Distribution-shift monitor on scenes-rn", ""] + _markdown_summary(
        "Summary (main runs): point-biserial r per image with presence; r of group means with the true share",
        _summary_rows(runs))
    for title, ab in ablations.items():
        summary += _markdown_summary(f"Ablation, seed 0: {title}", ab["rows"])
    write_text(paths["md"], "\n".join(summary + md) + "\n")
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
