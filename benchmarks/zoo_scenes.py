"""Zero-shot accuracy of the bundled models (scenes-rn, scenes-vit) on freshly generated held-out scenes.

    python benchmarks/zoo_scenes.py             # 1000 scenes per task, a few minutes on CPU
    python benchmarks/zoo_scenes.py --n 50 --out /tmp/zoo   # a smoke run

The evaluation is the training script's own (`nha_plugin.zoo.train_scenes_rn.evaluate`: colour of 1-object
shape scenes, shape-or-category of 1-object scenes, background of 1-3 object scenes) on a seed that neither
training nor checkpoint selection saw. Writes benchmarks/results/zoo_scenes.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_blocks import publish  # noqa: E402  (benchmarks are scripts)

from nha_plugin.markup import md_row  # noqa: E402
from nha_plugin.models import load_clip  # noqa: E402
from nha_plugin.zoo.bundled import zoo_config  # noqa: E402
from nha_plugin.zoo.train_scenes_rn import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parent
MODELS = ("scenes-rn", "scenes-vit")
HELD_OUT_SEED = 2000
TASKS = ("colour", "name", "background")
CHANCE = {"colour": 1 / 6, "name": 1 / 10, "background": 1 / 6}
LABELS = {"colour": "colour", "name": "shape or category", "background": "background"}


def run(n: int, seed: int) -> dict:
    """Each bundled model's accuracy per task on ``n`` held-out scenes per task (``seed``)."""
    rows = {}
    for name in MODELS:
        model, _, tokenizer = load_clip(name)
        start = time.perf_counter()
        with torch.no_grad():
            acc = evaluate(model, tokenizer, n=n, seed=seed, config=zoo_config(name))
        rows[name] = {**{t: acc[t] for t in TASKS}, "seconds": time.perf_counter() - start}
    return {"n_per_task": n, "seed": seed, "chance": CHANCE, "models": rows}


def markdown(result: dict) -> str:
    """The results as Markdown (a section per table, for the README's result blocks)."""
    lines = ["# Bundled models: zero-shot accuracy on held-out scenes", "",
             f"{result['n_per_task']} generated scenes per task, seed {result['seed']} (unseen in training); "
             "`python benchmarks/zoo_scenes.py`.", "", "## Accuracy", "",
             md_row(["model", "colour (6 classes)", "shape or category (10)", "background (6)"]),
             md_row(["---"] * 4)]
    for name, row in result["models"].items():
        lines.append(md_row([name] + [f"{100 * row[t]:.1f}%" for t in TASKS]))
    lines += ["", "Chance: " + ", ".join(f"{LABELS[t]} {100 * c:.1f}%" for t, c in result["chance"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="scenes per task (default 1000)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="held-out scene seed (default 2000)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder for zoo_scenes.{json,md}")
    args = parser.parse_args(argv)
    result = run(args.n, args.seed)
    publish(args.out, "zoo_scenes", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
