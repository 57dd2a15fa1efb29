"""What a text dictionary costs to build: text-tower throughput, and the projected time of the paper's dictionary.

    python benchmarks/text_dictionary_cost.py                  # RN50 and RN50x16 text towers, 4 words x 80 templates, CPU
    python benchmarks/text_dictionary_cost.py --device cuda    # the same on a GPU
    python benchmarks/text_dictionary_cost.py --quick --out /tmp/tdc   # a smoke run

The paper describes units against 30,000 common words x CLIP's 80 ImageNet templates: 2.4 M text encodings. The
cost of one encoding does not depend on the weights, so the towers are built at random init (nothing is
downloaded). Each round embeds a few words with all 80 templates through the package's own path
(`text.embed_texts`, no cache: the context is cut after the longest prompt's end token, which is exact for CLIP's
causal text tower), interleaved round by round with `timing.time_interleaved`; the projection is the
dictionary's size over the measured median throughput (and over its range). The bundled
scenes-rn dictionary of the README is timed the same way, end to end through `text.build_dictionary` with a fresh
cache. Writes benchmarks/results/text_dictionary_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_blocks import publish  # noqa: E402  (benchmarks are scripts)
from timing import fmt, time_interleaved  # noqa: E402

from nha_plugin.markup import md_row  # noqa: E402
from nha_plugin.models import load_clip  # noqa: E402
from nha_plugin.text import build_dictionary, common_words, embed_texts, imagenet_templates  # noqa: E402

ROOT = Path(__file__).resolve().parent
WORDS, TEMPLATES = 30_000, 80            # the paper's dictionary


def tower(name: str, device: str):
    """A random-init open_clip model (only its text tower is timed) and its tokenizer."""
    model = open_clip.create_model(name, pretrained=None, device=device).eval()
    return model, open_clip.get_tokenizer(name)


def run(models, n_words: int, repeats: int, device: str) -> dict:
    """Throughput of each text tower on ``n_words`` words x the 80 templates, and the projected dictionary time."""
    templates = imagenet_templates()
    words = common_words(1000)[-n_words:]            # ordinary words, not the shortest most frequent ones
    batch = n_words * len(templates)
    fns = {}
    for name in models:
        model, tokenizer = tower(name, device)
        fns[name] = lambda model=model, tokenizer=tokenizer: embed_texts(model, tokenizer, words, templates,
                                                                         cache_dir=False, progress=False)
    timed = time_interleaved(fns, repeats=repeats, warmup=1, device=device)
    rows = {}
    total = WORDS * TEMPLATES
    for name, t in timed.items():
        per_text = {k: t[k] / batch for k in ("median", "min", "max")}
        rows[name] = {"seconds_per_batch": t, "texts_per_second": batch / t["median"],
                      "paper_dictionary_hours": {k: total * v / 3600 for k, v in per_text.items()}}
    model, _, tokenizer = load_clip("scenes-rn")
    with tempfile.TemporaryDirectory() as cache:
        scenes = time_interleaved({"scenes": lambda: build_dictionary(
            model, tokenizer, pool="scenes", templates="photo", cache_dir=cache, progress=False)},
            repeats=1, warmup=0, device="cpu")["scenes"]
    return {"device": device, "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
            "dictionary": {"words": WORDS, "templates": TEMPLATES, "encodings": total},
            "models": rows, "scenes_rn_dictionary_seconds": scenes}


def markdown(result: dict) -> str:
    """The results as Markdown; the ``Cost`` section feeds the README."""
    d = result["dictionary"]
    lines = ["# Text dictionary cost", "",
             f"Device {result['device']} ({result['threads']} threads); each round embeds {result['batch']} prompts "
             f"({result['batch'] // 80} words x 80 templates) through `text.embed_texts`, {result['repeats']} "
             "interleaved rounds after a warm-up; `python benchmarks/"
             "text_dictionary_cost.py`.", "", "## Cost", "",
             md_row(["text tower", "seconds per round, median [min, max]", "prompts / s",
                     f"paper dictionary ({d['words']:,} words x {d['templates']} templates), hours"]),
             md_row(["---"] * 4)]
    for name, row in result["models"].items():
        lines.append(md_row([f"{name} (random init)", fmt(row["seconds_per_batch"], 2), f"{row['texts_per_second']:.0f}",
                             fmt(row["paper_dictionary_hours"], 1)]))
    lines += ["", f"The bundled scenes-rn dictionary of the README (22 texts, fresh cache) took "
                  f"{result['scenes_rn_dictionary_seconds']['median']:.2f} s, model already loaded. The dictionary "
                  "is cached on disk, so the cost is paid once per text tower, pool and templates."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="RN50,RN50x16", help="open_clip architectures (comma-separated)")
    parser.add_argument("--words", type=int, default=4, help="words per round, each with the 80 templates")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="RN50 only, 1 word, 1 round (smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    models = ["RN50"] if args.quick else args.models.split(",")
    n_words, repeats = (1, 1) if args.quick else (args.words, args.repeats)
    result = run(models, n_words, repeats, args.device)
    publish(args.out, "text_dictionary_cost", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
