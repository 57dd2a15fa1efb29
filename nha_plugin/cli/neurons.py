"""``nha neurons``: second-order effects of CLIP-ViT MLP neurons (METHODS.md §C) on a model and a dataset.

    nha neurons stats       --model scenes-vit --layer 1 --n-images 2000         # streamed, resumable
    nha neurons describe    --model scenes-vit --layer 1 --top 10 --omp-k 128    # OMP words of each PC1
    nha neurons ablate      --model scenes-vit --layer 1 --eval-images 500       # zero-shot accuracy
    nha neurons segment     --model scenes-vit --seg-layers 0 1 2 --top-neurons 200 [--imagenet-seg FILE]
    nha neurons adversarial --model scenes-vit --eval-images 500                 # word selection + compositing
    nha neurons all         --model scenes-vit --out benchmarks/results/second_order_vit   # everything, JSON+MD

Statistics (mean, top-k centred norms, PC1, significance threshold) are computed on held-out generated scenes
(seed 424242, the training distribution) and cached per layer under ``--stats-dir``; an interrupted run
resumes. Evaluation uses single-object scenes (seed 12345) with exact object masks; the zero-shot classes are
the 5 shapes and 5 photo categories of the scenes (``"a photo of a {}."``). ``--imagenet-seg gtsegs_ijcv.mat``
runs the segmentation on ImageNet-Segmentation instead (METHODS.md §B protocol; needs h5py and a model whose
classes are ImageNet's: pass ``--classes imagenet``).

Wire into the ``nha`` parser with :func:`add_parser` and dispatch with :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import standalone_main

__all__ = ["add_parser", "run", "main", "ACTIONS", "evaluate_ablation",
           "select_segmentation_neurons", "evaluate_segmentation", "run_adversarial", "STATS_SEED", "EVAL_SEED"]

ACTIONS = ("stats", "describe", "ablate", "segment", "adversarial", "all")
STATS_SEED = 424242
EVAL_SEED = 12345
DEFAULT_MODEL = "scenes-vit"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``neurons`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("neurons", help="second-order effects of CLIP-ViT neurons (stats, describe, "
                                              "ablate, segment, adversarial)",
                              description=__doc__.split("\n\nWire")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=ACTIONS, help="what to run ('all': everything, written to --out)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="scenes-vit (bundled) or an open_clip ViT name")
    p.add_argument("--pretrained", default=None, help="open_clip tag or weights file")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64"), help="model dtype")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose neurons are studied (default L-3, the paper's layer 9 of 12 analogue)")
    p.add_argument("--seg-layers", type=int, nargs="+", default=None,
                   help="layers for segmentation and adversarial words (default L-4..L-2, the paper's 8-10)")
    p.add_argument("--n-images", type=int, default=2000, help="scenes for the statistics")
    p.add_argument("--k", type=int, default=100, help="top images per neuron (PC1 fit, significance threshold)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-images", type=int, default=500, help="held-out single-object scenes for evaluation")
    p.add_argument("--stats-dir", default=None, help="statistics cache (default ./nha_neurons/<model>)")
    p.add_argument("--pool", default=None, help="word pool for OMP (default: scenes for scenes-vit, else words)")
    p.add_argument("--templates", default="photo", help="templates for the word pool (photo | imagenet | none)")
    p.add_argument("--omp-k", type=int, default=128, help="OMP atoms per neuron (capped at D and the pool)")
    p.add_argument("--top", type=int, default=10, help="describe: neurons shown (by importance)")
    p.add_argument("--neuron", type=int, action="append", default=[], help="describe: these neurons (repeatable)")
    p.add_argument("--top-neurons", type=int, default=200, help="segment: neurons per class")
    p.add_argument("--imagenet-seg", default=None, help="segment: gtsegs_ijcv.mat instead of scenes")
    p.add_argument("--classes", default="scenes", help="scenes (shapes + photo categories) | imagenet")
    p.add_argument("--adv-neurons", type=int, default=20, help="adversarial: aligned neurons kept")
    p.add_argument("--adv-words", type=int, default=2, help="adversarial: words pasted per image")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--seed", type=int, default=0, help="torch seed before loading (random-init models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---- loading & data --------------------------------------------------------------------------------------
def _load_model(name: str, pretrained: Optional[str], device: str, precision: str):
    """(model, tokenizer); a seam tests replace with a tiny model. For a bundled model (``scenes-vit``),
    ``pretrained`` may name another weights file of the same architecture (e.g. a training run's export)."""
    import nha_plugin as nha
    from ..models import PRECISIONS
    from ..zoo._zoo import MODELS, load_zoo_model
    if name in MODELS and pretrained is not None:
        model, _, tokenizer = load_zoo_model(name, weights=pretrained)
        return model.to(device=device, dtype=PRECISIONS[precision]).eval(), tokenizer
    model, _, tokenizer = nha.load_clip(name, pretrained=pretrained, device=device, precision=precision)
    return model, tokenizer


def _to_tensor(images: np.ndarray, spec) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> the model's input: CLIP normalisation, resized to the model's size if it differs."""
    from ..zoo._zoo import images_to_tensor
    x = images_to_tensor(images)
    if tuple(x.shape[-2:]) != tuple(spec.image_size):
        x = F.interpolate(x, size=tuple(spec.image_size), mode="bilinear", align_corners=False, antialias=True)
    return x.to(spec.device, spec.dtype)


def _classes(which: str) -> List[str]:
    if which == "imagenet":
        from ..text.pools import imagenet_classes
        return imagenet_classes()
    if which != "scenes":
        raise SystemExit(f"nha neurons: --classes must be scenes or imagenet; got {which!r}")
    from ..scenes import CATEGORIES, SHAPES
    return [*SHAPES, *CATEGORIES]


def _eval_set(n: int, classes: Sequence[str]):
    """Single-object held-out scenes: images (N, 224, 224, 3), labels (N,), masks (N, 224, 224)."""
    from ..scenes import SceneDataset
    scenes = list(SceneDataset(n, seed=EVAL_SEED, n_objects=1))
    images = np.stack([s.image for s in scenes])
    labels = np.array([classes.index(s.objects[0].name) for s in scenes])
    masks = np.stack([s.objects[0].mask for s in scenes])
    return images, labels, masks


def _layer_stats(spec, layers: Sequence[int], args) -> dict:
    """layer -> SecondOrderStats on the statistics scenes, all layers from one pass (cached, resumable)."""
    from ..scenes import SceneDataset
    from ..vit.second_order import collect_second_order
    layers = sorted(set(layers))
    scenes = SceneDataset(args.n_images, seed=STATS_SEED)
    path = Path(args.stats_dir) / f"layers{'-'.join(map(str, layers))}_n{args.n_images}_k{args.k}.pt"

    def images(s, e):
        return _to_tensor(np.stack([scenes[i].image for i in range(s, e)]), spec)
    return collect_second_order(spec, layers, images, args.n_images, batch_size=args.batch_size, k=args.k,
                                path=path, progress=not args.quiet, dataset_id=f"scenes:{STATS_SEED}")


def _weights_hash(name: str, pretrained: Optional[str]) -> Optional[str]:
    """sha256 (first 16 hex digits) of the weights file a result came from, when there is one."""
    import hashlib

    from ..zoo._zoo import MODELS, weights_path, zoo_config
    path = Path(pretrained) if pretrained and Path(pretrained).is_file() else (
        weights_path(zoo_config(name)) if name in MODELS else None)
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _predict(outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (F.normalize(outputs.double(), dim=-1) @ rows.double()).argmax(dim=1)


# ---- evaluations ------------------------------------------------------------------------------------------
def evaluate_ablation(spec, layer: int, stats, images: np.ndarray, labels: np.ndarray, rows: torch.Tensor,
                      batch_size: int = 32, progress: bool = False) -> dict:
    """Zero-shot accuracy with the layer's second-order effects kept, mean-ablated, kept only where significant,
    or reconstructed from PC1 (all exact under frozen statistics, see ``ablated_embeddings``).

    Args:
        images: (N, S, S, 3) uint8; labels: (N,) class indices; rows: (D, C) unit class embeddings.

    Returns:
        accuracies per mode, the share of effects that are significant, and the mean ||sum_n phi_n|| / ||y||.
    """
    from tqdm.auto import tqdm

    from ..vit import trace as vit_trace
    from ..vit.second_order import ablated_embeddings, second_order_coefficients, second_order_directions
    U = second_order_directions(spec, layer).double()
    pc1 = stats.pc1(U)["pc1"]
    correct = {m: 0 for m in ("none", "mean", "significant", "pc1")}
    sig, rel = [], []
    for s in tqdm(range(0, len(images), batch_size), desc="ablation", disable=not progress):
        with torch.no_grad():
            tr = vit_trace(spec, _to_tensor(images[s:s + batch_size], spec))
            c = second_order_coefficients(tr, layer).to("cpu", torch.float64)
        y = tr.output.to("cpu", torch.float64)
        lab = torch.as_tensor(labels[s:s + batch_size])
        for mode in correct:
            correct[mode] += int((_predict(ablated_embeddings(y, c, U, stats, mode, pc1), rows) == lab).sum())
        sig.append(stats.significant(c, U).double().mean(dim=1))
        rel.append(torch.einsum("bmk,mkd->bd", c, U).norm(dim=1) / y.norm(dim=1))
    n = len(images)
    return {"accuracy": {m: v / n for m, v in correct.items()}, "n_images": n,
            "significant_share": float(torch.cat(sig).mean()),
            "second_order_norm_over_output_norm": float(torch.cat(rel).mean())}


def select_segmentation_neurons(pcs: Dict[int, torch.Tensor], rows: torch.Tensor, top: int) -> List[List[tuple]]:
    """Per class: the ``top`` (layer, neuron) pairs with the largest |<PC1, class row>| over the given layers."""
    flat = torch.cat([pc.double() for pc in pcs.values()]) @ rows.double()          # (sum M, C)
    owners = [(layer, n) for layer, pc in pcs.items() for n in range(pc.shape[0])]
    top = min(top, len(owners))
    idx = flat.abs().topk(top, dim=0).indices                                        # (top, C)
    return [[owners[i] for i in idx[:, c].tolist()] for c in range(rows.shape[1])]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def evaluate_segmentation(spec, selected: List[List[tuple]], images: np.ndarray, masks: np.ndarray,
                          rows: torch.Tensor, batch_size: int = 32, control: Optional[List[List[tuple]]] = None,
                          heads_baseline: bool = True, plot_path: Optional[Path] = None,
                          progress: bool = False) -> dict:
    """Neuron-map segmentation (METHODS.md §C): at the predicted class, the mean of the selected neurons'
    activation maps (patch tokens), upsampled bilinearly to the mask, min-max normalised, thresholded at 0.5.

    Args:
        selected: per class, [(layer, neuron)] from :func:`select_segmentation_neurons`.
        images: (N, S, S, 3) uint8; masks: (N, S', S') bool foreground.
        control: an alternative neuron selection scored the same way (e.g. random neurons).
        heads_baseline: also score the TextSpan head-token map of METHODS.md §B on the same images (every
            layer's and head's patch-token contributions read out by the class rows, predicted class minus
            the mean over classes, clipped, min-max, thresholded at the map's mean).
        plot_path: save a PNG of the first 5 images with their maps.

    Returns:
        ``{"neurons": {pixacc, miou, map}, "neurons_mean_threshold": ..., "control": ...,
        "heads_textspan": ...}``; the neuron maps are also scored with §B's threshold (the map's mean) so both
        selections can be compared under one protocol.
    """
    from tqdm.auto import tqdm

    from ..harness.metrics import segmentation_counts, segmentation_summary
    from ..vit import decompose as vit_decompose
    from ..vit import trace as vit_trace
    from ..vit.second_order import neuron_maps
    runs = {"neurons": selected, **({"control": control} if control is not None else {})}
    counts: Dict[str, list] = {k: [] for k in [*runs, "neurons_mean_threshold"] + (["heads_textspan"] if
                                                                                     heads_baseline else [])}
    shown = []

    def up(heat, shape):
        return F.interpolate(heat.double()[None, None], size=shape, mode="bilinear",
                             align_corners=False)[0, 0].cpu().numpy()
    for s in tqdm(range(0, len(images), batch_size), desc="segmentation", disable=not progress):
        x = _to_tensor(images[s:s + batch_size], spec)
        with torch.no_grad():
            tr = vit_trace(spec, x)
            spatial = (vit_decompose(spec, x).scores(rows.to(spec.device, spec.dtype), level="spatial")
                       if heads_baseline else None)                             # (B, C, gh, gw)
        pred = _predict(tr.output.cpu(), rows).tolist()
        for b, p in enumerate(pred):
            mask = masks[s + b]
            row = {}
            for name, sel in runs.items():
                by_layer: Dict[int, List[int]] = {}
                for layer, n in sel[p]:
                    by_layer.setdefault(layer, []).append(n)
                maps = torch.cat([neuron_maps(tr, layer, ns, spec.grid)[b] for layer, ns in by_layer.items()])
                heat = up(maps.mean(dim=0), mask.shape)
                counts[name].append(segmentation_counts(_minmax(heat), mask, threshold=0.5))
                if name == "neurons":
                    counts["neurons_mean_threshold"].append(segmentation_counts(heat, mask))
                row[name] = heat
            if spatial is not None:
                heads = up(spatial[b, p] - spatial[b].mean(dim=0), mask.shape)
                counts["heads_textspan"].append(segmentation_counts(heads, mask))
                row["heads_textspan"] = heads
            if plot_path is not None and len(shown) < 5:
                shown.append((images[s + b], mask, row))
    if plot_path is not None and shown:
        _plot_segmentation(shown, Path(plot_path))
    return {name: segmentation_summary(c) for name, c in counts.items()}


def _plot_segmentation(shown, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(shown[0][2])
    fig, axes = plt.subplots(len(keys) + 1, len(shown), figsize=(2.2 * len(shown), 2.2 * (len(keys) + 1)),
                             squeeze=False)
    for j, (image, mask, row) in enumerate(shown):
        axes[0, j].imshow(image)
        axes[0, j].contour(mask, levels=[0.5], colors="k", linewidths=0.8)
        for i, key in enumerate(keys, start=1):
            axes[i, j].imshow(image)
            axes[i, j].imshow(_minmax(np.clip(row[key], 0, None) if key == "heads_textspan" else row[key]),
                              cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i, j].contour(mask, levels=[0.5], colors="w", linewidths=0.8)
    for i, key in enumerate(["image + mask", *keys]):
        axes[i, 0].set_ylabel(key, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=55)
    plt.close(fig)
    os.replace(tmp, path)


def run_adversarial(spec, pcs: Dict[int, torch.Tensor], codes: Dict[int, object], vocabulary: Sequence[str],
                    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, rows: torch.Tensor,
                    classes: Sequence[str], *, top_neurons: int = 20, n_words: int = 2, seed: int = 0,
                    batch_size: int = 32) -> dict:
    """Adversarial word selection + compositing on held-out scenes, against random renderable words.

    For each correctly classified image the target is its runner-up class; the top ``n_words`` selected words
    the generator can render are pasted (the true object is kept), the control pastes as many random
    renderable words (class names excluded in both). Returns flip rates for both and example word lists.
    """
    from ..vit import trace as vit_trace
    from ..applications.adversarial import CompositingGenerator, flip_rates, select_adversarial_words

    @torch.no_grad()
    def logits_of(ims):
        outs = [vit_trace(spec, _to_tensor(ims[s:s + batch_size], spec)).output.cpu()
                for s in range(0, len(ims), batch_size)]
        return F.normalize(torch.cat(outs).double(), dim=-1) @ rows.double()

    def predict(ims):
        return logits_of(ims).argmax(dim=1).numpy()

    logits = logits_of(images)
    pred = logits.argmax(dim=1).numpy()
    runner_up = logits.topk(2, dim=1).indices[:, 1].numpy()
    ok = np.nonzero(pred == labels)[0]
    rng = np.random.default_rng(seed)
    gen_cache: Dict[tuple, CompositingGenerator] = {}
    attack, control, wrong, examples = [], [], [], []
    base_words = [w for w in vocabulary if w not in set(classes)]
    for i in ok:
        t, w = int(labels[i]), int(runner_up[i])
        gen = gen_cache.setdefault((t, w), CompositingGenerator(max_objects=n_words,
                                                                avoid=(classes[t], classes[w])))
        sel = select_adversarial_words(pcs, codes, vocabulary, rows, t, w, top_neurons=top_neurons, exclude=classes)
        words = gen.renderable([word for word, _ in sel.words])[:n_words]
        pool = gen.renderable(base_words)
        rand = list(rng.choice(pool, size=min(len(words) or n_words, len(pool)), replace=False)) if pool else []
        attack.append(gen.generate(words, base=images[i], keep=masks[i], seed=seed + int(i)).image)
        control.append(gen.generate(rand, base=images[i], keep=masks[i], seed=seed + int(i)).image)
        wrong.append(w)
        if len(examples) < 5:
            examples.append({"image": int(i), "true": classes[t], "wrong": classes[w], "words": words,
                             "control_words": [str(x) for x in rand],
                             "neurons": [f"L{layer}N{n}" for layer, n, _ in sel.neurons[:5]]})
    if not len(ok):
        return {"n_correct": 0, "note": "no image was classified correctly; nothing to attack"}
    orig = images[ok]
    res = {"attack": flip_rates(predict, orig, np.stack(attack), labels[ok], wrong),
           "control_random_words": flip_rates(predict, orig, np.stack(control), labels[ok], wrong),
           "images_with_words": int(sum(1 for a, o in zip(attack, orig) if not np.array_equal(a, o))),
           "examples": examples}
    return res


# ---- the command ------------------------------------------------------------------------------------------
def _describe(spec, stats, layer, args, model, tokenizer) -> dict:
    from ..text.describe import build_dictionary
    from ..vit.second_order import second_order_directions
    from ..applications.adversarial import describe_neurons
    U = second_order_directions(spec, layer).double()
    fit = stats.pc1(U)
    words = build_dictionary(model, tokenizer, args.pool, args.templates, cache_dir=None, progress=not args.quiet)
    codes, k_used = describe_neurons(fit["pc1"], words, k=args.omp_k)
    importance = stats.top_norms.mean(dim=1)
    chosen = args.neuron or importance.argsort(descending=True)[:args.top].tolist()
    out = []
    for n in chosen:
        out.append({"neuron": f"L{layer}N{n}", "importance": float(importance[n]),
                    "explained_topk": float(fit["explained_topk"][n]), "explained_all": float(fit["explained_all"][n]),
                    "words": [(w, round(c, 4)) for w, c in words.words(codes, n)[:8]],
                    "relative_residual": float(codes.residual_norms[n] / codes.target_norms[n])})
    return {"k": k_used, "pool": args.pool, "num_texts": len(words), "neurons": out}, words, codes


def _pc_summary(fit: dict) -> dict:
    q = lambda t: {"mean": float(t.mean()), "median": float(t.median())}  # noqa: E731
    return {"explained_topk": q(fit["explained_topk"]), "explained_all": q(fit["explained_all"]),
            "explained_all_max": q(fit["explained_all_max"])}


def _write(out: str, result: dict) -> None:
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    js = base.with_suffix(".json")
    tmp = js.with_name(js.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, js)
    md = base.with_suffix(".md")
    tmp = md.with_name(md.name + f".{os.getpid()}.tmp")
    tmp.write_text(_markdown(result))
    os.replace(tmp, md)


def _markdown(r: dict) -> str:
    lines = [f"# Second-order effects of CLIP-ViT neurons: {r['model']}", "",
             f"Command: `{r['command']}`" + (f" (weights sha256 {r['weights_sha256']})" if r.get("weights_sha256")
                                               else ""), "",
             f"Layer {r['layer']} (of {r['layers']}), M={r['neurons']} neurons, K={r['K']} later heads; statistics "
             f"on {r['n_images']} generated scenes (seed {STATS_SEED}), k={r['k']}; evaluation on "
             f"{r.get('eval_images', 0)} held-out single-object scenes (seed {EVAL_SEED}). "
             f"Wall time {r['seconds']:.0f} s.", ""]
    if "pc1" in r:
        p = r["pc1"]
        lines += ["## PC1 explained variance (per neuron, mean / median)", "",
                  "| fit | mean | median |", "|---|---|---|"]
        for key, label in (("explained_topk", "top-k centred effects, along the top-k PC1 (paper's number)"),
                           ("explained_all", "all images, along the top-k PC1"),
                           ("explained_all_max", "all images, along the all-image PC1")):
            lines.append(f"| {label} | {p[key]['mean']:.3f} | {p[key]['median']:.3f} |")
        lines.append("")
    if "ablation" in r:
        a = r["ablation"]
        lines += ["## Zero-shot accuracy with the layer's second-order effects replaced", "",
                  "| variant | accuracy |", "|---|---|"]
        for m, label in (("none", "unablated"), ("mean", "all mean-ablated"),
                         ("significant", "significant kept, rest mean-ablated"), ("pc1", "PC1 reconstruction")):
            lines.append(f"| {label} | {a['accuracy'][m]:.3f} |")
        lines += ["", f"Significant effects: {a['significant_share']:.3%} of (image, neuron) pairs; "
                      f"||sum of effects|| / ||y|| = {a['second_order_norm_over_output_norm']:.3f}.", ""]
    if "segmentation" in r:
        s = r["segmentation"]
        lines += [f"## Neuron-map segmentation ({s['dataset']}; layers {s['layers']}, top {s['top_neurons']} "
                  "neurons per class)", "", "| map | pixAcc | mIoU | mAP |", "|---|---|---|---|"]
        for name, label in (("neurons", "top neurons by abs(PC1 . class row), threshold 0.5 (§C)"),
                            ("neurons_mean_threshold", "same maps, threshold at the map mean (§B)"),
                            ("control", "random neurons of the same layers, threshold 0.5"),
                            ("heads_textspan", "TextSpan head-token map, all layers (§B protocol)")):
            if name in s:
                lines.append(f"| {label} | {s[name]['pixacc']:.3f} | {s[name]['miou']:.3f} | {s[name]['map']:.3f} |")
        lines.append("")
    if "adversarial" in r and "attack" in r["adversarial"]:
        a = r["adversarial"]
        lines += ["## Adversarial words + compositing (target: runner-up class)", "",
                  "| words | images | targeted flip | untargeted flip |", "|---|---|---|---|"]
        for name, label in (("attack", "selected from aligned neurons"), ("control_random_words", "random renderable")):
            f = a[name]
            lines.append(f"| {label} | {f['n_correct']} | {f['targeted']:.3f} | {f['untargeted']:.3f} |")
        lines += ["", f"{a['images_with_words']} of {a['attack']['n_correct']} images received at least one "
                      "selected word (the others had no positive-scoring renderable word and stay unchanged).",
                  "", "Examples: " + "; ".join(f"{e['true']}->{e['wrong']}: {', '.join(e['words']) or '(none)'}"
                                               for e in a["examples"]), ""]
    if "describe" in r:
        lines += [f"## Neuron descriptions (OMP, k={r['describe']['k']}, pool {r['describe']['pool']})", ""]
        for d in r["describe"]["neurons"]:
            lines.append(f"- {d['neuron']} (PC1 explains {d['explained_topk']:.2f}): "
                         + ", ".join(f"{w} {c:+.2f}" for w, c in d["words"]))
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    """Execute a parsed ``neurons`` command."""
    from ..readout import ZeroShotClassifier
    from ..vit import vit_spec
    from ..vit.second_order import second_order_directions
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args.model, args.pretrained, args.device, args.precision)
    spec = vit_spec(model)
    L = spec.layers
    if L < 2:
        raise SystemExit(f"nha neurons: the model has {L} layer; second-order effects need at least 2")
    layer = args.layer if args.layer is not None else max(0, L - 3)
    seg_layers = args.seg_layers if args.seg_layers is not None else list(range(max(0, L - 4), L - 1))
    for lay in [layer, *seg_layers]:
        if not 0 <= lay < L - 1:
            raise SystemExit(f"nha neurons: layer {lay} has no later attention layer; use 0..{L - 2}")
    if args.k > args.n_images:
        raise SystemExit(f"nha neurons: --k {args.k} exceeds --n-images {args.n_images}")
    act = args.action
    needs_scenes = act in ("ablate", "adversarial", "all") or (act == "segment" and not args.imagenet_seg)
    if needs_scenes and args.classes != "scenes":
        raise SystemExit("nha neurons: ablation, adversarial images and scene segmentation are evaluated on "
                         "generated scenes, labelled with the scenes classes: use --classes scenes (or "
                         "segment --imagenet-seg FILE --classes imagenet)")
    args.stats_dir = args.stats_dir or str(Path("nha_neurons") / args.model.replace("/", "_"))
    args.pool = args.pool or ("scenes" if args.model == "scenes-vit" else "words")
    classes = _classes(args.classes)
    rows = ZeroShotClassifier(model, tokenizer, classes, templates=("a photo of a {}.",)).readout.detach().cpu()
    cmd = getattr(args, "command_line", None)
    result = {"model": args.model, "command": "nha neurons " + " ".join(sys.argv[2:] if cmd is None else cmd),
              "layers": L, "layer": layer, "neurons": spec.mlp_width, "K": (L - layer - 1) * spec.heads,
              "n_images": args.n_images, "k": args.k, "classes": classes}
    result["weights_sha256"] = _weights_hash(args.model, args.pretrained)
    needed = [layer] + (seg_layers if act in ("segment", "adversarial", "all") else [])
    all_stats = _layer_stats(spec, needed, args)
    stats = all_stats[layer]
    U = second_order_directions(spec, layer).double()
    fit = stats.pc1(U)
    result["pc1"] = _pc_summary(fit)
    if act == "stats":
        print(f"layer {layer}: {stats.count} images, k={stats.k}; PC1 explains (mean over neurons) "
              f"{result['pc1']['explained_topk']['mean']:.3f} of the top-k centred effects, "
              f"{result['pc1']['explained_all']['mean']:.3f} of all images' variance; stats in {args.stats_dir}")
    if act in ("describe", "all"):
        result["describe"] = _describe(spec, stats, layer, args, model, tokenizer)[0]
        if act == "describe":
            for d in result["describe"]["neurons"]:
                print(f"{d['neuron']:>10} [PC1 {d['explained_topk']:.2f}; residual {d['relative_residual']:.2f}] "
                      + ", ".join(f"{w} ({c:+.2f})" for w, c in d["words"]))
    if needs_scenes:
        images, labels, masks = _eval_set(args.eval_images, classes)
        result["eval_images"] = len(images)
    if act in ("ablate", "all"):
        result["ablation"] = evaluate_ablation(spec, layer, stats, images, labels, rows, args.batch_size,
                                               progress=not args.quiet)
        if act == "ablate":
            print(json.dumps(result["ablation"], indent=1))
    if act in ("segment", "adversarial", "all"):
        pcs = {}
        for lay in seg_layers:
            pcs[lay] = all_stats[lay].pc1(second_order_directions(spec, lay).double())["pc1"]
    if act in ("segment", "all"):
        if args.imagenet_seg:
            from ..datasets.imagenet_s import load_imagenet_segmentation
            seg_images, seg_masks = load_imagenet_segmentation(args.imagenet_seg, n=args.eval_images,
                                                               size=int(spec.image_size[0]))
            dataset = f"ImageNet-Segmentation ({len(seg_images)} images)"
        else:
            seg_images, seg_masks, dataset = images, masks, f"scenes, object masks ({len(images)} images)"
        selected = select_segmentation_neurons(pcs, rows, args.top_neurons)
        g = torch.Generator().manual_seed(args.seed)
        owners = [(lay, n) for lay, pc in pcs.items() for n in range(pc.shape[0])]
        control = [[owners[i] for i in torch.randperm(len(owners), generator=g)[:len(sel)].tolist()]
                   for sel in selected]
        plot = Path(args.out).with_name(Path(args.out).name + "_segmentation.png") if args.out else None
        seg = evaluate_segmentation(spec, selected, seg_images, seg_masks, rows, args.batch_size, control,
                                    plot_path=plot, progress=not args.quiet)
        result["segmentation"] = {"dataset": dataset, "layers": seg_layers, "top_neurons": len(selected[0]), **seg}
        if act == "segment":
            print(json.dumps(result["segmentation"], indent=1))
    if act in ("adversarial", "all"):
        from ..text.describe import build_dictionary
        from ..applications.adversarial import describe_neurons
        words = build_dictionary(model, tokenizer, args.pool, args.templates, progress=not args.quiet)
        codes = {lay: describe_neurons(pc, words, k=args.omp_k)[0] for lay, pc in pcs.items()}
        result["adversarial"] = {"layers": seg_layers, **run_adversarial(
            spec, pcs, codes, words.texts, images, labels, masks, rows, classes, top_neurons=args.adv_neurons,
            n_words=args.adv_words, seed=args.seed, batch_size=args.batch_size)}
        if act == "adversarial":
            print(json.dumps(result["adversarial"], indent=1))
    result["seconds"] = time.time() - t0
    if args.out:
        _write(args.out, result)
        print(f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}")
    elif act == "all":
        print(_markdown(result))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point: ``python -m nha_plugin.cli.neurons neurons ...``."""
    return standalone_main(add_parser, run, argv, record_as="command_line")


if __name__ == "__main__":
    sys.exit(main())
