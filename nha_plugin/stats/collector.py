"""One streaming pass that collects :class:`~nha_plugin.stats.DatasetStats`: batching, sharding under
``torch.distributed``, checkpoints and resume.

Sharding (e.g. ``torchrun --nproc_per_node N``; gloo on CPU, NCCL on GPU):

- a ``Dataset`` with ``batch_size``: process r reads indices ``r, r + W, r + 2W, ...`` (W = world size);
- an iterable of batches: every process iterates the whole loader and process r decomposes batches
  ``r, r + W, ...`` (round robin), so the loader must yield the same batches in the same order on every
  process. Loading is then paid W times: for large data pass a Dataset.

Sample indices are dataset indices (Dataset) or positions in the stream (iterable), so they are the same for
any number of processes, and the merged statistics too.

Checkpoints are statistics files (:meth:`DatasetStats.save`, checksummed) holding the run's key
(:func:`nha_plugin.runs.run_key` over k, the head-covariance setting, the batching and process layout, the
data description, the pool's and the image tower's weights fingerprints and the format version) and the
position in the data. Resuming refuses a checkpoint of another run (:class:`StatsMismatchError`) and a
corrupted one (:class:`nha_plugin.files.CorruptFileError`, naming the file).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..images import check_pixels
from ..runs import RunMismatchError, check_key, dist_info, module_fingerprint, run_key
from ..spec import AttentionPoolSpec
from .accumulators import DatasetStats, default_head_covariance
from .identity import FORMAT_VERSION, StatsMismatchError, as_spec, spec_fingerprint

__all__ = ["collect", "rank_path", "checkpoint_path", "checkpoint_key", "first_tensor", "stack_images"]

Batches = Iterator[tuple[Tensor, Tensor]]


# ---- processes and files -----------------------------------------------------------------------------------
def rank_path(path: Union[str, Path], rank: int, world: int) -> Path:
    """The file of process ``rank`` of ``world``: ``path`` itself for one process, else
    ``STEM.rank{r}-of-{W}SUFFIX`` beside it."""
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def checkpoint_path(checkpoint: Union[str, Path]) -> Path:
    """This process's checkpoint file for :func:`collect`'s ``checkpoint`` argument (:func:`rank_path`)."""
    return rank_path(checkpoint, *dist_info())


def checkpoint_key(model, spec: AttentionPoolSpec, *, k: int, head_covariance: bool, mode: str,
                   batch_size: Optional[int], data, data_length: Optional[int]) -> dict:
    """The run key a checkpoint of :func:`collect` stores and a resumed run must match.

    Args:
        model: what was passed to :func:`collect` (its image tower, when a module, is fingerprinted too:
            the pair coefficients depend on the trunk, which the spec does not hold).
        spec: its spec (the pool's weights fingerprint, :func:`spec_fingerprint`).
        k, head_covariance: the statistics' settings.
        mode: ``"dataset"`` or ``"iterable"``.
        batch_size: the Dataset batch size (None for an iterable).
        data: the JSON-able data description.
        data_length: the Dataset's length (None for an iterable).

    Returns:
        A :func:`nha_plugin.runs.run_key` dict.
    """
    rank, world = dist_info()
    tower = getattr(model, "visual", model)
    return run_key({"k": k, "head_covariance": head_covariance, "mode": mode, "batch_size": batch_size,
                    "world_size": world, "rank": rank},
                   data={"description": data, "length": data_length}, weights=spec_fingerprint(spec),
                   version=FORMAT_VERSION,
                   image_tower=module_fingerprint(tower) if isinstance(tower, nn.Module) else None)


# ---- batches -----------------------------------------------------------------------------------------------
def first_tensor(item) -> Tensor:
    """An image tensor from a dataset item or a batch: the tensor itself or the first entry of a tuple/dict.

    Args:
        item: a tensor, a tuple/list whose first entry is a tensor, or a dict with an ``image``, ``images`` or
            ``pixel_values`` tensor.

    Returns:
        That tensor, (3, S, S) for an item or (B, 3, S, S) for a batch.
    """
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, dict):
        for key in ("image", "images", "pixel_values"):
            if isinstance(item.get(key), Tensor):
                return item[key]
    raise TypeError(f"expected image tensors, (images, labels) tuples or dicts with an 'image' tensor; got "
                    f"{type(item).__name__}. Apply the model's preprocess in the dataset")


def stack_images(items: list) -> Tensor:
    """``collate_fn`` of the Dataset mode: the items' images (3, S, S) stacked to (B, 3, S, S)."""
    return torch.stack([first_tensor(x) for x in items])


def _dataset_batches(dataset, batch_size: int, rank: int, world: int, start_batch: int, num_workers: int) -> Batches:
    """(indices, images) batches of this rank's shard ``rank::world`` from batch ``start_batch`` on."""
    from torch.utils.data import DataLoader, Subset
    shard = list(range(rank, len(dataset), world))
    rest = shard[start_batch * batch_size:]
    if not rest:
        return
    loader = DataLoader(Subset(dataset, rest), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=stack_images)
    for b, images in enumerate(loader):
        yield torch.tensor(rest[b * batch_size:b * batch_size + images.shape[0]]), images


def _stream_batches(loader: Iterable, rank: int, world: int, start_batch: int, start_sample: int,
                    state: dict) -> Batches:
    """(indices, images) for the stream batches ``rank, rank + world, ...`` at or after ``start_batch``;
    ``state`` tracks the stream position (batches, samples) fully accounted for."""
    position = start_sample
    for b, batch in enumerate(loader):
        if b < start_batch:
            continue
        images = first_tensor(batch)
        indices = torch.arange(position, position + images.shape[0])
        position += images.shape[0]
        # advanced before the batch is processed: a checkpoint is only written after processing
        state["batches"], state["samples"] = b + 1, position
        if b % world == rank:
            yield indices, images


# ---- the pass ----------------------------------------------------------------------------------------------
def _check_resumable(stats: DatasetStats, key: dict, path: Path) -> None:
    try:
        check_key(stats.meta.get("run_key"), key, path)
    except RunMismatchError as err:
        raise StatsMismatchError(
            f"{err}\nThe checkpoint belongs to another run: resuming needs the same model, data description (meta), "
            "loader, batch size, k, head_covariance and number of processes; collect(..., resume=False) starts "
            "over") from None


def collect(model, loader, *, batch_size: Optional[int] = None, k: int = 50,
            head_covariance: Optional[bool] = None, checkpoint: Union[str, Path, None] = None,
            checkpoint_every: int = 50, resume: bool = False, progress: bool = True, num_workers: int = 0,
            meta: Optional[dict] = None) -> DatasetStats:
    """One streaming pass over images that collects :class:`DatasetStats` of the pair coefficients.

    Args:
        model: a CLIP-ResNet (open_clip / OpenAI / timm, whole model or image tower) or its spec.
        loader: an iterable of image batches (B, 3, S, S) or of (images, labels, ...) tuples, e.g. a
            ``DataLoader``; or, with ``batch_size``, a map-style ``Dataset`` whose items are image tensors
            (3, S, S) or (image, label) tuples. Images must be preprocessed float pixels (raw integer pixels are
            refused); they are moved to the model's device and dtype.
        batch_size: set when ``loader`` is a Dataset (then sharded by index under torch.distributed).
        k: length of the per-pair top-k lists (the paper uses 50).
        head_covariance: keep the (H, D, D) head co-moments; None: as the resumed checkpoint, else only when
            H * D * D <= 2**24.
        checkpoint: file for periodic atomic checkpoints of the accumulators (one per process under
            torch.distributed: :func:`checkpoint_path`). Left in place at the end (marked complete), so a
            resumed finished run returns at once.
        checkpoint_every: batches (of this process) between checkpoints.
        resume: continue from ``checkpoint`` if it exists, skipping the batches it consumed. The loader must
            yield the same batches in the same order as before (a deterministic loader). False: start over
            (the checkpoint is overwritten at the first save).
        progress: tqdm progress bar (rank 0 only).
        num_workers: DataLoader workers when ``loader`` is a Dataset.
        meta: JSON-able fields stored with the statistics (e.g. a description of the data). Its ``"data"`` entry
            (or the whole dict) identifies the data in the checkpoint's run key.

    Returns:
        :class:`DatasetStats`, merged over all processes when torch.distributed is initialised.

    Raises:
        StatsMismatchError: ``resume`` and the checkpoint belongs to another run (names each difference).
        nha_plugin.files.CorruptFileError: ``resume`` and the checkpoint is corrupted or not statistics.
        TypeError, ValueError: a batch is not float pixels (B, 3, H, W) (:func:`nha_plugin.images.check_pixels`).
    """
    from tqdm.auto import tqdm

    from ..models import decompose
    spec = as_spec(model).detached()
    rank, world = dist_info()
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1; got {checkpoint_every}")
    is_dataset = batch_size is not None
    if is_dataset:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if not (hasattr(loader, "__getitem__") and hasattr(loader, "__len__")):
            raise TypeError(f"batch_size was given, so loader must be a map-style Dataset (__getitem__ and __len__); "
                            f"got {type(loader).__name__}. Pass an iterable of batches without batch_size instead")
    path = checkpoint_path(checkpoint) if checkpoint is not None else None
    stats = DatasetStats.load(path, device=spec.device) if resume and path is not None and path.is_file() else None
    if head_covariance is None:
        head_covariance = stats.head_comoment is not None if stats is not None else default_head_covariance(spec)
    key = None if path is None else checkpoint_key(
        model, spec, k=k, head_covariance=head_covariance, mode="dataset" if is_dataset else "iterable",
        batch_size=batch_size, data=json.loads(json.dumps((meta or {}).get("data", meta or {}), default=str)),
        data_length=len(loader) if is_dataset else None)
    state = {"batches": 0, "samples": 0, "complete": False}
    if stats is not None:
        _check_resumable(stats, key, path)
        stats.spec = spec
        state.update(stats.meta.get("state", {}))
    else:
        stats = DatasetStats.empty(spec, k=k, head_covariance=head_covariance)
    if key is not None:
        stats.meta["run_key"] = key
    if meta:
        stats.meta.update(meta)

    def save_checkpoint() -> None:
        if path is not None:
            stats.meta["state"] = dict(state)
            stats.save(path)

    if is_dataset:
        per_rank = len(range(rank, len(loader), world))
        total = math.ceil(per_rank / batch_size)
        batches = _dataset_batches(loader, batch_size, rank, world, state["batches"], num_workers)
    else:
        total = math.ceil(len(loader) / world) if hasattr(loader, "__len__") else None
        batches = _stream_batches(loader, rank, world, state["batches"], state["samples"], state)
    done_here = state["batches"] if is_dataset else math.ceil(max(0, state["batches"] - rank) / world)
    if not state["complete"]:
        bar = tqdm(total=total, initial=done_here, desc="dataset statistics", unit="batch",
                   disable=not progress or rank != 0)
        since = 0
        for indices, images in batches:
            # before the cast: uint8 pixels cast to floats would pass every later check
            check_pixels(images, preprocess_hint="the model's preprocess (in the dataset or loader)")
            images = images.to(spec.device, spec.dtype)
            stats.update(decompose(spec, images).pair_coefficients, indices)
            if is_dataset:
                state["batches"] += 1
                state["samples"] += images.shape[0]
            since += 1
            bar.update(1)
            if since >= checkpoint_every:
                save_checkpoint()
                since = 0
        bar.close()
        state["complete"] = True
        save_checkpoint()
    stats.meta["state"] = dict(state)
    if world > 1:
        stats.all_reduce()
    if stats.count == 0:
        raise ValueError("the loader yielded no images")
    return stats
