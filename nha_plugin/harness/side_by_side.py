"""ResNet and ViT side by side: one benchmark run per labelled model on the same images, merged into one table."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from torch import nn

from ..files import write_json, write_text
from . import report
from .data import BenchItem, load_benchmark_data
from .forward import model_of
from .runner import BenchmarkConfig, build_forward, methods_for, run_benchmark

__all__ = ["merge_results", "run_side_by_side"]


def merge_results(named: Mapping[str, dict]) -> dict:
    """One results dict from several :func:`~nha_plugin.harness.runner.run_benchmark` results (e.g. a ResNet
    and a ViT on the same images).

    Args:
        named: label -> results dict.

    Returns:
        Methods keyed ``"<label>:<method>"`` (each keeps its intervals and its paired comparison with its own
        run's reference, named ``"<label>:<reference>"``), protocols kept per label;
        :func:`~nha_plugin.harness.report.markdown` and ``table`` accept it.
    """
    if not named:
        raise ValueError("give at least one results dict")
    first = next(iter(named.values()))
    return {"format": report.FORMAT, "protocol": {label: r["protocol"] for label, r in named.items()},
            "metrics": first["metrics"],
            "methods": {f"{label}:{m}": _relabelled(label, e) for label, r in named.items()
                        for m, e in r["methods"].items()}}


def _relabelled(label: str, entry: dict) -> dict:
    """A method's entry with its reference named as in the merged table."""
    if "vs_reference" not in entry:
        return entry
    vs = dict(entry["vs_reference"], reference=f"{label}:{entry['vs_reference']['reference']}")
    return dict(entry, vs_reference=vs)


def run_side_by_side(configs: Mapping[str, BenchmarkConfig], out: str,
                     forwards: Optional[Mapping[str, nn.Module]] = None, items: Optional[List[BenchItem]] = None,
                     classes: Optional[List[str]] = None) -> dict:
    """Run :func:`~nha_plugin.harness.runner.run_benchmark` once per labelled configuration on the same images
    (each resumable in ``out/<label>``), with each model's own default method set
    (:func:`~nha_plugin.harness.runner.methods_for`), and write the merged comparison to
    ``out/side_by_side.json`` and ``.md``.

    Args:
        configs: label -> configuration (its ``out`` is replaced by ``out/<label>``).
        out: the folder.
        forwards: label -> forward wrapper overriding the configuration's model (optional).
        items, classes: shared evaluation items (default: each configuration's dataset; the same seed gives
            the same images).

    Returns:
        The merged results (:func:`merge_results`).
    """
    forwards: Dict[str, nn.Module] = dict(forwards or {})
    results = {}
    for label, cfg in configs.items():
        forward = forwards.get(label)
        if forward is None:
            forward = build_forward(cfg, classes or load_benchmark_data(cfg.dataset, cfg.n, cfg.seed, cfg.path)[1])
        cfg = dataclasses.replace(cfg, out=str(Path(out) / label),
                                  methods=tuple(methods_for(model_of(forward), cfg.methods)))
        results[label] = run_benchmark(cfg, forward=forward, items=items, classes=classes)
    merged = merge_results(results)
    write_json(Path(out) / "side_by_side.json", merged)
    md = report.markdown(merged).replace("# Attribution benchmark", "# Attribution benchmark: side by side", 1)
    write_text(Path(out) / "side_by_side.md", md)
    return merged
