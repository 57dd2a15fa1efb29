"""Training-free segmentation on held-out generated scenes with exact masks: NAD vs its baselines, on scenes-rn.

Two protocols on the same images (:class:`nha_plugin.applications.segmentation.SceneSegmentation`):

- ``classes``: 16 classes (5 shapes, 5 photo categories, 6 backgrounds); every pixel is scored.
- ``ignore``: the PASCAL Context-59 convention: 10 object classes, background pixels ignored.

Methods (same centred class texts, same sliding window): NAD, MaskCLIP, self-self, neurons-only, heads-only, the
"global" floor (each crop's zero-shot class everywhere) and the oracle-majority floor. Then NAD ablations on both
protocols: k (pairs per class), the head maps' bias share, sink handling and text centring; the paper's preset
(``Segmentor(preset="paper")``: uniform bias share, the sink cell's contribution vectors interpolated, PC0 signs from
data) against our default with a paired bootstrap interval of the difference; and what sink handling does on
scenes-rn, which has no attention sink (class attention on the last token, pixels changed, why).

k defaults to the paper's share of pairs: 20,000 of RN50x16's 48 x 3,072 = 147,456 pairs (13.6 %), i.e. 417 of
scenes-rn's 8 x 384 = 3,072. The paper's window is the model's input size (384 px for RN50x16, stride 192, short side
384); scenes-rn's input is 224 px, so the window maps to crop 224 / stride 112 / short side 224: a single window per
224 px scene, under both presets.

    python benchmarks/segmentation_scenes.py                 # 200 scenes, a few minutes on 1 CPU thread
    python benchmarks/segmentation_scenes.py --quick         # 8 scenes (smoke run)

Writes benchmarks/results/segmentation_scenes_rn.json, .md and .png (image, truth, each method's prediction).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nha_plugin as nha
from nha_plugin.files import write_json, write_text
from nha_plugin.applications.segmentation import (METHOD_DESCRIPTIONS, METHODS, ORACLE, ORACLE_DESCRIPTION,
                                                  PAPER_PAIR_SHARE, PRESET_DESCRIPTIONS, SceneSegmentation,
                                                  Segmentor, bootstrap_miou, class_embeddings, crop_logits, evaluate,
                                                  paper_k, plot_examples)
from nha_plugin.pool import class_attention, positional_embedding_for, tokens

PROTOCOLS = {"classes": "16 classes (10 objects + 6 backgrounds), every pixel scored",
             "ignore": "10 object classes, background ignored (Context-59 convention)"}


def _row(res: dict, method: str) -> dict:
    s = res["methods"][method]
    return {"miou": s["miou"], "pixacc": s["pixacc"], "macc": s["macc"]}


def pc0_signs(model, n: int, seed: int, progress: bool) -> torch.Tensor:
    """The paper's PC0 sign of every pair (H, C) from :func:`nha_plugin.stats.collect` over n scenes."""
    from nha_plugin.scenes import SceneDataset
    from nha_plugin.stats import collect
    from nha_plugin.zoo import images_to_tensor
    scenes = SceneDataset(n, seed=seed)
    batches = (images_to_tensor(np.stack([scenes[i].image for i in range(s, min(s + 50, n))]))
               for s in range(0, n, 50))
    return collect(model, batches, k=50, progress=progress).pc0_sign


def paper_against_default(model, preprocess, ds, text, k: int, signs: torch.Tensor, default_boot: np.ndarray,
                          n_boot: int, progress: bool) -> dict:
    """The paper's preset (its PC0 signs from data) on the same images: mIoU of nad / heads / neurons and our
    default's nad minus the paper's, with a paired 95% bootstrap interval (the same resamples as ``default_boot``)."""
    seg = Segmentor(model, text, ("nad", "heads", "neurons"), k=k, preprocess=preprocess, preset="paper",
                    pair_signs=signs)
    res = evaluate(seg, ds, progress=progress, oracle=False, show=0, per_image=True)
    diff = default_boot - bootstrap_miou(res["per_image"]["nad"], n_boot=n_boot, seed=0)
    return {**{m: _row(res, m) for m in ("nad", "heads", "neurons")},
            "default_minus_paper_nad": {"ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                                        "p_default_better": float((diff > 0).mean())}}


@torch.no_grad()
def sink_effect(model, preprocess, ds, text, k: int, batch: int = 20) -> dict:
    """What sink handling does on these scenes: the class attention on the last spatial token (the sink cell of a
    model that has one), the predicted pixels that ``sink="interpolate"`` changes against ``"keep"`` (nad, heads,
    neurons), how often the sink cell's own grid argmax changes, and how often the ground truth of the sink cell's
    32 x 32 block is the class of its W, N and NW blocks (when it is, their mean predicts that class too). Changed
    pixels are counted over all pixels and over the pixels scored (background is not scored under "ignore")."""
    methods = ("nad", "heads", "neurons")
    segs = {s: Segmentor(model, text, methods, k=k, preprocess=preprocess, sink=s) for s in ("keep", "interpolate")}
    spec = segs["keep"].spec
    last, same_truth, pixels, scored = [], 0, 0, 0
    changed, changed_scored, cell = (dict.fromkeys(methods, 0) for _ in range(3))
    for s in range(0, len(ds), batch):
        items = [ds[i] for i in range(s, min(s + batch, len(ds)))]
        crops = torch.stack([segs["keep"].resize(im) for im, _ in items])
        feats = spec.trunk(crops)
        a = class_attention(spec, tokens(feats, positional_embedding_for(spec, feats.shape[-2:])))   # (B, H, T)
        last.append(a[:, :, -1])
        grids = {mode: crop_logits(spec, feats, seg.text, methods, seg.mask, seg.k, mode) for mode, seg in segs.items()}
        preds = {mode: seg.predict([im for im, _ in items]) for mode, seg in segs.items()}
        for b, (_, label) in enumerate(items):
            keep = label != 0 if ds.no_background else np.ones(label.shape, dtype=bool)    # the pixels scored
            pixels, scored = pixels + label.size, scored + int(keep.sum())
            blocks = [np.bincount(label[y:y + 32, x:x + 32].ravel()).argmax() for y, x in
                      ((192, 192), (192, 160), (160, 192), (160, 160))]            # sink, W, N, NW
            same_truth += int(blocks[0] == blocks[1] == blocks[2] == blocks[3])
            for m in methods:
                diff = preds["keep"][b][m] != preds["interpolate"][b][m]
                changed[m], changed_scored[m] = changed[m] + int(diff.sum()), changed_scored[m] + int(diff[keep].sum())
                cell[m] += int(grids["keep"][m][b, :, -1, -1].argmax() != grids["interpolate"][m][b, :, -1, -1].argmax())
    last = torch.cat(last)                                                         # (N, H)
    T = spec.grid_size ** 2 + 1
    return {"n": len(ds), "pixels": pixels, "pixels_changed": changed, "scored_pixels": scored,
            "scored_pixels_changed": changed_scored, "sink_cell_argmax_changed": cell,
            "sink_block_truth_equals_its_neighbours": same_truth,
            "last_token_attention": {"mean": float(last.mean()), "max": float(last.max()),
                                     "uniform": 1 / T, "per_head_mean": last.mean(0).tolist()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="held-out scenes")
    p.add_argument("--seed", type=int, default=20_000, help="scene seed (scenes-rn trained on seed 0)")
    p.add_argument("--k", type=int, default=None, help="pairs per class (default: the paper's share of H*C)")
    p.add_argument("--sweep", default="50,100,200,417,1000,3072", help="k values of the NAD sweep")
    p.add_argument("--stats-n", type=int, default=1000, help="scenes for the PC0-sign statistics (the paper: 1000)")
    p.add_argument("--stats-seed", type=int, default=30_000, help="their seed (neither training nor evaluation)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the images (paired across methods)")
    p.add_argument("--quick", action="store_true", help="8 scenes, short sweep (smoke run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.sweep, args.stats_n = 8, "100,3072", 100
    torch.manual_seed(0)
    start = time.perf_counter()
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    spec = nha.adapters.get_spec(model)
    H, C = spec.num_heads, spec.num_neurons
    k = args.k or paper_k(spec)
    sweep = [int(v) for v in args.sweep.split(",") if v]
    progress = not args.quiet
    main_tables, ablations, examples, texts, presets, sinks = {}, {}, None, {}, {}, {}
    signs = pc0_signs(model, args.stats_n, args.stats_seed, progress)
    for proto in PROTOCOLS:
        ds = SceneSegmentation(args.n, seed=args.seed, background=proto)
        texts[proto] = class_embeddings(model, tokenizer, ds.prompts())
        t0 = time.perf_counter()
        seg = Segmentor(model, texts[proto], METHODS, k=k, preprocess=preprocess)
        res = evaluate(seg, ds, progress=progress, show=6, per_image=True)
        boots = {m: bootstrap_miou(res["per_image"][m], n_boot=args.boot, seed=0) for m in res["methods"]}
        rows = {m: _row(res, m) for m in res["methods"]}
        for m, b in boots.items():
            diff = boots["nad"] - b
            rows[m].update(miou_ci95=[float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))],
                           nad_minus_ci95=[float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                           p_nad_better=float((diff > 0).mean()))
        main_tables[proto] = {"methods": rows,
                              "iou": {m: res["methods"][m]["iou"] for m in res["methods"]},
                              "class_names": res["class_names"], "seconds": time.perf_counter() - t0}
        if proto == "classes":
            examples = res
        rows = []
        variants = [dict(k=kk) for kk in sweep if kk != k]
        variants += [dict(bias_share="uniform"), dict(sink="keep"), dict(centre=False), dict(pair_signs="data")]
        for v in variants:
            text = texts[proto] if v.get("centre", True) else class_embeddings(model, tokenizer, ds.prompts(),
                                                                                centre=False)
            kwargs = {kk: vv for kk, vv in v.items() if kk in ("bias_share", "sink")}
            if "pair_signs" in v:
                kwargs["pair_signs"] = signs
            seg = Segmentor(model, text, ("nad", "heads", "neurons"), k=v.get("k", k), preprocess=preprocess,
                            **kwargs)
            r = evaluate(seg, ds, progress=progress, oracle=False, show=0)
            rows.append({"variant": v, **{m: _row(r, m) for m in ("nad", "heads", "neurons")}})
        ablations[proto] = rows
        presets[proto] = paper_against_default(model, preprocess, ds, texts[proto], k, signs, boots["nad"], args.boot,
                                               progress)
        sinks[proto] = sink_effect(model, preprocess, ds, texts[proto], k)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "segmentation_scenes_rn" if not args.quick else "segmentation_scenes_rn_quick"
    protocol = {
        "model": f"scenes-rn (bundled; H={H} heads x C={C} neurons, D={spec.output_dim}, 224 px, 7x7 grid)",
        "data": f"{args.n} held-out generated scenes, SceneDataset(n, seed={args.seed}) (training used seed 0)",
        "class_texts": "per class the caption forms scenes-rn was trained on (objects: 'star', 'a star', 'a photo "
                       "of a star', ...; backgrounds: 'something on grass', 'a grass background', ...), each "
                       "normalised, averaged, renormalised; centred over the classes and renormalised",
        "k": f"{k} pairs per class = round({PAPER_PAIR_SHARE:.4f} * {H * C}), the paper's share (20,000 of 147,456)",
        "pair_signs": "+1 (PC0 = u/||u||) in the main table; ablation 'pair_signs=data': the paper's PC0 sign "
                      f"(majority of the top-50 centred |s| above the mean) from nha_plugin.stats.collect over "
                      f"{args.stats_n} scenes of seed {args.stats_seed}",
        "head_maps": "preset nha: bias share a[h,m] b_o / H (attention); sink cell's cosines interpolated (W, N, NW "
                     "mean); the paper's preset in its own section",
        "window": "crop 224, stride 112, short side 224: one window per 224 px scene; grid logits upsampled "
                  "bilinearly; argmax",
        "metrics": "dataset-level confusion matrix: mIoU over classes with a non-empty union, pixAcc, mAcc; 95% "
                   f"intervals from {args.boot} bootstrap resamples of the images, the same resamples for every "
                   "method (paired)",
        "command": "python benchmarks/segmentation_scenes.py" + (" --quick" if args.quick else ""),
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
    }
    payload = {"protocol": protocol, "protocols": PROTOCOLS, "main": main_tables, "ablations": ablations,
               "paper_preset": presets, "sink": sinks, "presets": PRESET_DESCRIPTIONS,
               "descriptions": dict(METHOD_DESCRIPTIONS, **{ORACLE: ORACLE_DESCRIPTION})}
    write_json(out / f"{stem}.json", payload)
    write_text(out / f"{stem}.md", markdown(payload))
    plot_examples(examples["examples"], examples["class_names"], out / f"{stem}.png",
                  scores={m: s["miou"] for m, s in examples["methods"].items()})
    print(markdown(payload))
    print(f"wrote {out / stem}.json, .md, .png in {seconds:.0f} s")
    return 0


def markdown(payload: dict) -> str:
    pr = payload["protocol"]
    lines = ["# Training-free segmentation on held-out scenes (scenes-rn)", ""]
    lines += [f"- {k}: {v}" for k, v in pr.items()] + [""]
    lines += ["## Main table (mIoU / pixAcc / mAcc, %)", "",
              "mIoU [95% bootstrap interval]; last cell: NAD minus the method, mIoU points [paired 95% interval].",
              "",
              "| method | " + " | ".join(f"{p}: mIoU | pixAcc | mAcc | NAD - method" for p in PROTOCOLS)
              + " | definition |",
              "|---|" + "---|---|---|---|" * len(PROTOCOLS) + "---|"]
    first = payload["main"]["classes"]["methods"]
    for m in sorted(first, key=lambda m: -first[m]["miou"]):
        cells = []
        for p in PROTOCOLS:
            s = payload["main"][p]["methods"][m]
            lo, hi = s["miou_ci95"]
            dlo, dhi = s["nad_minus_ci95"]
            gap = 100 * (payload["main"][p]["methods"]["nad"]["miou"] - s["miou"])
            diff = "-" if m == "nad" else f"{gap:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
            cells.append(f"{100 * s['miou']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {100 * s['pixacc']:.1f} | "
                         f"{100 * s['macc']:.1f} | {diff}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {payload['descriptions'][m]} |")
    lines += ["", "Protocols: " + "; ".join(f"**{p}**: {d}" for p, d in PROTOCOLS.items()), ""]
    lines += ["## NAD ablations (mIoU %, same images; everything else as in the main table)", "",
              "| variant | " + " | ".join(f"{p}: nad | heads | neurons" for p in PROTOCOLS) + " |",
              "|---|" + "---|---|---|" * len(PROTOCOLS)]
    base = {p: payload["main"][p]["methods"] for p in PROTOCOLS}
    lines.append("| main setting | " + " | ".join(
        f"{100 * base[p]['nad']['miou']:.1f} | {100 * base[p]['heads']['miou']:.1f} | "
        f"{100 * base[p]['neurons']['miou']:.1f}" for p in PROTOCOLS) + " |")
    n_rows = len(payload["ablations"]["classes"])
    for i in range(n_rows):
        v = payload["ablations"]["classes"][i]["variant"]
        name = ", ".join(f"{a}={b}" for a, b in v.items())
        cells = []
        for p in PROTOCOLS:
            r = payload["ablations"][p][i]
            cells.append(" | ".join(f"{100 * r[m]['miou']:.1f}" for m in ("nad", "heads", "neurons")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's preset against our default (mIoU %, same images)", "",
              f"- nha (our default): {payload['presets']['nha']}",
              f"- paper: {payload['presets']['paper']}; PC0 signs from the statistics of the pair_signs ablation", "",
              "| protocol | default nad | paper nad | paper heads | paper neurons | default - paper, nad "
              "[paired 95% interval] | P(default better) |", "|---|---|---|---|---|---|---|"]
    for p in PROTOCOLS:
        r, d = payload["paper_preset"][p], base[p]["nad"]["miou"]
        lo, hi = r["default_minus_paper_nad"]["ci95"]
        lines.append(f"| {p} | {100 * d:.1f} | {100 * r['nad']['miou']:.1f} | {100 * r['heads']['miou']:.1f} | "
                     f"{100 * r['neurons']['miou']:.1f} | {100 * (d - r['nad']['miou']):+.1f} [{100 * lo:+.1f}, "
                     f"{100 * hi:+.1f}] | {r['default_minus_paper_nad']['p_default_better']:.3f} |")
    lines += ["", "## Sink handling on scenes-rn", ""]
    for p in PROTOCOLS:
        k = payload["sink"][p]
        att = k["last_token_attention"]
        changed = ", ".join(f"{m} {v}" for m, v in k["pixels_changed"].items())
        scored = ", ".join(f"{m} {v}" for m, v in k["scored_pixels_changed"].items())
        cell = ", ".join(f"{m} {v}" for m, v in k["sink_cell_argmax_changed"].items())
        lines.append(f"- {p}: class attention on the last spatial token (the sink of a model that has one): mean "
                     f"{att['mean']:.2e}, max {att['max']:.2e}, against {att['uniform']:.3f} for uniform attention; "
                     f"sink='interpolate' changes {changed} of {k['pixels']:,} predicted pixels against 'keep', "
                     f"{scored} of the {k['scored_pixels']:,} pixels scored; the sink cell's own argmax changes in "
                     f"{cell} of {k['n']} scenes; in {k['sink_block_truth_equals_its_neighbours']} of {k['n']} scenes "
                     "the ground truth of the sink cell's 32 x 32 block is the class of its W, N and NW blocks.")
    lines += ["", "Why sink handling does nothing to the scores here: scenes-rn has no attention sink, so its last "
              "cell is an ordinary cell, and a scene's corner almost always shows the background its W, N and NW "
              "neighbours show. With the backgrounds as classes, the mean of the neighbours' logits (or cosines) "
              "picks the class the cell already had; with the background ignored, no class fits the corner, the "
              "object classes' logits there are near ties that the interpolation can reorder, but those pixels are "
              "background and not scored. On a model with a sink (tests/conftest.py make_sink_model) the kept sink "
              "cell speaks for the whole head instead (tests/test_segmentation_paper.py).", ""]
    names = payload["main"]["classes"]["class_names"]
    lines += ["", "## Per-class IoU, protocol classes (%)", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for m, ious in payload["main"]["classes"]["iou"].items():
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.0f}" for v in ious) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
