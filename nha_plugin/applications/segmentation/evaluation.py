"""Evaluation of a :class:`.segmentor.Segmentor` over a dataset, resumable: dataset-level confusion matrices of every
method (and the oracle floor), per-image matrices for the bootstrap, the first few images as examples.

With ``run_dir`` the evaluation is a :class:`nha_plugin.runs.RunDir` keyed by :func:`evaluation_key` (the caller's
settings, the segmentor's identity and weights fingerprint, the dataset's identity, the scoring settings and
:data:`RUN_FORMAT`): another configuration in the same folder is refused naming the differing fields
(:class:`nha_plugin.runs.RunMismatchError`), ``fresh=True`` starts over. Work is saved as parts
``images_<start>.part.safetensors``, each covering consecutive images from ``start``: their summed confusion
matrices, their per-image matrices (with ``per_image``) and the examples among them. A resumed evaluation walks the
chain of parts from image 0 and segments only the images after it; the counts are integers, so its numbers equal
an uninterrupted run's. Parts are pickle-free (:func:`nha_plugin.files.save_state`); one that is corrupt or does not
fit the run raises :class:`nha_plugin.files.CorruptFileError` naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ...files import CorruptFileError
from ...runs import RunDir, images_fingerprint, run_key
from .metrics import ConfusionMatrix
from .segmentor import Segmentor

__all__ = ["ORACLE", "ORACLE_DESCRIPTION", "RUN_FORMAT", "dataset_identity", "evaluation_key", "part_name",
           "evaluate"]

ORACLE = "oracle-majority"
ORACLE_DESCRIPTION = "oracle floor: every pixel gets the image's most frequent ground-truth class (no localisation)"
# Bump when what a part holds, or how its numbers are computed, changes: older run folders are then refused.
RUN_FORMAT = 1


def dataset_identity(dataset, n: int) -> dict:
    """What identifies the first ``n`` items of a dataset, JSON-able, for run keys.

    Args:
        dataset: has ``class_names``, ``len`` and ``ds[i] -> (image, label)``; its ``identity()`` (e.g.
            :meth:`.scenes.SceneSegmentation.identity`) is used when it has one, else its type and length.
        n: the items scored.

    Returns:
        ``{"dataset", "n", "class_names", "first_item"}``; ``first_item`` is the fingerprint of item 0's image and
        label (:func:`nha_plugin.runs.images_fingerprint`), so another copy of the data or a changed generator is
        told apart even where the identity looks the same.
    """
    own = dataset.identity() if callable(getattr(dataset, "identity", None)) else \
        {"type": f"{type(dataset).__module__}.{type(dataset).__qualname__}", "len": len(dataset)}
    first = None
    if len(dataset):
        image, label = dataset[0]
        first = images_fingerprint([np.asarray(image), np.asarray(label)])
    return {"dataset": own, "n": int(n), "class_names": list(dataset.class_names), "first_item": first}


def evaluation_key(segmentor: Segmentor, dataset, *, n: int, no_background: bool, ignore_index: int,
                   scored: Sequence[str], per_image: bool, config: Optional[Mapping] = None) -> dict:
    """The run key of an evaluation (:func:`nha_plugin.runs.run_key`): everything that changes its numbers.

    Args:
        segmentor: its :meth:`~.segmentor.Segmentor.identity` and weights fingerprint.
        dataset, n: :func:`dataset_identity`.
        no_background, ignore_index, scored, per_image: the scoring settings (``scored``: the method names, oracle
            included).
        config: the caller's own settings (model name, templates, ...).

    Returns:
        ``{"version", "config": {"settings", "segmentor", "scoring"}, "data", "weights"}``.
    """
    return run_key({"settings": dict(config or {}), "segmentor": segmentor.identity(),
                    "scoring": {"methods": list(scored), "no_background": bool(no_background),
                                "ignore_index": int(ignore_index), "per_image": bool(per_image)}},
                   data=dataset_identity(dataset, n), weights=segmentor.weights_fingerprint(), version=RUN_FORMAT)


def part_name(start: int) -> str:
    """The name of the part whose images start at index ``start``."""
    return f"images_{start:07d}"


def _is_counts(x, shape: Tuple[int, ...]) -> bool:
    return isinstance(x, np.ndarray) and x.shape == shape and np.issubdtype(x.dtype, np.integer)


def _checked_count(part, path: Path, start: int, total: int, names: Sequence[str], K: int, per_image: bool) -> int:
    """The number of images a loaded part covers, after checking that it fits this run (a part is only ever written
    by this module, so anything else is a damaged or planted file)."""
    try:
        count = part["count"]
        fits = (part["start"] == start and type(count) is int and 1 <= count <= total - start
                and all(_is_counts(part["confusion"][m], (K, K)) for m in names)
                and (not per_image or all(_is_counts(part["per_image"][m], (count, K, K)) for m in names))
                and all(isinstance(i, int) and start <= i < start + count and set(names) <= set(ex["pred"])
                        and isinstance(ex["image"], np.ndarray) and isinstance(ex["label"], np.ndarray)
                        for i, ex in part["examples"].items()))
    except (KeyError, TypeError, AttributeError):
        fits = False
    if not fits:
        raise CorruptFileError(path, "its contents do not fit this run",
                               f"the part of images {start}.. of a run scoring {list(names)} on {K} classes")
    return count


def _segment(segmentor: Segmentor, dataset, indices: Sequence[int], scorer: ConfusionMatrix,
             oracle: bool) -> List[Tuple[int, np.ndarray, np.ndarray, Dict[str, np.ndarray]]]:
    """[(index, image (H, W, 3), raw label (H, W), {method: prediction (H, W)})] for dataset items ``indices``; the
    oracle predicts each image's most frequent scored label everywhere."""
    items = [dataset[i] for i in indices]
    preds = segmentor.predict([im for im, _ in items], sizes=[lab.shape for _, lab in items])
    out = []
    for i, (im, lab), pred in zip(indices, items, preds):
        if oracle:
            red = scorer.reduce(lab)
            valid = red[red != scorer.ignore_index]
            pred[ORACLE] = np.full(lab.shape, np.bincount(valid).argmax() if valid.size else 0, dtype=np.int64)
        out.append((i, np.asarray(im), lab, pred))
    return out


def evaluate(segmentor: Segmentor, dataset, *, n: Optional[int] = None, no_background: Optional[bool] = None,
             ignore_index: int = 255, oracle: bool = True, show: int = 6, images_per_step: int = 4,
             run_dir: Union[str, Path, None] = None, fresh: bool = False, config: Optional[Mapping] = None,
             save_every: int = 20, per_image: bool = False, progress: bool = True) -> Dict[str, object]:
    """mIoU / pixAcc / mAcc of every method of ``segmentor`` over ``dataset``, from dataset-level confusion matrices.

    Args:
        segmentor: a :class:`.segmentor.Segmentor` whose texts are ``dataset.class_names`` in order.
        dataset: ``len`` + ``ds[i] -> (PIL image, raw label (H, W))``, with ``class_names`` and ``no_background``
            (and, best, ``identity()``: :func:`dataset_identity`).
        n: score the first n images (all by default).
        no_background: override ``dataset.no_background`` (Context-59: label 0 ignored, l -> l - 1).
        ignore_index: label never scored.
        oracle: also score :data:`ORACLE` (each image's most frequent true class everywhere; needs no model).
        show: keep the first ``show`` images with their labels and predictions (``result["examples"]``).
        images_per_step: images whose crops are batched together.
        run_dir: a folder to save the work in (a :class:`nha_plugin.runs.RunDir`); a later call with the same key
            (:func:`evaluation_key`) resumes from it, another key is refused (``RunMismatchError``). None: no saving.
        fresh: with ``run_dir``, discard the run saved there and start over.
        config: the caller's settings that identify the run (model, templates, ...), part of the key.
        save_every: images per saved part (at least; a part ends at the end of a step).
        per_image: also return each image's confusion matrix, ``result["per_image"][method]`` (n, K, K) int32 (for
            :func:`.metrics.bootstrap_miou`; n*K*K*4 bytes per method, saved in the parts too).
        progress: tqdm bar.

    Returns:
        ``{"methods": {name: {"miou", "pixacc", "macc", "iou": [...], "pixels"}}, "n": int, "class_names": [...],
        "no_background", "ignore_index", "examples": [{"image", "label", "pred": {name: (H, W)}}]}`` (examples hold
        numpy arrays), plus ``"per_image"`` with ``per_image``.

    Raises:
        nha_plugin.runs.RunMismatchError: ``run_dir`` holds another run.
        nha_plugin.files.CorruptFileError: a file of the run in ``run_dir`` is damaged (named in the message).
    """
    from tqdm.auto import tqdm
    total = len(dataset) if n is None else min(int(n), len(dataset))
    nb = dataset.no_background if no_background is None else no_background
    K = len(dataset.class_names)
    if K != segmentor.num_classes:
        raise ValueError(f"the segmentor has {segmentor.num_classes} class texts but the dataset "
                         f"{K} classes; build the texts from dataset.class_names")
    if images_per_step < 1 or save_every < 1:
        raise ValueError(f"images_per_step and save_every must be at least 1; got {images_per_step}, {save_every}")
    names = list(segmentor.methods) + ([ORACLE] if oracle else [])
    totals = {m: ConfusionMatrix(K, ignore_index, nb) for m in names}
    blocks: Dict[str, List[np.ndarray]] = {m: [] for m in names}
    examples: Dict[int, dict] = {}

    def example(image, label, pred) -> dict:
        return {"image": image, "label": totals[names[0]].reduce(label).astype(np.int16),
                "pred": {m: pred[m].astype(np.int16) for m in names}}

    run, done = None, 0
    if run_dir is not None:
        key = evaluation_key(segmentor, dataset, n=total, no_background=nb, ignore_index=ignore_index, scored=names,
                             per_image=per_image, config=config)
        run = RunDir(run_dir, key, fresh=fresh)
        while done < total and (part := run.load_part(part_name(done))) is not None:
            count = _checked_count(part, run.part_path(part_name(done)), done, total, names, K, per_image)
            for m in names:
                totals[m].matrix += part["confusion"][m]
                if per_image:
                    blocks[m].append(part["per_image"][m].astype(np.int32))
            examples.update({i: ex for i, ex in part["examples"].items() if i < show})
            done += count
    bar = tqdm(total=total, initial=done, desc="segmenting", unit="img", disable=not progress)
    pending: List[Tuple[int, Dict[str, np.ndarray]]] = []
    for s in range(done, total, images_per_step):
        for i, image, label, pred in _segment(segmentor, dataset, range(s, min(s + images_per_step, total)),
                                              totals[names[0]], oracle):
            matrices = {m: totals[m].update(pred[m], label) for m in names}
            pending.append((i, matrices))
            if per_image:
                for m in names:
                    blocks[m].append(matrices[m][None].astype(np.int32))
            if i < show:
                examples[i] = example(image, label, pred)
        bar.update(min(images_per_step, total - s))
        if run is not None and (len(pending) >= save_every or s + images_per_step >= total):
            start = pending[0][0]
            run.save_part(part_name(start), {
                "start": start, "count": len(pending),
                "confusion": {m: sum(mx[m] for _, mx in pending) for m in names},
                "per_image": {m: np.stack([mx[m] for _, mx in pending]).astype(np.int32) for m in names}
                if per_image else {},
                "examples": {i: examples[i] for i, _ in pending if i in examples}})
            pending = []
    bar.close()
    missing = [i for i in range(min(show, total)) if i not in examples]     # a resumed run asked for more examples
    if missing:
        for i, image, label, pred in _segment(segmentor, dataset, missing, totals[names[0]], oracle):
            examples[i] = example(image, label, pred)
    out = {"methods": {m: totals[m].summary() for m in names}, "n": total, "class_names": list(dataset.class_names),
           "no_background": nb, "ignore_index": ignore_index, "examples": [examples[i] for i in sorted(examples)]}
    if per_image:
        out["per_image"] = {m: np.concatenate(blocks[m]) if blocks[m] else np.zeros((0, K, K), np.int32)
                            for m in names}
    return out
