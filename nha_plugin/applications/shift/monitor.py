"""The shift monitor: score every image for every concept, correlate, aggregate per group, test each group
against the reference group; resumable through a :class:`nha_plugin.runs.RunDir`.

A run stores three kinds of parts, each written once it is complete, so a killed run redoes at most one
stage: ``<part>fit`` (the pair signs and neuron/head PC0s fitted on the fit images), ``<part>group<i>`` (the
unit-normalised embeddings and every concept score of the i-th group's images) and ``<part>result`` (the
finished result). Every number after the forward passes is a deterministic function of these parts and the
seed, so a resumed run gives the numbers of an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...runs import RunDir, RunMismatchError
from ..two_sample import classifier_test, group_summary, ks_test, mmd_test, point_biserial
from .data import ShiftData, image_batches
from .units import METHODS, UnitDirections, concept_scores, select_units, unit_directions

__all__ = ["run_monitor"]

EMBEDDING_TESTS = ("unit-normalised image embeddings; MMD: Gaussian kernel, median-heuristic bandwidth, unbiased "
                   "MMD^2, permutation p; classifier: logistic regression, 50% held out, binomial p vs 0.5")


def _stage(run: Optional[RunDir], name: str, inputs: Mapping[str, Any], compute: Callable[[], dict]) -> dict:
    """The part ``name`` of ``run`` if it exists, else ``compute()`` saved as that part with ``inputs`` (what it
    was computed from: image indices as an array, concept names as a list). Without a run, ``compute()``.

    Raises:
        RunMismatchError: the part was computed from other inputs (the data changed under the same run key).
    """
    if run is None:
        return compute()
    tree = run.load_part(name)
    if tree is None:
        tree = {**compute(), **inputs}
        run.save_part(name, tree)
    for key, value in inputs.items():
        found = tree.get(key)
        if not (np.array_equal(found, value) if isinstance(value, np.ndarray) else found == value):
            raise RunMismatchError(f"{run.path / name}.part.safetensors was computed from other {key} than this "
                                   "run's: the data changed under the same run key. Pass --fresh (CLI) / fresh=True "
                                   "(API) to start over, or use another output folder.")
    return tree


def _fit(model, spec, preprocess, source: ShiftData, indices: np.ndarray, signs, batch_size: int, device, dtype,
         progress: bool) -> dict:
    """The state of :func:`unit_directions` fitted on the images ``indices`` of ``source``."""
    from ...models import decompose

    coeffs = torch.cat([decompose(model, x).pair_coefficients.to(torch.float64).cpu()
                        for _, x in image_batches(source, indices, preprocess, batch_size, device, dtype, "fit",
                                                  progress)])
    return unit_directions(spec, coeffs.to(spec.c_weight.dtype), pair_signs=signs, progress=progress).to_state()


def _score_group(model, data: ShiftData, indices: np.ndarray, units: Mapping, preprocess, batch_size: int, device,
                 dtype, desc: str, progress: bool) -> dict:
    """Unit-normalised embeddings (n, D) and every concept's scores {concept: {method: (n,)}} of ``indices``."""
    from ...models import decompose

    emb, scores = [], {c: {m: [] for m in METHODS} for c in units}
    for _, x in image_batches(data, indices, preprocess, batch_size, device, dtype, desc, progress):
        contrib = decompose(model, x)
        emb.append(F.normalize(contrib.embedding.double(), dim=-1).cpu().numpy())
        for c, u in units.items():
            for m, v in concept_scores(contrib, u).items():
                scores[c][m].append(v.double().cpu().numpy())
    return {"embeddings": np.concatenate(emb),
            "scores": {c: {m: np.concatenate(v) for m, v in per.items()} for c, per in scores.items()}}


def _signs_rule(pair_signs, spec, n_fit: int, fit_name: str):
    """(signs for :func:`unit_directions`, the rule as reported) of a ``pair_signs`` argument."""
    from ...pool import check_pair_signs

    if isinstance(pair_signs, str):
        if pair_signs != "fit":
            raise ValueError(f"pair_signs must be 'fit', an (H, C) tensor or None; got {pair_signs!r}")
        return None, f"paper's PC0 sign on {n_fit} images of {fit_name}"
    if pair_signs is None:
        return check_pair_signs(None, spec), "+1 (no signs)"
    return pair_signs, "given (H, C) signs"


def _check_args(data: ShiftData, concepts: Mapping[str, str], reference) -> Any:
    """The reference group (default the first) after checking the concepts and groups."""
    missing = [c for c in concepts if c not in data.presence]
    if missing:
        raise ValueError(f"no presence labels for concepts {missing}; data has {sorted(data.presence)}")
    if not concepts:
        raise ValueError("give at least one concept")
    order = data.order
    if len(order) < 2:
        raise ValueError(f"need at least two groups to monitor a shift; got {order}")
    reference = order[0] if reference is None else reference
    reference = reference.item() if isinstance(reference, np.generic) else reference
    if reference not in order:
        raise ValueError(f"reference group {reference!r} is not among the groups {order}")
    return reference


@torch.no_grad()
def run_monitor(model, preprocess, tokenizer, data: ShiftData, concepts: Mapping[str, str], *, k: int = 5,
                k_neurons: int = 5, k_heads: int = 1, templates: Union[None, str, Sequence[str]] = "imagenet",
                reference=None, pair_signs: Union[None, str, Tensor] = "fit", fit_data: Optional[ShiftData] = None,
                fit_images: int = 1000, n_permutations: int = 500, seed: int = 0, batch_size: int = 64,
                cache_dir=None, progress: bool = True, run: Optional[RunDir] = None, part: str = "",
                fit_part: Optional[str] = None) -> dict:
    """Score every image for every concept, correlate, aggregate per group and test each group against the
    reference group.

    Args:
        model, preprocess, tokenizer: as returned by :func:`nha_plugin.load_clip` (a CLIP-ResNet).
        data: the grouped images and each concept's presence (:class:`ShiftData`).
        concepts: concept name (a key of ``data.presence``) -> its text (embedded with ``templates``).
        k, k_neurons, k_heads: units kept per method.
        templates: ``"imagenet"`` (CLIP's 80), ``"photo"``, ``None`` or a list of ``{}`` strings.
        reference: the reference group (default: the first in sorted order).
        pair_signs: ``"fit"`` (the paper's sign rule on the fit images), an (H, C) +-1 tensor
            (e.g. ``DatasetStats.pc0_sign``) or None (+1 everywhere).
        fit_data: images that fit the pair signs and the neuron/head PC0s (e.g. :meth:`ShiftData.from_scenes`,
            a generic set as the paper's 1000 ImageNet images); default: the reference group. The sign rule
            is fragile on a set where the concept is rare: most large centred deviations then come from
            images without it, which flips the concept pairs' signs.
        fit_images: at most this many fit images (the first ones) are used.
        n_permutations, seed: MMD permutations and the seed of every random step.
        batch_size: images per forward pass.
        cache_dir: text-embedding cache (see :func:`nha_plugin.text.embed_texts`).
        progress: tqdm bars.
        run: a run folder whose key covers every argument above, the data and the weights: finished stages
            are read from its parts and new ones saved there (module docstring), so a killed run resumes.
        part: prefix of this call's part names, to keep several monitor calls in one run folder apart.
        fit_part: the name of the fit's part (default ``<part>fit``); calls that fit on the same images with
            the same signs may share one.

    Returns:
        A JSON-ready dict: ``protocol``, ``groups`` (per group: n and the embedding tests vs the reference)
        and ``concepts`` (per concept: units, per-image r, per-group means/shares, group-mean r, KS tests).

    Raises:
        RunMismatchError: a part of ``run`` was computed on other images.
        nha_plugin.files.CorruptFileError: a part of ``run`` is damaged (names the file).
    """
    reference = _check_args(data, concepts, reference)
    result = run.load_part(f"{part}result") if run is not None else None
    if result is not None:
        return result
    parts = {"fit": fit_part or f"{part}fit", "group": f"{part}group"}
    result = _monitor(model, preprocess, tokenizer, data, concepts, reference, run, parts, k=k, k_neurons=k_neurons,
                      k_heads=k_heads, templates=templates, pair_signs=pair_signs, fit_data=fit_data,
                      fit_images=fit_images, n_permutations=n_permutations, seed=seed, batch_size=batch_size,
                      cache_dir=cache_dir, progress=progress)
    if run is not None:
        run.save_part(f"{part}result", result)
    return result


def _monitor(model, preprocess, tokenizer, data: ShiftData, concepts: Mapping[str, str], reference,
             run: Optional[RunDir], parts: Mapping[str, str], *, k, k_neurons, k_heads, templates, pair_signs, fit_data,
             fit_images, n_permutations, seed, batch_size, cache_dir, progress) -> dict:
    """:func:`run_monitor` after its argument checks, stage by stage."""
    from ...adapters import get_spec
    from ...text import embed_texts, get_templates

    order = data.order
    spec = get_spec(model).detached()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    tpl = get_templates(templates) if isinstance(templates, str) or templates is None else list(templates)
    names = list(concepts)
    texts = embed_texts(model, tokenizer, [concepts[c] for c in names], tpl, cache_dir=cache_dir,
                        progress=progress)

    if fit_data is None:
        fit_source, fit_idx = data, np.flatnonzero(data.groups == reference)[:fit_images]
        fit_name = f"reference group {reference}"
    else:
        fit_source, fit_idx, fit_name = fit_data, np.arange(min(len(fit_data), fit_images)), fit_data.name
    signs, sign_rule = _signs_rule(pair_signs, spec, len(fit_idx), fit_name)
    state = _stage(run, parts["fit"], {"indices": fit_idx}, lambda: _fit(
        model, spec, preprocess, fit_source, fit_idx, signs, batch_size, device, dtype, progress))
    dirs = UnitDirections.from_state({key: state[key] for key in ("pair_signs", "neurons", "heads", "source")})
    units = {c: select_units(spec, texts[i].to(spec.c_weight), dirs, k=k, k_neurons=k_neurons, k_heads=k_heads,
                             concept=c) for i, c in enumerate(names)}

    N = len(data)
    scores = {c: {m: np.zeros(N) for m in METHODS} for c in names}
    emb = np.zeros((N, spec.output_dim))
    for gi, label in enumerate(order):
        idx = np.flatnonzero(data.groups == label)
        got = _stage(run, f"{parts['group']}{gi}", {"indices": idx, "concepts": names}, lambda: _score_group(
            model, data, idx, units, preprocess, batch_size, device, dtype, f"scoring {label}", progress))
        emb[idx] = got["embeddings"]
        for c in names:
            for m in METHODS:
                scores[c][m][idx] = got["scores"][c][m]

    protocol = {
        "data": data.name, "n_images": N, "groups": order, "reference": reference,
        "k": k, "k_neurons": k_neurons, "k_heads": k_heads,
        "templates": templates if isinstance(templates, str) or templates is None else list(templates),
        "pair_signs": sign_rule, "unit_directions": f"{dirs.source} of {fit_name}", "fit_images": int(len(fit_idx)),
        "n_permutations": n_permutations, "seed": seed, "embedding_tests": EMBEDDING_TESTS,
        "score_tests": "two-sample KS (exact) of each score vs the reference group",
    }
    return {"protocol": protocol, "groups": _group_tests(data, emb, reference, n_permutations, seed),
            "concepts": {c: _concept_result(data, c, concepts[c], units[c].to_dict(), scores[c], reference)
                         for c in names}}


def _group_tests(data: ShiftData, emb: np.ndarray, reference, n_permutations: int, seed: int) -> list:
    """Per group: n, and (other than the reference) MMD and classifier tests of its embeddings (n, D) against
    the reference group's."""
    ref = data.groups == reference
    rows = []
    for label in data.order:
        sel = data.groups == label
        row = {"group": label, "n": int(sel.sum())}
        if label != reference:
            row["mmd"] = mmd_test(emb[ref], emb[sel], n_permutations=n_permutations, seed=seed)
            row["classifier"] = classifier_test(emb[ref], emb[sel], seed=seed)
        rows.append(row)
    return rows


def _concept_result(data: ShiftData, concept: str, text: str, units: dict, scores: Mapping[str, np.ndarray],
                    reference) -> dict:
    """One concept's part of the result from its per-image ``scores`` {method: (N,)}."""
    order, pres = data.order, data.presence[concept]
    ref = data.groups == reference
    per_method = {m: group_summary(scores[m], pres, data.groups, order) for m in METHODS}
    groups = []
    for gi, label in enumerate(order):
        sel = data.groups == label
        row = {"group": label, "n": int(sel.sum()), "share": per_method[METHODS[0]]["groups"][gi]["share"],
               "mean": {m: per_method[m]["groups"][gi]["mean"] for m in METHODS},
               "sd": {m: per_method[m]["groups"][gi]["sd"] for m in METHODS}}
        if label != reference:
            row["ks"] = {m: ks_test(scores[m][ref], scores[m][sel]) for m in METHODS}
        groups.append(row)
    return {"text": text, "presence": data.presence_rule.get(concept, "given"), "n_present": int(pres.sum()),
            "units": units, "per_image_r": {m: point_biserial(scores[m], pres) for m in METHODS},
            "group_mean_r": {m: per_method[m]["r"] for m in METHODS}, "groups": groups}
