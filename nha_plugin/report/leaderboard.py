"""The leaderboard and the per-image drill-down of a harness run folder (:mod:`nha_plugin.harness.runner`).

A run folder holds ``run.json`` (the run key: configuration, data identity, weights) and one
``<method>.records.jsonl`` per method (one record per image) and the maps of the first ``n_grid`` images as
``map-<method>-<i>.part.safetensors``. The leaderboard is computed here from the records, not from
``results.json``: each cell is the mean with its 95% percentile-bootstrap interval and the paired bootstrap of
(method - reference) on the common images (:mod:`nha_plugin.harness.confidence`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..files import load_state, read_json
from ..runs import read_records
from .pictures import heat_rgba, outline_rgba, write_png

__all__ = ["read_run", "leaderboard", "drilldown", "REFERENCES", "metric_columns"]

# the paired comparison's reference: NAD spatial for a ResNet run, its ViT analogue otherwise
REFERENCES = ("nad_spatial", "vit_spatial")
_RECORDS = ".records.jsonl"


def read_run(folder) -> dict:
    """The configuration and per-method records of a run folder.

    Args:
        folder: a folder written by :func:`nha_plugin.harness.run_benchmark`.

    Returns:
        ``{"folder", "config", "records": {method: [record, ...] sorted by image index}}``.

    Raises:
        FileNotFoundError: no ``run.json`` or no record file there (says what to run).
    """
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise FileNotFoundError(f"expected a benchmark run folder with run.json; {folder} has none (run `nha "
                                f"benchmark --out {folder}` first, or leave --run out to run a small one)")
    key = read_json(folder / "run.json").get("key", {})
    names = sorted(p.name[:-len(_RECORDS)] for p in folder.glob(f"*{_RECORDS}") if not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"expected <method>.records.jsonl files in {folder}; found none (the run has not "
                                "scored any image yet)")
    config = key.get("config") or {}
    order = [m for m in config.get("methods", []) if m in names] + [m for m in names if m not in config.get(
        "methods", [])]
    records = {m: [r for _, r in sorted({int(r["index"]): r for r in read_records(folder / f"{m}{_RECORDS}")}
                                        .items())] for m in order}
    return {"folder": str(folder), "config": config, "records": records}


def metric_columns(records: Dict[str, List[dict]]) -> List[dict]:
    """The metrics present in any record, in the harness's table order, with label and direction."""
    from ..harness import metrics as M
    from ..harness.report import COLUMNS
    present = set()
    for rows in records.values():
        for r in rows:
            present.update(r)
            if "segmentation" in r:
                present.update(("pixacc", "miou", "map"))
    return [{"key": k, "label": label, "higher_is_better": M.METRICS[k].higher_is_better,
             "description": M.METRICS[k].description} for k, label in COLUMNS if k in present]


def leaderboard(run: dict, reference: Optional[str] = None) -> dict:
    """Every method x metric cell with its 95% bootstrap interval and the paired test against the reference.

    Args:
        run: :func:`read_run`'s dict.
        reference: the method compared against (default: the first of :data:`REFERENCES` present).

    Returns:
        ``{"methods", "metrics", "reference", "cells": {method: {metric: {"mean", "ci95", "n", "paired"}}},
        "interval_test", "paired_test", "config"}``; ``paired`` is None for the reference itself.
    """
    from ..harness import confidence as C
    from ..harness.report import PER_IMAGE
    records, seed = run["records"], int(run["config"].get("seed", 0))
    if reference is None:
        reference = next((r for r in REFERENCES if r in records), None)
    metrics = metric_columns(records)
    scored = {m: C.statistics_of(rows, PER_IMAGE) for m, rows in records.items()}
    cells: Dict[str, Dict[str, dict]] = {}
    for m in records:
        cells[m] = {}
        for col in metrics:
            s = scored[m].get(col["key"])
            if s is None:
                continue
            cell = C.summary_entry(s, seed)
            ref = scored.get(reference, {}).get(col["key"]) if reference else None
            cell["paired"] = (C.paired_comparison(s, ref, seed, col["higher_is_better"])
                              if ref is not None and m != reference else None)
            cells[m][col["key"]] = cell
    config = {k: run["config"].get(k) for k in ("model", "dataset", "n", "seed") if k in run["config"]}
    return {"methods": list(records), "metrics": metrics, "reference": reference, "cells": cells,
            "interval_test": C.METHOD_TEXT, "paired_test": C.PAIRED_TEXT, "config": config}


def _image_metrics(record: dict, keys: Sequence[str]) -> Dict[str, Optional[float]]:
    """One image's metric values (segmentation: its average precision), None where undefined."""
    out = {}
    for k in keys:
        v = record.get("segmentation", {}).get("ap") if k == "map" else record.get(k)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _target_probabilities(config: dict, items, classes, forward=None) -> np.ndarray:
    """Softmax probability (N,) of each item's class under ``forward`` (default: the run's zero-shot classifier
    rebuilt from its model name)."""
    import torch

    from ..harness.data import items_to_tensor
    from ..harness.runner import BenchmarkConfig, build_forward
    if forward is None:
        forward = build_forward(BenchmarkConfig(model=config["model"], device="cpu"), list(classes))
    with torch.no_grad():
        probs = torch.softmax(forward(items_to_tensor(items)), dim=-1)
    target = torch.tensor([list(classes).index(it.label) for it in items])
    return probs.gather(1, target[:, None])[:, 0].numpy()


def drilldown(run: dict, site: Path, forward=None, progress: bool = True) -> List[dict]:
    """Write the pictures of every image that has saved maps and describe it for the page.

    The images, masks and classes are regenerated from the run's configuration (dataset and seed); a run on
    data that cannot be regenerated (``run_benchmark(items=...)``) gets no drill-down.

    Args:
        run: :func:`read_run`'s dict.
        site: the site folder (pictures go to ``site/img/``).
        forward: the run's zero-shot classifier (None: rebuilt from the run's model name).
        progress: tqdm bar.

    Returns:
        One dict per image: ``index``, ``label``, ``probability``, ``image``, ``outline``,
        ``maps`` {method: path}, ``metrics`` {method: {metric: value}} (paths relative to the site).
    """
    from tqdm.auto import tqdm

    from ..harness.data import load_benchmark_data
    cfg, folder = run["config"], Path(run["folder"])
    if cfg.get("dataset") not in ("scenes", "photos"):
        return []
    items, classes, _ = load_benchmark_data(cfg["dataset"], int(cfg["n"]), int(cfg["seed"]), cfg.get("path"))
    shown = [it for it in items if any((folder / f"map-{m}-{it.index}.part.safetensors").is_file()
                                       for m in run["records"])]
    probs = _target_probabilities(cfg, shown, classes, forward) if shown else []
    keys = [c["key"] for c in metric_columns(run["records"])]
    out = []
    for it, p in tqdm(list(zip(shown, probs)), desc="report images", disable=not progress):
        entry = {"index": it.index, "label": it.label, "probability": float(p),
                 "image": f"img/{it.index}.png", "outline": f"img/{it.index}-mask.png", "maps": {}, "metrics": {}}
        write_png(site / entry["image"], np.asarray(_resize(it.image, 112)))
        write_png(site / entry["outline"], outline_rgba(it.mask))
        for m, rows in run["records"].items():
            part = folder / f"map-{m}-{it.index}.part.safetensors"
            if part.is_file():
                entry["maps"][m] = f"img/{it.index}-{m}.png"
                write_png(site / entry["maps"][m], heat_rgba(load_state(part)["map"].float().numpy()))
            rec = next((r for r in rows if int(r["index"]) == it.index), None)
            if rec is not None:
                entry["metrics"][m] = _image_metrics(rec, keys)
        out.append(entry)
    return out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR))
