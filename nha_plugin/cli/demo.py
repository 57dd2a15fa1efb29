"""``nha demo``: decompose a few held-out scenes (or photos) with the bundled model, print the top heads and pairs
with the exact completeness error, and save a heat-map PNG and a JSON summary."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..files import save_figure, write_json
from .common import check_output_folder, command_help, load_model, non_negative_int, positive_int

__all__ = ["add_parser", "run", "demo"]

PHOTO_CLASSES = {"astronaut": "astronaut", "chelsea": "cat", "coffee": "coffee cup", "rocket": "rocket",
                 "stereo_motorcycle": "motorcycle"}


def _scene_batch(n: int, seed: int):
    """Held-out generated scenes: images (N, 224, 224, 3) uint8, the object to explain, its mask, class names."""
    from ..scenes import CATEGORIES, SHAPES, SceneDataset
    classes = list(SHAPES) + list(CATEGORIES)
    images, names, masks, truths = [], [], [], []
    for scene in SceneDataset(n, seed=seed):
        obj = max(scene.objects, key=lambda o: o.mask.sum())
        images.append(scene.image)
        names.append(obj.name)
        masks.append(obj.mask)
        truths.append(scene.captions[-1])
    return np.stack(images), names, masks, truths, classes


def _photo_batch(n: int):
    """scikit-image's bundled photos, centre-cropped and resized to 224 px."""
    from PIL import Image
    from skimage import data
    images, names = [], []
    for loader, label in list(PHOTO_CLASSES.items())[:n]:
        img = getattr(data, loader)()
        img = img[0] if isinstance(img, tuple) else img
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        side = min(img.shape[:2])
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((224, 224), Image.BICUBIC)
        images.append(np.asarray(crop))
        names.append(label)
    return np.stack(images), names, [None] * len(names), names, sorted(set(PHOTO_CLASSES.values()))


def _to_tensor(images: np.ndarray, preprocess) -> torch.Tensor:
    from PIL import Image
    return torch.stack([preprocess(Image.fromarray(im)) for im in images])


def _plot(images, maps, masks, titles, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 5.0), squeeze=False)
    for i in range(n):
        up = F.interpolate(maps[i][None, None].float(), size=images[i].shape[:2], mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        lim = float(np.abs(up).max()) or 1.0
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(titles[i], fontsize=8)
        axes[1, i].imshow(images[i])
        axes[1, i].imshow(up, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.6)
        if masks[i] is not None:
            axes[1, i].contour(masks[i], levels=[0.5], colors="k", linewidths=0.8)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("NAD spatial map\n(red +, blue -)", fontsize=8)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)


def _explain(nad, head, x, i, ti, names, truths, masks, classes, probs, maps) -> dict:
    """One image's summary row: logit, exact completeness, top heads and pairs, map mass inside the object."""
    xi = x[i:i + 1]
    spatial, delta = nad.attribute(xi, target=ti, granularity="spatial", return_convergence_delta=True)
    heads = nad.attribute(xi, target=ti, granularity="head")[0]
    pairs = nad.attribute(xi, target=ti, granularity="pair")[0]
    top_pairs = torch.topk(pairs.flatten(), 5).indices
    C = pairs.shape[1]
    row = {
        "image": i, "truth": truths[i], "explained_class": names[i],
        "predicted": classes[int(probs[i].argmax())], "p_explained": float(probs[i, ti]),
        "logit": float(head(xi)[0, ti]), "completeness_abs_error": float(delta.abs().max()),
        "top_heads": [(f"H{int(h)}", float(heads[h])) for h in torch.topk(heads, 3).indices],
        "top_pairs": [(f"H{int(p) // C}N{int(p) % C}", float(pairs.flatten()[p])) for p in top_pairs],
    }
    if masks[i] is not None:
        up = torch.nn.functional.interpolate(spatial.float(), size=masks[i].shape, mode="bilinear",
                                             align_corners=False)[0, 0].clamp(min=0).numpy()
        row["positive_mass_in_mask"] = float(up[masks[i]].sum() / max(up.sum(), 1e-12))
        row["mask_area_fraction"] = float(masks[i].mean())
    maps.append(spatial[0, 0])
    return row


def demo(model_name: str = "scenes-rn", n: int = 6, out: str = "demo_out", seed: int = 12345,
         quiet: bool = False) -> dict:
    """Decompose ``n`` images with the exact neuron x head decomposition; print a summary, save a PNG + JSON.

    Args:
        model_name: ``scenes-rn`` (held-out generated scenes) or an open_clip CLIP-ResNet (scikit-image photos).
        n: images to decompose (at most 5 photos).
        out: output folder for ``nad_heatmaps.png`` and ``summary.json``.
        seed: the scenes' seed.
        quiet: no progress bar.

    Returns:
        The summary written to ``summary.json``.
    """
    from tqdm.auto import tqdm

    from ..attribution import NeuronHeadAttribution
    from ..harness import ZeroShotClassifier

    model, preprocess, tokenizer = load_model(model_name, family="resnet")
    if model_name == "scenes-rn":
        images, names, masks, truths, classes = _scene_batch(n, seed)
        note = "held-out generated scenes (seed %d)" % seed
    else:
        images, names, masks, truths, classes = _photo_batch(n)
        note = "scikit-image photos; random-init weights explain nothing real" if model_name == "RN50" else "photos"
    x = _to_tensor(images, preprocess)
    head = ZeroShotClassifier(model, tokenizer, classes, templates=("a photo of a {}.", "a {}."))
    nad = NeuronHeadAttribution(head)
    with torch.no_grad():
        probs = head(x).softmax(-1)
    target = torch.tensor([classes.index(nm) for nm in names])
    spec = nad.spec
    print(f"nha demo: {model_name} ({spec.source}; H={spec.num_heads} heads x C={spec.num_neurons} neurons, "
          f"D={spec.output_dim}) on {len(x)} {note}")
    rows, maps = [], []
    with torch.no_grad():
        for i in tqdm(range(len(x)), desc="decomposing", disable=quiet):
            rows.append(_explain(nad, head, x, i, int(target[i]), names, truths, masks, classes, probs, maps))
    for r in rows:
        mass = (f" | positive map mass inside the object: {r['positive_mass_in_mask']:.0%} "
                f"(object covers {r['mask_area_fraction']:.0%})") if "positive_mass_in_mask" in r else ""
        print(f"\n[{r['image']}] {r['truth']!r}: explaining {r['explained_class']!r} (p={r['p_explained']:.2f}, "
              f"predicted {r['predicted']!r}), logit {r['logit']:.3f}, "
              f"completeness error {r['completeness_abs_error']:.1e}")
        print("    top heads: " + ", ".join(f"{h} {v:+.3f}" for h, v in r["top_heads"]))
        print("    top pairs: " + ", ".join(f"{p} {v:+.3f}" for p, v in r["top_pairs"]) + mass)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "nad_heatmaps.png"
    _plot(images, maps, masks, [f"{r['explained_class']} ({r['p_explained']:.2f})" for r in rows], png)
    summary = {"model": model_name, "images": note, "classes": classes, "results": rows}
    write_json(out_dir / "summary.json", summary)
    worst = max(r["completeness_abs_error"] for r in rows)
    print(f"\nmax completeness error over {len(rows)} images: {worst:.2e} (logit units, float32)")
    print(f"heat maps: {png}\nsummary:   {out_dir / 'summary.json'}")
    return summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("demo", help=command_help("demo"), description=command_help("demo"))
    p.add_argument("--model", default="scenes-rn", help="scenes-rn (bundled; held-out generated scenes) or an "
                   "open_clip CLIP-ResNet, e.g. RN50 (scikit-image photos)")
    p.add_argument("--n", type=positive_int, default=6, help="number of images (at most 5 photos)")
    p.add_argument("--seed", type=non_negative_int, default=12345, help="scene seed, held out from training")
    p.add_argument("--out", default="demo_out", help="output folder for the PNG and JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``demo`` command; returns 0."""
    check_output_folder("--out", args.out)
    demo(args.model, args.n, args.out, args.seed, args.quiet)
    return 0
