"""Spurious-feature removal with TextSpan on CLIP-ViT heads (docs/methods.md §2).

The recipe: describe every head of the last layers with TextSpan; the heads whose descriptions are about
places/settings/backgrounds carry the background; mean-ablate their direct contributions and measure the
worst-group accuracy over (label x background) groups before and after. Baseline: the same number of random
heads (10 in the paper; also a size-matched draw), best of 5 seeded draws, scored on the same images.

    from nha_plugin.applications import spurious
    picked = spurious.select_place_heads(spans, keywords=("grass", "brick", "background"))
    res = spurious.spurious_removal(test_stats, weight, labels, groups, picked, candidates,
                                    head_means=train_stats.head_means, bias=bias)
    res["before"]["worst"], res["after"]["worst"], res["random"]["best"]["worst"]

The scenes experiment (:func:`scenes_experiment`) plants the correlation: ``scenes-vit`` was trained on
unbiased scenes, so the *read-out* is made spurious instead. Three read-outs are scored on a balanced test set
(every label on every listed background equally often):

- ``probe@s``: a logistic-regression probe fit on a biased training set (``SpuriousSampler``: each label shown
  on its own background in a share ``s`` of the images), the standard way a spurious shortcut enters; one
  probe per strength, since how much a probe leans on the background depends on how rare the counter-examples
  are (with ``s = 1`` background and object are equally predictive).
- ``zeroshot_background``: zero-shot prompts that name the correlated background ("a photo of a cat on
  grass"), i.e. class descriptions written from biased data.
- ``zeroshot``: plain "a photo of a {label}" prompts (the reference: no planted reliance).

Head means for the ablation come from the training images (what a practitioner has). Which heads are
"about places" is decided by keywords in their TextSpan texts (the background names for scenes), weighted by
the variance each text explains; no labels of the test set are used for the selection. The random baseline's
"best of 5" is chosen on the test set itself, which favours the baseline.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..vit.inputs import images_to_input, input_size
from ..vit.textspan_heads import HeadSpan, HeadStatistics, mean_ablated_embeddings, predict

__all__ = ["group_accuracies", "mentions", "place_head_scores", "select_place_heads", "random_head_sets",
           "fit_linear_probe", "spurious_removal", "scene_description_pool", "class_directions", "scenes_experiment",
           "waterbirds_experiment", "SCENE_PLACE_KEYWORDS"]

Head = Tuple[int, int]


def group_accuracies(predictions: Tensor, labels: Tensor, groups: Tensor,
                     group_names: Optional[Sequence[str]] = None) -> dict:
    """Accuracy per group and the worst group.

    Args:
        predictions, labels, groups: (K,) ints.
        group_names: name of group id g at position g (default "group g").

    Returns:
        ``{"worst": min over non-empty groups, "worst_group": its name, "average": mean over non-empty groups,
        "overall": accuracy over all images, "groups": {name: {"accuracy": a, "n": count}}}``.
    """
    predictions, labels, groups = (torch.as_tensor(v).long().flatten() for v in (predictions, labels, groups))
    if not predictions.shape == labels.shape == groups.shape:
        raise ValueError(f"predictions, labels and groups must have one entry per image; got "
                         f"{tuple(predictions.shape)}, {tuple(labels.shape)}, {tuple(groups.shape)}")
    if predictions.numel() == 0:
        raise ValueError("no images to score")
    correct = predictions == labels
    per: Dict[str, dict] = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        name = group_names[g] if group_names is not None else f"group {g}"
        per[name] = {"accuracy": float(correct[sel].double().mean()), "n": int(sel.sum())}
    worst = min(per, key=lambda k: per[k]["accuracy"])
    return {"worst": per[worst]["accuracy"], "worst_group": worst,
            "average": float(np.mean([v["accuracy"] for v in per.values()])),
            "overall": float(correct.double().mean()), "groups": per}


def mentions(text: str, keywords: Sequence[str]) -> List[str]:
    """The keywords that occur in ``text`` as whole words (case-insensitive; multi-word keywords allowed)."""
    low = text.lower()
    return [k for k in keywords if re.search(r"(?<![a-z])" + re.escape(k.lower()) + r"(?![a-z])", low)]


def place_head_scores(spans: Sequence[HeadSpan], keywords: Sequence[str]) -> List[dict]:
    """How much of each head's TextSpan is about places.

    ``score``: the share of the variance its texts explain that comes from texts mentioning a keyword (each
    text credited with the variance it adds to the span); ``place_variance``: that variance in absolute
    terms (share of the head's total variance explained by place texts x the total), which tells a head
    that writes a strong background direction from a near-silent head whose noise happens to align with one.

    Returns one dict per head, sorted by decreasing ``place_variance``:
    ``{"layer", "head", "score", "place_variance", "place_texts", "texts"}``."""
    if not keywords:
        raise ValueError("give at least one place keyword (e.g. the background names)")
    out = []
    for s in spans:
        if s.texts is None:
            raise ValueError("the spans carry no texts; run head_text_spans with the pool's texts")
        gains = torch.diff(s.explained.double(), prepend=torch.zeros(1, dtype=torch.float64)).clamp_min(0)
        hit = torch.tensor([bool(mentions(t, keywords)) for t in s.texts])
        total = float(gains.sum())
        score = float(gains[hit].sum() / total) if total > 0 else 0.0
        out.append({"layer": s.layer, "head": s.head, "score": score,
                    "place_variance": float(gains[hit].sum()) * s.total_variance,
                    "place_texts": [t for t, h in zip(s.texts, hit) if h], "texts": list(s.texts)})
    return sorted(out, key=lambda d: (-d["place_variance"], d["layer"], d["head"]))


def select_place_heads(spans: Sequence[HeadSpan], keywords: Sequence[str], threshold: float = 0.5,
                       min_relative_variance: float = 0.1, max_heads: Optional[int] = None) -> List[Head]:
    """Heads about places: ``score >= threshold`` and ``place_variance`` at least ``min_relative_variance``
    times the largest head's; at most ``max_heads``, strongest first (see :func:`place_head_scores`)."""
    scored = place_head_scores(spans, keywords)
    top = max((d["place_variance"] for d in scored), default=0.0)
    keep = [d for d in scored if d["score"] >= threshold and top > 0
            and d["place_variance"] >= min_relative_variance * top]
    return [(d["layer"], d["head"]) for d in keep[:max_heads]]


def random_head_sets(candidates: Sequence[Head], k: int, n_sets: int = 5, seed: int = 0) -> List[List[Head]]:
    """``n_sets`` seeded draws of ``k`` distinct heads from ``candidates`` (k clipped to their number)."""
    candidates = sorted(candidates)
    k = min(k, len(candidates))
    return [sorted(random.Random(seed * 1000 + i).sample(candidates, k)) for i in range(n_sets)]


def fit_linear_probe(embeddings: Tensor, labels: Tensor, l2: float = 1e-2, max_iter: int = 500
                     ) -> Tuple[Tensor, Tensor]:
    """Multinomial logistic regression on unit-normalised, standardised embeddings (L-BFGS, float64).

    Minimises ``mean cross-entropy + l2/2 ||W||^2`` over standardised features (each dimension's training mean
    and standard deviation), then folds the standardisation into the returned read-out, so
    ``predict(y, weight, bias, normalize=True)`` applies it.

    Returns:
        weight (D, C) and bias (C,), float64.
    """
    labels = torch.as_tensor(labels).long()
    C = int(labels.max()) + 1
    if C < 2:
        raise ValueError("the probe needs at least two classes in the training labels")
    x = F.normalize(embeddings.double(), dim=-1)
    mu, sd = x.mean(dim=0), x.std(dim=0).clamp_min(1e-12)
    z = (x - mu) / sd
    W = torch.zeros(z.shape[1], C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, labels) + 0.5 * l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return W / sd[:, None], b - (mu / sd) @ W


def _drop(stats: HeadStatistics, heads: Sequence[Head], early: bool) -> Tensor:
    drop = torch.zeros(stats.num_layers, stats.num_heads, dtype=torch.bool)
    for l, h in heads:
        drop[l, h] = True
    if early:
        drop[:min(stats.layers)] = True
    return drop


def spurious_removal(stats: HeadStatistics, weight: Tensor, labels: Tensor, groups: Tensor,
                     selected: Sequence[Head], candidates: Sequence[Head], *, head_means: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, normalize: bool = True, n_random: int = 10, n_sets: int = 5,
                     seed: int = 0, ablate_early: bool = False,
                     group_names: Optional[Sequence[str]] = None) -> dict:
    """Worst-group accuracy before and after mean-ablating ``selected`` heads, against random heads.

    Args:
        stats: head statistics of the evaluation images (their analysed layers must hold every head named).
        weight, bias, normalize: the linear read-out (see :func:`~nha_plugin.vit.textspan_heads.predict`).
        labels, groups: (K,) the evaluation images' labels and groups.
        selected: the heads to ablate, (layer, head) pairs.
        candidates: the heads random baselines draw from (e.g. every head of the analysed layers).
        head_means: (L, H, D) the ablation values (default: the evaluation images' own means).
        n_random, n_sets, seed: the random baseline: ``n_sets`` draws of ``n_random`` heads; a size-matched
            baseline (``len(selected)`` heads) is reported too.
        ablate_early: also mean-ablate every head of the layers before the analysed ones, in every arm.

    Returns:
        ``{"before", "after", "early_only" (with ablate_early), "selected", "random", "random_matched"}``;
        each arm is a :func:`group_accuracies` dict; the random entries hold ``sets`` (heads, worst, average per
        draw), ``best`` (the draw with the highest worst-group accuracy) and ``mean_worst``.
    """
    def score(heads: Sequence[Head]) -> dict:
        y = mean_ablated_embeddings(stats, _drop(stats, heads, ablate_early), head_means)
        return group_accuracies(predict(y, weight, bias, normalize), labels, groups, group_names)

    def baseline(k: int) -> dict:
        sets = random_head_sets(candidates, k, n_sets, seed)
        results = [score(s) for s in sets]
        best = max(range(len(sets)), key=lambda i: (results[i]["worst"], results[i]["average"]))
        return {"k": len(sets[0]) if sets else 0, "sets": [{"heads": [list(h) for h in s], "worst": r["worst"],
                                                            "average": r["average"]} for s, r in zip(sets, results)],
                "best": results[best], "best_heads": [list(h) for h in sets[best]],
                "mean_worst": float(np.mean([r["worst"] for r in results]))}

    before = group_accuracies(predict(stats.embedding, weight, bias, normalize), labels, groups, group_names)
    out = {"before": before, "after": score(selected), "selected": [list(h) for h in selected],
           "ablate_early": ablate_early}
    if ablate_early:
        out["early_only"] = score([])
    out["random"] = baseline(n_random)
    out["random_matched"] = baseline(max(1, len(selected)))
    return out


# ---- the planted-correlation experiment on generated scenes ----------------------------------------------
SCENE_PLACE_KEYWORDS = ("background",)   # plus the scene generator's background names (added at run time)


def scene_description_pool() -> List[str]:
    """Single-concept descriptions from the scene generator's vocabulary: object phrases (colour, shape,
    colour + shape, photo categories, sizes, positions) and background phrases (its caption templates), so
    each text is about either an object or a setting."""
    from .. import scenes as S
    a = S.article
    texts = []
    for cat in S.CATEGORIES:
        texts += [cat, f"a photo of {a(cat)}", f"a picture of {a(cat)}"]
    for shape in S.SHAPES:
        texts += [shape, f"a photo of {a(shape)}"]
        for colour in S.COLOURS:
            texts += [f"{colour} {shape}", f"a photo of {a(f'{colour} {shape}')}"]
    for colour in S.COLOURS:
        texts += [colour, f"a photo of {a(f'{colour} object')}"]
    for size in S.SIZES:
        texts += [f"a {size} object"]
    for pos in S.POSITIONS:
        texts += [f"an object {S.position_phrase(pos)}"]
    for bg in S.BACKGROUNDS:
        texts += [t.format(bg) for t in S.BACKGROUND_TEMPLATES]
    return list(dict.fromkeys(texts))                                    # without repeats, in order


def class_directions(model, tokenizer, prompts: Sequence[str]) -> Tensor:
    """(D, C) unit text embeddings of one prompt per class, float64 (a zero-shot read-out's weight)."""
    from ..readout import encode_texts
    with torch.no_grad():
        return encode_texts(model, tokenizer, list(prompts)).T.double()


def _score_readouts(readouts: dict, test: HeadStatistics, selected, candidates, names, options: dict) -> dict:
    """readouts: name -> (weight, bias, description, training statistics: ablation means and train accuracy)."""
    results = {}
    for name, (w, b, desc, train) in readouts.items():
        res = spurious_removal(test, w, test.labels, test.groups, selected, candidates, head_means=train.head_means,
                               bias=b, group_names=names, **options)
        res["readout"] = desc
        if train.labels is not None:
            res["train_accuracy"] = float((predict(train.embedding, w, b) == train.labels).double().mean())
        results[name] = res
    return results


def _protocol_common(ts_stats, spans, pool_desc, keywords, threshold, min_relative_variance, max_heads, n_random,
                     n_sets, ablate_early, m) -> dict:
    return {
        "textspan": {"n_images": ts_stats.num_images, "layers": ts_stats.layers,
                     "m": min(m, spans[0].rank) if spans else m, "rank": spans[0].rank if spans else None,
                     "pool": pool_desc},
        "selection": {"keywords": list(keywords), "threshold": threshold, "max_heads": max_heads,
                      "min_relative_variance": min_relative_variance,
                      "rule": "share of a head's TextSpan explained variance from texts naming a keyword >= "
                              "threshold, and that variance >= min_relative_variance x the largest head's"},
        "ablation": "direct effect of each selected head replaced by its mean over the training images; "
                    + ("heads of earlier layers mean-ablated in every arm" if ablate_early
                       else "earlier layers intact"),
        "random_baseline": f"{n_sets} seeded draws of {n_random} heads (and of len(selected) heads) from the analysed "
                           "layers; best draw by test worst-group accuracy (favours the baseline)",
    }


def _collector(model, preprocess: Optional[Callable], parts_dir, **options) -> Callable[..., HeadStatistics]:
    """``collect(name, images, n, meta, **kw)``: :func:`~nha_plugin.vit.textspan_heads.collect_head_statistics`
    of the uint8 images ``images(a, b)`` (b - a, S, S, 3) made the model's input, its parts (with ``parts_dir``)
    in ``parts_dir/name``; ``options`` (batch_size, progress, fresh) and ``kw`` go to it."""
    from ..vit.textspan_heads import collect_head_statistics
    param, size = next(model.parameters()), input_size(model)

    def collect(name: str, images: Callable, n: int, meta: dict, **kw) -> HeadStatistics:
        def source(a, b):
            return images_to_input(images(a, b), size, param.dtype, param.device, preprocess)
        folder = None if parts_dir is None else Path(parts_dir) / name
        return collect_head_statistics(model, source, n, parts_dir=folder, meta=meta, **options, **kw)
    return collect


def scenes_experiment(model, tokenizer, *, preprocess: Optional[Callable] = None,
                      labels: Sequence[str] = ("cat", "rocket"), backgrounds: Sequence[str] = ("grass", "brick"),
                      attribute: str = "category", train_strengths: Sequence[float] = (0.95, 1.0),
                      n_train: int = 400,
                      n_test: int = 400, n_textspan: int = 400, layers=None, m: int = 20, rank: int = 80,
                      threshold: float = 0.5, min_relative_variance: float = 0.1,
                      max_heads: Optional[int] = None,
                      keywords: Optional[Sequence[str]] = None, pool: Optional[Sequence[str]] = None,
                      n_random: int = 10, n_sets: int = 5, seed: int = 0, ablate_early: bool = False,
                      batch_size: int = 32, progress: bool = True, parts_dir: Optional[str] = None,
                      fresh: bool = False, cache_dir=None) -> dict:
    """The planted-correlation experiment on generated scenes (see the module docstring).

    Image sets (disjoint seeds): TextSpan on ``n_textspan`` generic scenes (every background); a biased training
    set of ``n_train`` :class:`~nha_plugin.scenes.SpuriousSampler` scenes per strength in
    ``train_strengths`` (the share aligned; one probe each, ablated with its own set's means); a test set of
    ``n_test`` scenes with no correlation (strength ``1/len(labels)``).

    Returns a JSON-ready dict: protocol, the selected heads and every head's place score and texts, and per
    read-out the :func:`spurious_removal` result (plus the probe's training accuracy). With ``parts_dir``, each
    image set's head contributions are kept in a run folder below it (``textspan``, ``train_<s>``, ``test``), so a
    killed run resumes; ``fresh`` discards them.
    """
    from ..scenes import BACKGROUNDS, SceneDataset, SpuriousSampler
    from ..text.cache import embed_texts
    from ..vit.textspan_heads import head_text_spans

    keywords = list(keywords) if keywords is not None else list(BACKGROUNDS) + list(SCENE_PLACE_KEYWORDS)
    pool = list(pool) if pool is not None else scene_description_pool()
    collect = _collector(model, preprocess, parts_dir, batch_size=batch_size, progress=progress, fresh=fresh)

    def source(scenes):
        return lambda a, b: np.stack([scenes[i].image for i in range(a, b)])

    generic = SceneDataset(n_textspan, seed=seed + 7_000_001)
    ts_stats = collect("textspan", source(generic), n_textspan, {"set": "generic scenes", "seed": seed + 7_000_001},
                       layers=layers)
    emb = embed_texts(model, tokenizer, pool, None, cache_dir=cache_dir, progress=progress)
    spans = head_text_spans(ts_stats, emb, pool, m=m, rank=rank, progress=progress)
    selected = select_place_heads(spans, keywords, threshold, min_relative_variance, max_heads)
    candidates = [(l, h) for l in ts_stats.layers for h in range(ts_stats.num_heads)]

    def labelled(strength, n, s, name):
        sampler = SpuriousSampler(labels, backgrounds, strength=strength, n=n, seed=s, attribute=attribute)
        scenes = [sampler[i] for i in range(n)]
        y = [sc.meta["label"] for sc in scenes]
        g = [sc.meta["label"] * len(backgrounds) + list(backgrounds).index(sc.background) for sc in scenes]
        meta = {"set": name, "labels": list(labels), "backgrounds": list(backgrounds), "attribute": attribute,
                "strength": strength, "seed": s}
        st = collect(name, source(scenes), n, meta, layers=ts_stats.layers, labels=y, groups=g)
        return st, float(sampler.aligned.mean())

    strengths = [float(s) for s in train_strengths]
    if not strengths:
        raise ValueError("give at least one training-set strength (share of aligned training images)")
    trains = [labelled(st, n_train, seed + 7_000_002, f"train_{st:g}") for st in strengths]
    test, test_aligned = labelled(1.0 / len(labels), n_test, seed + 7_000_003, "test")
    names = [f"{lab} on {bg}" for lab in labels for bg in backgrounds]

    readouts = {}
    for st, (train, aligned) in zip(strengths, trains):
        w, b = fit_linear_probe(train.embedding, train.labels)
        readouts[f"probe@{st:g}"] = (w, b, f"logistic regression on a training set with {aligned:.3f} of the images "
                                           "aligned (label on its own background)", train)
    zs_bg = class_directions(model, tokenizer, [f"a photo of a {lab} on {bg}" for lab, bg in zip(labels, backgrounds)])
    readouts["zeroshot_background"] = (zs_bg, None, "prompts 'a photo of a {label} on {its background}'",
                                       trains[0][0])
    readouts["zeroshot"] = (class_directions(model, tokenizer, [f"a photo of a {lab}" for lab in labels]), None,
                            "prompts 'a photo of a {label}'", trains[0][0])
    results = _score_readouts(readouts, test, selected, candidates, names,
                              dict(n_random=n_random, n_sets=n_sets, seed=seed, ablate_early=ablate_early))
    protocol = _protocol_common(ts_stats, spans, f"{len(pool)} texts, no templates", keywords, threshold,
                                min_relative_variance, max_heads, n_random, n_sets, ablate_early, m)
    protocol["textspan"]["seed"] = seed + 7_000_001
    protocol.update({
        "dataset": "generated scenes (nha_plugin.scenes)", "labels": list(labels),
        "backgrounds": list(backgrounds), "attribute": attribute,
        "train": {"n": n_train, "aligned_shares": [a for _, a in trains], "seed": seed + 7_000_002,
                  "zero-shot ablation means": f"the training set with strength {strengths[0]:g}"},
        "test": {"n": n_test, "aligned_share": test_aligned, "seed": seed + 7_000_003,
                 "groups": {k: v["n"] for k, v in results["zeroshot"]["before"]["groups"].items()}},
    })
    return {"protocol": protocol, "selected_heads": [list(h) for h in selected],
            "head_scores": place_head_scores(spans, keywords), "readouts": results}


def waterbirds_experiment(model, tokenizer, root: str, *, preprocess: Optional[Callable] = None,
                          n_textspan: int = 1000, n_test: Optional[int] = None, layers=None, m: int = 20,
                          rank: int = 80, threshold: float = 0.5, min_relative_variance: float = 0.1,
                          max_heads: Optional[int] = None, keywords: Optional[Sequence[str]] = None,
                          pool: Sequence[str] = (), pool_desc: str = "",
                          templates: Sequence[str] = ("a photo of a {}.",),
                          n_random: int = 10, n_sets: int = 5, seed: int = 0, ablate_early: bool = False,
                          batch_size: int = 32, progress: bool = True, parts_dir: Optional[str] = None,
                          fresh: bool = False, cache_dir=None) -> dict:
    """Waterbirds: TextSpan on a seeded subset of ``n_textspan`` training images (whose head means are also the
    ablation values), place heads by keyword, zero-shot read-out ("a photo of a landbird." / "waterbird."), and
    worst-group accuracy over the 4 (bird x place) groups of the test split (``n_test`` seeded subset; all by
    default). ``parts_dir`` / ``fresh``: as :func:`scenes_experiment` (run folders ``train`` and ``test``)."""
    from ..datasets.waterbirds import CLASS_NAMES, GROUP_NAMES, PLACE_KEYWORDS, WaterbirdsDataset
    from ..text.cache import embed_texts
    from ..vit.textspan_heads import head_text_spans

    if not pool:
        raise ValueError("give a text pool (e.g. text.get_pool('words')) for the Waterbirds TextSpan")
    side = input_size(model)[0]
    keywords = list(keywords) if keywords is not None else list(PLACE_KEYWORDS)
    train_ds, test_ds = WaterbirdsDataset(root, "train", size=side), WaterbirdsDataset(root, "test", size=side)
    rng = np.random.default_rng(seed)
    ts_idx = np.sort(rng.permutation(len(train_ds))[:n_textspan])
    test_idx = np.arange(len(test_ds)) if n_test is None else np.sort(rng.permutation(len(test_ds))[:n_test])
    collect = _collector(model, preprocess, parts_dir, batch_size=batch_size, progress=progress, fresh=fresh)

    def source(ds, idx):
        return lambda a, b: ds.images(idx[a:b])

    train = collect("train", source(train_ds, ts_idx), len(ts_idx),
                    {"set": "waterbirds train", "root": str(root), "seed": seed}, layers=layers,
                    labels=train_ds.labels[ts_idx], groups=train_ds.groups[ts_idx])
    test = collect("test", source(test_ds, test_idx), len(test_idx),
                   {"set": "waterbirds test", "root": str(root), "seed": seed, "n_test": n_test},
                   layers=train.layers, labels=test_ds.labels[test_idx], groups=test_ds.groups[test_idx])
    emb = embed_texts(model, tokenizer, list(pool), None, cache_dir=cache_dir, progress=progress)
    spans = head_text_spans(train, emb, list(pool), m=m, rank=rank, progress=progress)
    selected = select_place_heads(spans, keywords, threshold, min_relative_variance, max_heads)
    candidates = [(l, h) for l in train.layers for h in range(train.num_heads)]
    from ..readout import check_templates, encode_texts
    templates = check_templates(templates)
    with torch.no_grad():
        w = torch.stack([F.normalize(encode_texts(model, tokenizer, [t.format(c) for t in templates]).mean(0), dim=-1)
                         for c in CLASS_NAMES], dim=1).double()
    results = _score_readouts({"zeroshot": (w, None, f"zero-shot, templates {list(templates)}", train)}, test,
                              selected, candidates, list(GROUP_NAMES),
                              dict(n_random=n_random, n_sets=n_sets, seed=seed, ablate_early=ablate_early))
    protocol = _protocol_common(train, spans, pool_desc or f"{len(pool)} texts, no templates", keywords, threshold,
                                min_relative_variance, max_heads, n_random, n_sets, ablate_early, m)
    counts = {k: v["n"] for k, v in results["zeroshot"]["before"]["groups"].items()}
    protocol.update({"dataset": f"Waterbirds at {root}",
                     "textspan_and_means": f"{len(ts_idx)} training images (seeded subset, seed {seed})",
                     "test": {"n": len(test_idx), "groups": counts}})
    return {"protocol": protocol, "selected_heads": [list(h) for h in selected],
            "head_scores": place_head_scores(spans, keywords), "readouts": results}
