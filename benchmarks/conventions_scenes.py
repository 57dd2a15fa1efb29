"""The conventions where the NAD paper's code and nha_plugin differ, each measured on scenes-rn (docs/conventions.md).

One set of held-out generated scenes with exact masks (:class:`nha_plugin.applications.segmentation.SceneSegmentation`,
protocol "classes": 16 classes, every pixel scored), one set of statistics scenes for the PC0 signs, the NAD
segmentor at the paper's share of pairs. Each row switches one convention away from our default and reports the NAD
mIoU and the predicted pixels that change:

- the whole paper preset (``Segmentor(preset="paper")``) against our default;
- the head maps' share of the output bias (attention, ours; uniform, the paper's code);
- where the sink cell is interpolated (the cosines, ours; the contribution vectors, the paper's code), and sink
  handling at all (interpolate against keep), with the class attention on the last token that says why it does
  nothing on scenes-rn;
- the PC0 signs (+1, ours; from data by the paper's rule), with the pairs whose sign is -1 and the exact ties;
- text centring (on, both; off);
- dtype (float32, both; float64) for the paper preset: largest logit difference and pixels changed.

    python benchmarks/conventions_scenes.py              # 100 scenes, 1000 statistics scenes
    python benchmarks/conventions_scenes.py --quick      # 8 and 60 (smoke run)

Writes benchmarks/results/conventions_scenes.json and .md (quoted in docs/conventions.md).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

import nha_plugin as nha
from nha_plugin.adapters import get_spec
from nha_plugin.applications.segmentation import (ConfusionMatrix, PRESET_DESCRIPTIONS, SceneSegmentation, Segmentor,
                                                  class_embeddings, paper_k)
from nha_plugin.applications.shift import pc0_signs
from nha_plugin.files import write_json, write_text
from nha_plugin.models import decompose
from nha_plugin.pool import class_attention, positional_embedding_for, tokens
from nha_plugin.scenes import SceneDataset
from nha_plugin.zoo import images_to_tensor

STEM = "conventions_scenes"


def statistics_images(n: int, seed: int) -> torch.Tensor:
    """The scenes the PC0 signs are fitted on, normalised as the model's preprocess does: (n, 3, 224, 224) float32."""
    scenes = SceneDataset(n, seed=seed)
    return images_to_tensor(np.stack([scenes[i].image for i in range(n)]))


@torch.no_grad()
def sign_statistics(model, images: torch.Tensor, top: int, batch: int = 50) -> Tuple[torch.Tensor, Dict[str, int]]:
    """The paper's PC0 sign of every pair from ``images`` and how often the rule meets a tie.

    Args:
        model: the CLIP model (its dtype is used).
        images: (N, 3, S, S) normalised images.
        top: images per pair (the paper: 50).
        batch: images per forward pass.

    Returns:
        ``(signs, counts)``: (H, C) of +-1 (:func:`nha_plugin.applications.shift.pc0_signs`) and ``{"pairs",
        "negative", "ties"}`` (ties: exactly top/2 of the top images above the mean, resolved to -1).
    """
    dtype = next(model.parameters()).dtype
    s = torch.cat([decompose(model, images[i:i + batch].to(dtype)).pair_coefficients
                   for i in range(0, len(images), batch)])                                      # (N, H, C)
    signs = pc0_signs(s, top=top)
    centred = s - s.mean(0)
    k = min(top, len(s))
    positive = (centred.gather(0, centred.abs().topk(k, dim=0).indices) > 0).sum(0)             # (H, C)
    return signs, {"pairs": signs.numel(), "negative": int((signs < 0).sum()), "ties": int((2 * positive == k).sum())}


@torch.no_grad()
def segment(seg: Segmentor, ds: SceneSegmentation, batch: int = 10, progress: bool = True
            ) -> Tuple[List[np.ndarray], List[torch.Tensor]]:
    """NAD class maps and sliding-window logits of every scene: ``([(H, W) int64], [(P, H', W')])``."""
    preds, logits = [], []
    for s in tqdm(range(0, len(ds), batch), desc=f"segment ({seg.preset}, {seg.bias_share}, {seg.sink_space})",
                  disable=not progress):
        images = [ds[i][0] for i in range(s, min(s + batch, len(ds)))]
        for im, lg in zip(images, seg.logits(images)):
            logits.append(lg["nad"])
            preds.append(torch.nn.functional.interpolate(lg["nad"][None], size=(im.height, im.width), mode="bilinear",
                                                         align_corners=False)[0].argmax(0).cpu().numpy())
    return preds, logits


def score(preds: List[np.ndarray], ds: SceneSegmentation, reference: List[np.ndarray]) -> dict:
    """mIoU / pixAcc of ``preds`` and the pixels where they differ from ``reference``."""
    cm = ConfusionMatrix(len(ds.prompts()), no_background=ds.no_background)
    for i, p in enumerate(preds):
        cm.update(p, ds[i][1])
    summary = cm.summary()
    changed = sum(int((p != r).sum()) for p, r in zip(preds, reference))
    return {"miou": summary["miou"], "pixacc": summary["pixacc"], "pixels_changed": changed}


@torch.no_grad()
def last_token_attention(model, ds: SceneSegmentation, seg: Segmentor) -> Dict[str, float]:
    """Class attention on the last spatial token (where a trained CLIP-ResNet keeps its sink), over the scenes."""
    spec = seg.spec
    crops = torch.stack([seg.resize(ds[i][0]) for i in range(len(ds))])
    feats = spec.trunk(crops)
    a = class_attention(spec, tokens(feats, positional_embedding_for(spec, feats.shape[-2:])))[:, :, -1]
    return {"mean": float(a.mean()), "max": float(a.max()), "uniform": 1 / (spec.grid_size ** 2 + 1)}


def measure(n: int = 100, seed: int = 20_000, stats_n: int = 1000, stats_seed: int = 30_000, top: int = 50,
            dtype: torch.dtype = torch.float32, compare_dtype: bool = True, progress: bool = True
            ) -> Tuple[dict, dict]:
    """Every convention switched on its own on the same scenes (see the module docstring).

    Args:
        n, seed: evaluation scenes. stats_n, stats_seed, top: the PC0-sign statistics (``top`` images per pair).
        dtype: the model's dtype for every row but the dtype row.
        compare_dtype: add the row float32 against float64 (the paper preset run in the other dtype).
        progress: tqdm bars.

    Returns:
        ``(payload, tensors)``: the JSON-able results, and ``{"text": (P, D), "signs": (H, C), "paper_logits":
        [(P, 224, 224)]}`` of the paper preset (for the tests).
    """
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    model = model.to(dtype).eval()                        # our own copy, loaded here
    spec = get_spec(model)
    k = paper_k(spec)
    ds = SceneSegmentation(n, seed=seed, background="classes")
    text = class_embeddings(model, tokenizer, ds.prompts())
    signs, sign_counts = sign_statistics(model, statistics_images(stats_n, stats_seed), top)

    def run(**kw):
        kw.setdefault("text", text)
        seg = Segmentor(model, kw.pop("text"), ("nad",), k=k, preprocess=preprocess, **kw)
        return seg, segment(seg, ds, progress=progress)

    default_seg, (default, _) = run()
    paper_seg, (paper, paper_logits) = run(preset="paper", pair_signs=signs)
    variants = {
        "bias_share=uniform": run(bias_share="uniform")[1][0],
        "pair_signs=data": run(pair_signs=signs)[1][0],
        "sink=keep": run(sink="keep")[1][0],
        "centre=False": run(text=class_embeddings(model, tokenizer, ds.prompts(), centre=False))[1][0],
        # the paper's preset with the sink cell's cosines interpolated instead of its vectors
        "paper, sink in maps": run(pair_signs=signs, bias_share="uniform")[1][0],
    }
    rows = {"default": score(default, ds, default), "paper": score(paper, ds, default)}
    rows.update({name: score(p, ds, default) for name, p in variants.items()})
    rows["paper, sink in maps"]["pixels_changed_against_paper"] = score(variants["paper, sink in maps"], ds,
                                                                         paper)["pixels_changed"]
    payload = {"n": n, "pixels": int(sum(p.size for p in default)), "k": k, "stats_n": stats_n, "top": top,
               "signs": sign_counts,
               "rows": rows, "last_token_attention": last_token_attention(model, ds, default_seg),
               "presets": PRESET_DESCRIPTIONS, "dtype": str(dtype).replace("torch.", "")}
    if compare_dtype:
        other = torch.float64 if dtype == torch.float32 else torch.float32
        twin = copy.deepcopy(model).to(other)
        seg = Segmentor(twin, text, ("nad",), k=k, preprocess=preprocess, preset="paper", pair_signs=signs)
        preds, logits = segment(seg, ds, progress=progress)
        worst = max(float((a.double() - b.double()).abs().max() / b.double().abs().max())
                    for a, b in zip(paper_logits, logits))
        payload["dtype_row"] = {"other": str(other).replace("torch.", ""), "max_relative_logit_difference": worst,
                                "pixels_changed": score(preds, ds, paper)["pixels_changed"],
                                "same_pairs": bool(torch.equal(seg.mask.cpu().to(paper_seg.mask),
                                                               paper_seg.mask.cpu()))}
    return payload, {"text": text, "signs": signs, "paper_logits": paper_logits}


def markdown(payload: dict) -> str:
    """The results table (quoted in docs/conventions.md between its results markers)."""
    rows, total = payload["rows"], payload["pixels"]
    d = rows["default"]["miou"]

    def line(name: str, switch: str, key: str) -> str:
        r = rows[key]
        return (f"| {name} | `{switch}` | {100 * r['miou']:.1f} | {100 * (r['miou'] - d):+.1f} | "
                f"{r['pixels_changed']:,} ({100 * r['pixels_changed'] / total:.2f} %) |")

    att, sg = payload["last_token_attention"], payload["signs"]
    out = [f"scenes-rn, {payload['n']} held-out scenes (16 classes, every pixel scored, {total:,} pixels), NAD with "
           f"k = {payload['k']} pairs per class, {payload['dtype']}. Our default: NAD mIoU {100 * d:.1f} %.", "",
           "| convention switched | switch | NAD mIoU % | minus default | pixels changed against default |",
           "|---|---|---|---|---|",
           line("all of the paper's code", 'preset="paper", pair_signs=signs', "paper"),
           line("bias share uniform (paper's code)", 'bias_share="uniform"', "bias_share=uniform"),
           line("PC0 signs from data (paper's rule)", "pair_signs=signs", "pair_signs=data"),
           line("sink kept (no interpolation)", 'sink="keep"', "sink=keep"),
           line("no text centring", "class_embeddings(..., centre=False)", "centre=False"),
           line("paper preset, sink cell's cosines interpolated (ours)", 'pair_signs=signs, bias_share="uniform"',
                "paper, sink in maps"), "",
           f"- Sink in vectors (paper's code) against sink in cosines (ours), all else the paper's: "
           f"{rows['paper, sink in maps']['pixels_changed_against_paper']:,} pixels change.",
           f"- Class attention on the last spatial token: mean {att['mean']:.2e}, max {att['max']:.2e}, against "
           f"{att['uniform']:.3f} for uniform attention: scenes-rn has no attention sink.",
           f"- PC0 signs from {payload['stats_n']} statistics scenes, top {payload['top']} per pair: "
           f"{sg['negative']:,} of {sg['pairs']:,} pairs get -1; {sg['ties']:,} exact ties (top/2 above the mean, "
           "resolved to -1)."]
    if "dtype_row" in payload:
        r = payload["dtype_row"]
        out.append(f"- dtype: the paper preset in {r['other']} against {payload['dtype']}: largest logit difference "
                   f"{r['max_relative_logit_difference']:.1e} of the largest logit, {r['pixels_changed']:,} pixels "
                   f"change, same pairs: {'yes' if r['same_pairs'] else 'no'}.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="held-out evaluation scenes")
    p.add_argument("--seed", type=int, default=20_000, help="their seed (scenes-rn trained on seed 0)")
    p.add_argument("--stats-n", type=int, default=1000, help="scenes for the PC0 signs (the paper: 1000 images)")
    p.add_argument("--stats-seed", type=int, default=30_000, help="their seed")
    p.add_argument("--top", type=int, default=50, help="images per pair in the PC0 sign rule (the paper: 50)")
    p.add_argument("--quick", action="store_true", help="8 scenes, 60 statistics scenes (smoke run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.stats_n = 8, 60
    torch.manual_seed(0)
    start = time.perf_counter()
    payload, _ = measure(args.n, args.seed, args.stats_n, args.stats_seed, args.top, progress=not args.quiet)
    seconds = time.perf_counter() - start
    payload.update(stats_seed=args.stats_seed, seed=args.seed,
                   command="python benchmarks/conventions_scenes.py" + (" --quick" if args.quick else ""),
                   seconds=round(seconds, 1),
                   machine=f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
                           f"load average {os.getloadavg()[0]:.1f} at the end")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = STEM if not args.quick else STEM + "_quick"
    write_json(out / f"{stem}.json", payload)
    write_text(out / f"{stem}.md", markdown(payload))
    print(markdown(payload))
    print(f"wrote {out / stem}.json and .md in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
