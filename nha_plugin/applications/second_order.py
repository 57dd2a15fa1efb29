"""Second-order neuron experiments on a CLIP-ViT (docs/methods.md §3): statistics on generated scenes, zero-shot
accuracy under ablations, neuron-map segmentation, neuron descriptions and adversarial words, and their report.

The maths (directions, coefficients, streamed statistics, exact ablations) lives in
:mod:`nha_plugin.vit.second_order`; ``nha neurons`` (:mod:`nha_plugin.cli.neurons`) only parses and orchestrates.

    stats = scene_statistics(spec, [layer], 2000, k=100, path=stats_path(folder, [layer], 2000, 100))[layer]
    images, labels, masks = eval_scenes(500, classes)                 # held-out single-object scenes
    evaluate_ablation(spec, layer, stats, images, labels, rows)      # accuracy per ablation mode
    sel = select_segmentation_neurons({layer: stats.pc1(U)["pc1"]}, rows, top=200)
    evaluate_segmentation(spec, sel, images, masks, rows)            # pixAcc, mIoU, mAP

Data protocol: statistics on generated scenes of seed :data:`STATS_SEED` (the training distribution);
evaluation on single-object scenes of seed :data:`EVAL_SEED` with exact object masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import files
from ..markup import md_cell, md_row
from ..vit.inputs import images_to_input

__all__ = ["STATS_SEED", "EVAL_SEED", "stats_path", "scene_statistics", "eval_scenes", "zero_shot_logits",
           "evaluate_ablation", "select_segmentation_neurons", "random_neurons", "evaluate_segmentation",
           "run_adversarial", "describe_layer", "pc_summary", "markdown_report"]

STATS_SEED = 424242
EVAL_SEED = 12345


# ---- data -------------------------------------------------------------------------------------------------
def _model_input(images: np.ndarray, spec) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, H, W) input of the spec's model (its size, dtype and device)."""
    return images_to_input(images, spec.image_size, spec.dtype, spec.device)


def stats_path(folder: Union[str, Path], layers: Sequence[int], n_images: int, k: int) -> Path:
    """The checkpoint file of :func:`scene_statistics` for these layers and sizes in a statistics folder."""
    return Path(folder) / f"layers{'-'.join(map(str, sorted(set(layers))))}_n{n_images}_k{k}.safetensors"


def scene_statistics(spec, layers: Sequence[int], n_images: int, *, k: int = 100, batch_size: int = 32,
                     path: Union[str, Path, None] = None, fresh: bool = False, progress: bool = True) -> dict:
    """layer -> :class:`~nha_plugin.vit.second_order.SecondOrderStats` on ``n_images`` generated scenes of seed
    :data:`STATS_SEED`, all layers from one streamed pass (:func:`~nha_plugin.vit.second_order.collect_second_order`;
    with ``path`` a keyed checkpoint that a killed run resumes, ``fresh`` discards it).

    Args:
        spec: ``vit.vit_spec(model)``; layers: the neurons' layers (0..L-2); n_images: scenes.
        k, batch_size, progress: as ``collect_second_order``.

    Returns:
        dict layer -> SecondOrderStats.

    Raises:
        runs.RunMismatchError: ``path`` holds statistics of other settings or weights.
        files.CorruptFileError: ``path`` is damaged or not a checkpoint.
    """
    from ..scenes import SceneDataset
    from ..vit.second_order import collect_second_order
    scenes = SceneDataset(n_images, seed=STATS_SEED)

    def images(s, e):
        return _model_input(np.stack([scenes[i].image for i in range(s, e)]), spec)
    return collect_second_order(spec, sorted(set(layers)), images, n_images, batch_size=batch_size, k=k, path=path,
                                fresh=fresh, progress=progress, dataset_id=f"scenes:{STATS_SEED}")


def eval_scenes(n: int, classes: Sequence[str]):
    """Single-object held-out scenes (seed :data:`EVAL_SEED`): images (N, 224, 224, 3) uint8, labels (N,) indices
    into ``classes``, masks (N, 224, 224) bool."""
    from ..scenes import SceneDataset
    scenes = list(SceneDataset(n, seed=EVAL_SEED, n_objects=1))
    images = np.stack([s.image for s in scenes])
    labels = np.array([list(classes).index(s.objects[0].name) for s in scenes])
    masks = np.stack([s.objects[0].mask for s in scenes])
    return images, labels, masks


def zero_shot_logits(outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cosine logits (B, C) of embeddings (B, D) against unit class rows (D, C), float64."""
    return F.normalize(outputs.double(), dim=-1) @ rows.double()


def _predict(outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return zero_shot_logits(outputs, rows).argmax(dim=1)


# ---- evaluations ------------------------------------------------------------------------------------------
def evaluate_ablation(spec, layer: int, stats, images: np.ndarray, labels: np.ndarray, rows: torch.Tensor,
                      batch_size: int = 32, progress: bool = False) -> dict:
    """Zero-shot accuracy with the layer's second-order effects kept, mean-ablated, kept only where significant,
    or reconstructed from PC1 (all exact under frozen statistics, see ``ablated_embeddings``).

    Args:
        spec: ``vit.vit_spec(model)``; layer: the neurons' layer; stats: its ``SecondOrderStats``.
        images: (N, S, S, 3) uint8; labels: (N,) class indices; rows: (D, C) unit class embeddings.
        batch_size, progress: images per trace, tqdm bar.

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
            tr = vit_trace(spec, _model_input(images[s:s + batch_size], spec))
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


def random_neurons(pcs: Dict[int, torch.Tensor], selected: List[List[tuple]], seed: int = 0) -> List[List[tuple]]:
    """A control for :func:`select_segmentation_neurons`: per class, as many (layer, neuron) pairs of the same
    layers drawn at random (``torch.randperm`` seeded with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    owners = [(lay, n) for lay, pc in pcs.items() for n in range(pc.shape[0])]
    return [[owners[i] for i in torch.randperm(len(owners), generator=g)[:len(sel)].tolist()] for sel in selected]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def evaluate_segmentation(spec, selected: List[List[tuple]], images: np.ndarray, masks: np.ndarray,
                          rows: torch.Tensor, batch_size: int = 32, control: Optional[List[List[tuple]]] = None,
                          heads_baseline: bool = True, plot_path: Optional[Path] = None,
                          progress: bool = False) -> dict:
    """Neuron-map segmentation (docs/methods.md §3): at the predicted class, the mean of the selected neurons'
    activation maps (patch tokens), upsampled bilinearly to the mask, min-max normalised, thresholded at 0.5.

    Args:
        selected: per class, [(layer, neuron)] from :func:`select_segmentation_neurons`.
        images: (N, S, S, 3) uint8; masks: (N, S', S') bool foreground.
        control: an alternative neuron selection scored the same way (e.g. random neurons).
        heads_baseline: also score the TextSpan head-token map of docs/methods.md §2 on the same images (every
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
    selections = {"neurons": selected, **({"control": control} if control is not None else {})}
    counts: Dict[str, list] = {k: [] for k in [*selections, "neurons_mean_threshold"] + (["heads_textspan"] if
                                                                                           heads_baseline else [])}
    shown = []

    def up(heat, shape):
        return F.interpolate(heat.double()[None, None], size=shape, mode="bilinear",
                             align_corners=False)[0, 0].cpu().numpy()
    for s in tqdm(range(0, len(images), batch_size), desc="segmentation", disable=not progress):
        x = _model_input(images[s:s + batch_size], spec)
        with torch.no_grad():
            tr = vit_trace(spec, x)
            spatial = (vit_decompose(spec, x).scores(rows.to(spec.device, spec.dtype), level="spatial")
                       if heads_baseline else None)                             # (B, C, gh, gw)
        pred = _predict(tr.output.cpu(), rows).tolist()
        for b, p in enumerate(pred):
            mask = masks[s + b]
            row = {}
            for name, sel in selections.items():
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
        _plot_segmentation(shown, plot_path)
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
    files.save_figure(path, fig, dpi=55)
    plt.close(fig)


def run_adversarial(spec, pcs: Dict[int, torch.Tensor], codes: Dict[int, object], vocabulary: Sequence[str],
                    images: np.ndarray, labels: np.ndarray, masks: np.ndarray, rows: torch.Tensor,
                    classes: Sequence[str], *, top_neurons: int = 20, n_words: int = 2, seed: int = 0,
                    batch_size: int = 32, progress: bool = False) -> dict:
    """Adversarial word selection + compositing on held-out scenes, against random renderable words.

    For each correctly classified image the target is its runner-up class; the top ``n_words`` selected words
    the generator can render are pasted (the true object is kept), the control pastes as many random
    renderable words (class names excluded in both).

    Args:
        spec: ``vit.vit_spec(model)``.
        pcs: layer -> (M, D) unit PC1 directions; codes: layer -> their SparseCodes over ``vocabulary``.
        images: (N, S, S, 3) uint8; labels: (N,) class indices; masks: (N, S, S) bool, the object to keep.
        rows: (D, C) unit class embeddings of ``classes``.
        top_neurons, n_words: neurons kept per attack, words pasted per image.
        seed: the control's word draws and the generator's placements (``seed + image index``).
        progress: tqdm bar over the attacked images.

    Returns:
        ``{"attack", "control_random_words"}`` flip rates (:func:`~nha_plugin.applications.adversarial.flip_rates`),
        ``images_with_words`` and up to 5 ``examples``; ``{"n_correct": 0, "note"}`` when no image is correct.
    """
    from tqdm.auto import tqdm

    from ..vit import trace as vit_trace
    from .adversarial import CompositingGenerator, flip_rates, select_adversarial_words

    @torch.no_grad()
    def logits_of(ims):
        outs = [vit_trace(spec, _model_input(ims[s:s + batch_size], spec)).output.cpu()
                for s in range(0, len(ims), batch_size)]
        return zero_shot_logits(torch.cat(outs), rows)

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
    for i in tqdm(ok, desc="adversarial words", unit="image", disable=not progress):
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
    return {"attack": flip_rates(predict, orig, np.stack(attack), labels[ok], wrong),
            "control_random_words": flip_rates(predict, orig, np.stack(control), labels[ok], wrong),
            "images_with_words": int(sum(1 for a, o in zip(attack, orig) if not np.array_equal(a, o))),
            "examples": examples}

# ---- descriptions and the report --------------------------------------------------------------------------
def describe_layer(spec, stats, layer: int, words, *, k: int = 128, neurons: Sequence[int] = (), top: int = 10
                   ) -> dict:
    """OMP descriptions of a layer's neurons' PC1 (:func:`~nha_plugin.applications.adversarial.describe_neurons`).

    Args:
        stats: the layer's :class:`~nha_plugin.vit.second_order.SecondOrderStats`.
        words: a :class:`~nha_plugin.text.TextDictionary` of the same model (``text.build_dictionary``).
        k: OMP atoms per neuron (capped at D and the pool).
        neurons: these neurons; default the ``top`` by importance (mean of their top-k centred norms).

    Returns:
        ``{"k": k used, "num_texts", "neurons": [{"neuron", "importance", "explained_topk", "explained_all",
        "words": [(word, coefficient)] (8 largest), "relative_residual"}]}``.
    """
    from ..vit.second_order import second_order_directions
    from .adversarial import describe_neurons
    fit = stats.pc1(second_order_directions(spec, layer).double())
    codes, k_used = describe_neurons(fit["pc1"], words, k=k)
    importance = stats.top_norms.mean(dim=1)
    chosen = list(neurons) or importance.argsort(descending=True)[:top].tolist()
    out = []
    for n in chosen:
        out.append({"neuron": f"L{layer}N{n}", "importance": float(importance[n]),
                    "explained_topk": float(fit["explained_topk"][n]), "explained_all": float(fit["explained_all"][n]),
                    "words": [(w, round(c, 4)) for w, c in words.words(codes, n)[:8]],
                    "relative_residual": float(codes.residual_norms[n] / codes.target_norms[n])})
    return {"k": k_used, "num_texts": len(words), "neurons": out}


def pc_summary(fit: dict) -> dict:
    """Mean and median over neurons of the explained-variance shares of ``SecondOrderStats.pc1``."""
    q = lambda t: {"mean": float(t.mean()), "median": float(t.median())}  # noqa: E731
    return {"explained_topk": q(fit["explained_topk"]), "explained_all": q(fit["explained_all"]),
            "explained_all_max": q(fit["explained_all_max"])}


def markdown_report(r: dict) -> str:
    """The Markdown summary of an ``nha neurons`` result dict (the sections present in it); every user string (the
    model, the command, paths, class names and words) is escaped (:mod:`nha_plugin.markup`)."""
    weights = f" (weights sha256 {r['weights_sha256']})" if r.get("weights_sha256") else ""
    lines = [f"# Second-order effects of CLIP-ViT neurons: {md_cell(r['model'])}", "",
             f"Command: {md_cell(r['command'])}{weights}", "",
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
            lines.append(md_row([label, f"{p[key]['mean']:.3f}", f"{p[key]['median']:.3f}"]))
        lines.append("")
    if "ablation" in r:
        a = r["ablation"]
        lines += ["## Zero-shot accuracy with the layer's second-order effects replaced", "",
                  "| variant | accuracy |", "|---|---|"]
        for m, label in (("none", "unablated"), ("mean", "all mean-ablated"),
                         ("significant", "significant kept, rest mean-ablated"), ("pc1", "PC1 reconstruction")):
            lines.append(md_row([label, f"{a['accuracy'][m]:.3f}"]))
        lines += ["", f"Significant effects: {a['significant_share']:.3%} of (image, neuron) pairs; "
                      f"||sum of effects|| / ||y|| = {a['second_order_norm_over_output_norm']:.3f}.", ""]
    if "segmentation" in r:
        s = r["segmentation"]
        lines += [f"## Neuron-map segmentation ({md_cell(s['dataset'])}; layers {s['layers']}, top "
                  f"{s['top_neurons']} neurons per class)", "", "| map | pixAcc | mIoU | mAP |", "|---|---|---|---|"]
        for name, label in (("neurons", "top neurons by abs(PC1 . class row), threshold 0.5 (§C)"),
                            ("neurons_mean_threshold", "same maps, threshold at the map mean (§B)"),
                            ("control", "random neurons of the same layers, threshold 0.5"),
                            ("heads_textspan", "TextSpan head-token map, all layers (§B protocol)")):
            if name in s:
                lines.append(md_row([label, *(f"{s[name][k]:.3f}" for k in ("pixacc", "miou", "map"))]))
        lines.append("")
    if "adversarial" in r and "attack" in r["adversarial"]:
        a = r["adversarial"]
        lines += ["## Adversarial words + compositing (target: runner-up class)", "",
                  "| words | images | targeted flip | untargeted flip |", "|---|---|---|---|"]
        for name, label in (("attack", "selected from aligned neurons"), ("control_random_words", "random renderable")):
            f = a[name]
            lines.append(md_row([label, f["n_correct"], f"{f['targeted']:.3f}", f"{f['untargeted']:.3f}"]))
        examples = "; ".join(f"{e['true']}->{e['wrong']}: {', '.join(e['words']) or '(none)'}" for e in a["examples"])
        lines += ["", f"{a['images_with_words']} of {a['attack']['n_correct']} images received at least one "
                      "selected word (the others had no positive-scoring renderable word and stay unchanged).",
                  "", f"Examples: {md_cell(examples)}", ""]
    if "describe" in r:
        lines += [f"## Neuron descriptions (OMP, k={r['describe']['k']}, pool {md_cell(r['describe']['pool'])})", ""]
        for d in r["describe"]["neurons"]:
            words = ", ".join(f"{w} {c:+.2f}" for w, c in d["words"])
            lines.append(f"- {d['neuron']} (PC1 explains {d['explained_topk']:.2f}): {md_cell(words)}")
        lines.append("")
    return "\n".join(lines)
