"""Write the static site: ``index.html``, ``app.js``, ``style.css`` and the data shards under ``data/``.

Shards (each ``NHA.put(name, value)``, loaded on demand):

- ``meta``: title and sizes; ``leaderboard``: the cells and the drill-down images (small: methods x metrics);
- ``atlas``: every head in full, the ``top_neurons`` and ``top_pairs`` most important as table rows, the
  image paths and ``block`` (neurons per shard);
- ``neurons-<j>``: neurons ``j*block .. (j+1)*block - 1`` and all their pairs in full, so a neuron page and
  its sub-concepts need one shard (RN50x16: 48 shards of 3,072 pairs);
- ``search-<c>``: [[word, [[unit, coefficient], ...]], ...] for the words starting with letter ``c``
  (``other``); a list, not an object, so a word such as ``__proto__`` stays data.

Time to first table is then the page plus one small shard, whatever the model's size.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import write_text
from ..markup import html_text
from .assets import PAGE, SCRIPT, STYLE

__all__ = ["write_site", "shard_text", "site_size"]

_ROW_KEYS = ("id", "kind", "head", "neuron", "importance", "share", "k90")


def _clean(obj: Any) -> Any:
    """JSON-clean: NaN and infinities become null (strict JSON and the page's formatting have no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def shard_text(name: str, value: Any) -> str:
    """The JavaScript of one shard: ``NHA.put(name, value);`` with ``value`` as JSON (ASCII, so U+2028 and
    other line separators cannot end the statement)."""
    return f"NHA.put({json.dumps(name)}, {json.dumps(_clean(value), ensure_ascii=True, separators=(',', ':'))});\n"


def _row(unit: dict) -> dict:
    """A unit as a table row: its figures and its first three words."""
    row = {k: unit[k] for k in _ROW_KEYS if k in unit}
    row["w"] = unit["words"][:3]
    return row


def _search_shards(units: List[dict]) -> Dict[str, Dict[str, list]]:
    """letter -> word (lower case) -> [[unit id, coefficient], ...] over every unit's words."""
    shards: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for u in units:
        for word, coef in u["words"]:
            w = str(word).lower()
            shards[w[0] if w[:1].isascii() and w[:1].isalpha() else "other"][w].append([u["id"], coef])
    return shards


def write_site(site, leaderboard: Optional[dict], images: List[dict], atlas: Optional[dict], *,
               title: str = "nha report", block: int = 64, top_neurons: int = 200, top_pairs: int = 500,
               atlas_images: Optional[List[str]] = None) -> Path:
    """Write the site into ``site`` (created; files replaced atomically).

    Args:
        site: the folder.
        leaderboard: :func:`nha_plugin.report.leaderboard.leaderboard`'s dict, or None (no benchmark).
        images: :func:`nha_plugin.report.leaderboard.drilldown`'s list.
        atlas: :func:`nha_plugin.report.atlas.resnet_atlas`'s dict, or None.
        title: the page title (escaped).
        block: neurons per neuron shard.
        top_neurons, top_pairs: rows of the atlas page's neuron and pair tables (most important first).
        atlas_images: paths (relative to the site) of the atlas's images, by index.

    Returns:
        The path of ``index.html``.
    """
    from tqdm.auto import tqdm
    site = Path(site)
    data = site / "data"
    lb = dict(leaderboard or {"methods": [], "metrics": [], "cells": {}, "config": {}, "reference": None,
                              "interval_test": "", "paired_test": ""}, images=images)
    write_text(data / "leaderboard.js", shard_text("leaderboard", lb))
    at = atlas or {"n_heads": 0, "n_neurons": 0, "heads": [], "neurons": [], "pairs": []}
    by_imp = lambda units, n: [_row(u) for u in sorted(units, key=lambda u: -u["importance"])[:n]]
    write_text(data / "atlas.js", shard_text("atlas", {
        "n_heads": at["n_heads"], "n_neurons": at["n_neurons"], "block": block, "heads": at["heads"],
        "neurons": by_imp(at["neurons"], top_neurons), "pairs": by_imp(at["pairs"], top_pairs),
        "images": atlas_images or [], "pool": at.get("pool")}))
    shards: Dict[int, Dict[str, dict]] = defaultdict(dict)
    for u in at["neurons"] + at["pairs"]:
        shards[u["neuron"] // block][u["id"]] = u
    for j, units in tqdm(sorted(shards.items()), desc="report shards", disable=len(shards) < 8):
        write_text(data / f"neurons-{j}.js", shard_text(f"neurons-{j}", {"units": units}))
    search = _search_shards(at["heads"] + at["neurons"] + at["pairs"])
    for letter in [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["other"]:
        write_text(data / f"search-{letter}.js", shard_text(f"search-{letter}",
                                                                      sorted(search.get(letter, {}).items())))
    n_units = len(at["heads"]) + len(at["neurons"]) + len(at["pairs"])
    write_text(data / "meta.js", shard_text("meta", {"title": title, "n_images": len(images), "n_units": n_units}))
    write_text(site / "app.js", SCRIPT)
    write_text(site / "style.css", STYLE)
    return write_text(site / "index.html", PAGE.format(title=html_text(title)))


# what build_report keeps beside the pages to resume (the harness run folder, the atlas cache): not served
CACHES = ("run", "atlas-run")


def site_size(site) -> Dict[str, int]:
    """``{"bytes", "files"}`` of the pages under ``site`` (all but :data:`CACHES`) and ``cache_bytes``."""
    site = Path(site)
    files = [p for p in site.rglob("*") if p.is_file()]
    cached = [p for p in files if p.relative_to(site).parts[0] in CACHES]
    pages = [p for p in files if p not in set(cached)]
    return {"bytes": sum(p.stat().st_size for p in pages), "files": len(pages),
            "cache_bytes": sum(p.stat().st_size for p in cached)}
