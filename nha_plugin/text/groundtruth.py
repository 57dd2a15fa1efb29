"""Ground-truth check of the pair descriptions on the planted-concept model ``scenes-rn``.

For each planted concept word (6 colours, 5 shapes, 5 photo categories; backgrounds are left out), take the
pairs whose unit direction aligns best (largest cosine) with the word's dictionary atom, describe each with
OMP, and count a hit when the word or an obvious synonym/plural (:data:`SYNONYMS`) is among the top words
(by |coefficient|). The same procedure on random unit directions (as many as the model has pairs) is the
control: selecting directions by alignment already favours the word, so only the gap above the control is
evidence that the model's pairs carry the planted concepts.

    python -m nha_plugin.text.groundtruth                 # scenes-rn, 30k words + scenes vocabulary
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..files import write_json
from ..pool import pair_directions
from .describe import TextDictionary, build_dictionary
from .omp import sparse_decompose

__all__ = ["SYNONYMS", "planted_concepts", "planted_hit_rate", "scene_statistics", "data_hit_rate"]

SYNONYMS = {
    "red": {"red"}, "orange": {"orange"}, "yellow": {"yellow"}, "green": {"green"}, "blue": {"blue"},
    "purple": {"purple", "violet"},
    "circle": {"circle", "circles", "round", "circular"}, "square": {"square", "squares"},
    "triangle": {"triangle", "triangles", "triangular"}, "star": {"star", "stars"}, "cross": {"cross", "crosses"},
    "cat": {"cat", "cats", "kitten"}, "astronaut": {"astronaut", "astronauts", "spaceman"},
    "coffee cup": {"coffee cup", "coffee", "cup", "cups", "mug"}, "rocket": {"rocket", "rockets"},
    "motorcycle": {"motorcycle", "motorcycles", "motorbike"},
}


def planted_concepts() -> list[str]:
    from ..scenes import CATEGORIES, COLOURS, SHAPES
    return [*COLOURS, *SHAPES, *CATEGORIES]


def _top_aligned(directions_by_head, atom: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (flat) and unit directions of the m directions most aligned with ``atom``."""
    best_val, best_idx, best_dir = [], [], []
    offset = 0
    for u in directions_by_head:
        u = F.normalize(u, dim=1)
        cos = u @ atom
        v, i = cos.topk(min(m, len(cos)))
        best_val.append(v), best_idx.append(i + offset), best_dir.append(u[i])
        offset += len(u)
    val, idx, dirs = torch.cat(best_val), torch.cat(best_idx), torch.cat(best_dir)
    order = val.argsort(descending=True)[:m]
    return idx[order], dirs[order]


def _hits(dirs, dictionary: TextDictionary, concept: str, k: int, top: int):
    codes = sparse_decompose(dirs, dictionary.atoms, k=k)
    syn = SYNONYMS.get(concept, {concept})
    out = []
    for r in range(len(dirs)):
        words = dictionary.words(codes, r)
        first = [w for w, _ in words[:top]]
        positive = [w for w, c in words if c > 0][:top]
        out.append({"words": words[:top], "hit": bool(syn & set(first)), "hit_positive": bool(syn & set(positive))})
    return out


def planted_hit_rate(model: nn.Module, tokenizer: Callable, dictionary: Optional[TextDictionary] = None, *,
                     pairs_per_concept: int = 3, k: int = 10, top: int = 5, pool: str = "words+scenes",
                     templates: str = "photo", seed: int = 0, cache_dir=None, progress: bool = False) -> dict:
    """Hit rate of planted words among the top words of their best-aligned pairs, and the random control.

    Returns a dict with ``hit_rate`` (pairs whose top ``top`` words contain the concept or a synonym),
    ``hit_rate_positive`` (the same among positive-coefficient words), ``control_hit_rate`` and
    ``control_hit_rate_positive`` (random directions), ``per_concept`` details and the settings.
    """
    from ..adapters import get_spec
    spec = get_spec(model).detached()
    if dictionary is None:
        dictionary = build_dictionary(model, tokenizer, pool, templates, cache_dir=cache_dir, progress=progress)
    H, C, D = spec.num_heads, spec.num_neurons, spec.output_dim
    pairs = [pair_directions(spec, heads=slice(h, h + 1))[0].float() for h in range(H)]
    g = torch.Generator().manual_seed(seed)
    control = [torch.randn(C, D, generator=g) for _ in range(H)]
    missing = [c for c in planted_concepts() if c not in dictionary.texts]
    if missing:
        raise ValueError(f"the pool lacks planted words {missing}; add the 'scenes' pool (pool='words+scenes')")
    per, hits, hits_pos, ctrl, ctrl_pos = {}, [], [], [], []
    for concept in planted_concepts():
        atom = dictionary.atoms[dictionary.texts.index(concept)]
        idx, dirs = _top_aligned(pairs, atom, pairs_per_concept)
        res = _hits(dirs, dictionary, concept, k, top)
        _, cdirs = _top_aligned(control, atom, pairs_per_concept)
        cres = _hits(cdirs, dictionary, concept, k, top)
        per[concept] = {"pairs": [f"H{int(i) // C}N{int(i) % C}" for i in idx], "results": res,
                        "control_hits": sum(r["hit"] for r in cres)}
        hits += [r["hit"] for r in res]
        hits_pos += [r["hit_positive"] for r in res]
        ctrl += [r["hit"] for r in cres]
        ctrl_pos += [r["hit_positive"] for r in cres]
    mean = lambda xs: sum(xs) / len(xs)
    return {"hit_rate": mean(hits), "hit_rate_positive": mean(hits_pos), "control_hit_rate": mean(ctrl),
            "control_hit_rate_positive": mean(ctrl_pos), "num_pairs_described": len(hits),
            "settings": {"pairs_per_concept": pairs_per_concept, "k": k, "top": top, "pool": dictionary.pool,
                         "num_texts": len(dictionary), "templates": len(dictionary.templates or []),
                         "normalization": dictionary.normalization, "seed": seed},
            "per_concept": per}


@torch.no_grad()
def scene_statistics(model: nn.Module, n: int = 300, seed: int = 777, batch: int = 50):
    """Pair coefficients s (n, H, C) of ``n`` generated scenes (seed never used in training) and the planted
    concepts present in each: a bool matrix (n, len(planted_concepts()))."""
    from ..scenes import SceneDataset
    from ..models import decompose
    from ..zoo import images_to_tensor
    concepts = planted_concepts()
    scenes = SceneDataset(n, seed=seed)
    coeffs, present = [], torch.zeros(n, len(concepts), dtype=torch.bool)
    dtype = next(model.parameters()).dtype
    for i0 in range(0, n, batch):
        group = [scenes[i] for i in range(i0, min(n, i0 + batch))]
        x = images_to_tensor(torch.stack([torch.from_numpy(sc.image) for sc in group]).numpy()).to(dtype)
        coeffs.append(decompose(model, x).pair_coefficients.float())
        for j, sc in enumerate(group):
            names = {v for o in sc.objects for v in (o.colour, o.shape, o.category) if v}
            for c, concept in enumerate(concepts):
                present[i0 + j, c] = concept in names
    return torch.cat(coeffs), present


def data_hit_rate(model: nn.Module, tokenizer: Callable, dictionary: TextDictionary, *, n_scenes: int = 300,
                  pairs_per_concept: int = 3, control_pairs: int = 10, k: int = 10, top: int = 5, seed: int = 0,
                  statistics=None) -> dict:
    """Text-free selection: for each concept, the pairs whose contribution grows most when the concept is in
    the scene (mean s with it minus mean s without it, times ||u||); then the same hit count as
    :func:`planted_hit_rate`. Control: ``control_pairs`` pairs per concept drawn uniformly at random, described
    the same way (the chance that the concept's word is among a pair's top words)."""
    from ..adapters import get_spec
    spec = get_spec(model).detached()
    H, C = spec.num_heads, spec.num_neurons
    s, present = statistics if statistics is not None else scene_statistics(model, n_scenes)
    u = pair_directions(spec).float().reshape(H * C, -1)
    norms = u.norm(dim=1)
    flat = s.reshape(len(s), H * C)
    g = torch.Generator().manual_seed(seed)
    per, hits, ctrl = {}, [], []
    for c, concept in enumerate(planted_concepts()):
        with_c, without = present[:, c], ~present[:, c]
        if with_c.sum() < 2 or without.sum() < 2:
            continue
        effect = (flat[with_c].mean(0) - flat[without].mean(0)) * norms
        idx = effect.topk(pairs_per_concept).indices
        res = _hits(F.normalize(u[idx], dim=1), dictionary, concept, k, top)
        rnd = torch.randperm(H * C, generator=g)[:control_pairs]
        cres = _hits(F.normalize(u[rnd], dim=1), dictionary, concept, k, top)
        per[concept] = {"pairs": [f"H{int(i) // C}N{int(i) % C}" for i in idx], "results": res,
                        "scenes_with": int(with_c.sum()), "control_hits": sum(r["hit"] for r in cres),
                        "control_pairs": len(cres)}
        hits += [r["hit"] for r in res]
        ctrl += [r["hit"] for r in cres]
    return {"hit_rate": sum(hits) / len(hits), "control_hit_rate": sum(ctrl) / len(ctrl),
            "num_pairs_described": len(hits), "num_control_pairs": len(ctrl), "num_scenes": len(s),
            "per_concept": per}


def _print_hits(per_concept: dict) -> None:
    """One line per described pair: HIT mark, concept, pair label, its top words with coefficients."""
    for concept, d in per_concept.items():
        for pair, r in zip(d["pairs"], d["results"]):
            mark = "HIT " if r["hit"] else "    "
            print(f"{mark}{concept:>11} {pair:>9}: " + ", ".join(f"{w} ({c:+.2f})" for w, c in r["words"]))


def main(argv=None) -> int:
    """``python -m nha_plugin.text.groundtruth``: print both hit rates (and write them with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="scenes-rn")
    p.add_argument("--weights", default=None, help="scenes-rn weights file to use instead of the bundled one")
    p.add_argument("--pool", default="words+scenes")
    p.add_argument("--templates", default="photo")
    p.add_argument("--pairs-per-concept", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--scenes", type=int, default=300, help="scenes for the data-selected check (0: skip)")
    p.add_argument("--json", default=None, help="also write the full result here")
    args = p.parse_args(argv)
    if args.weights:
        from ..zoo import load_zoo_model
        model, _, tokenizer = load_zoo_model("scenes-rn", weights=args.weights)
    else:
        from ..models import load_clip
        model, _, tokenizer = load_clip(args.model)
    res = planted_hit_rate(model, tokenizer, pool=args.pool, templates=args.templates,
                           pairs_per_concept=args.pairs_per_concept, k=args.k, top=args.top, progress=True)
    _print_hits(res["per_concept"])
    print(f"hit rate (planted word in top {args.top} by |coef|): {res['hit_rate']:.1%} of "
          f"{res['num_pairs_described']} pairs; positive words only {res['hit_rate_positive']:.1%}; "
          f"random-direction control {res['control_hit_rate']:.1%} / {res['control_hit_rate_positive']:.1%}")
    if args.scenes:
        words = build_dictionary(model, tokenizer, args.pool, args.templates, progress=False)
        data = data_hit_rate(model, tokenizer, words, n_scenes=args.scenes, pairs_per_concept=args.pairs_per_concept,
                             k=args.k, top=args.top)
        _print_hits(data["per_concept"])
        print(f"data-selected pairs ({data['num_scenes']} scenes): hit rate {data['hit_rate']:.1%} of "
              f"{data['num_pairs_described']} pairs; random-pair control {data['control_hit_rate']:.1%} of "
              f"{data['num_control_pairs']} pairs")
        res["data_selected"] = data
    if args.json:
        write_json(args.json, res, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
