"""Resumable runs: run keys, fingerprints, run folders and per-item records, on top of :mod:`nha_plugin.files`.

A run folder holds ``run.json`` (the run's key: settings, data identity, weights fingerprint, format version);
reopening it with another key raises :class:`RunMismatchError` naming each difference, and ``fresh=True``
(``--fresh``) starts over. Example::

    key = runs.run_key(config, data={"dataset": "scenes", "seed": 0}, weights=runs.module_fingerprint(model))
    run = runs.RunDir(out, key, fresh=args.fresh)          # RunMismatchError if `out` holds another run
    for i in range(n_chunks):
        if not run.has_part(f"chunk_{i:05d}"):
            run.save_part(f"chunk_{i:05d}", compute(i))
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .files import (FORMAT_VERSION, CorruptFileError, Device, PathLike, jsonable, load_state, read_json, save_state,
                    tensor_bytes, write_json)

__all__ = ["dist_info", "init_distributed", "barrier", "RunMismatchError", "run_key", "check_key", "tensor_fingerprint", "module_fingerprint",
           "texts_fingerprint", "images_fingerprint", "RunDir", "append_records", "read_records"]

_FRESH = "Pass --fresh (CLI) / fresh=True (API) to discard it and start over, or use another output folder."


class RunMismatchError(ValueError):
    """An output folder holds a run with another key (settings, data or weights)."""


# ---- run keys and fingerprints -----------------------------------------------------------------------------
def run_key(config: Any, *, data: Any = None, weights: Optional[str] = None, version: int = 1, **extra: Any) -> dict:
    """The identity of a run, ``{"version", "config", "data", "weights", **extra}``, JSON-normalised.

    Args:
        config: the settings that change results (e.g. ``vars(args)`` minus output paths, verbosity, ``fresh``).
        data: what identifies the inputs (dataset, split, seed, :func:`images_fingerprint`, ...).
        weights: the model's fingerprint (:func:`module_fingerprint`).
        version: bump it when the meaning of the stored results changes.
        **extra: more JSON-able fields.

    Returns:
        A dict equal to its JSON round trip (tuples become lists, Paths and numpy scalars plain values).
    """
    key = {"version": version, "config": config, "data": data, "weights": weights, **extra}
    return json.loads(json.dumps(key, default=jsonable))


_MISSING = object()


def _diff(found: Any, expected: Any, where: str) -> List[str]:
    if isinstance(found, dict) and isinstance(expected, dict):
        return [line for k in dict.fromkeys([*found, *expected]) for line in
                _diff(found.get(k, _MISSING), expected.get(k, _MISSING), f"{where}.{k}" if where else k)]
    if found == expected:
        return []
    text = [json.dumps(v, default=str) if v is not _MISSING else "<missing>" for v in (found, expected)]
    text = [f"{s[:40]}...{s[-10:]} ({len(s)} chars)" if len(s) > 60 else s for s in text]
    return [f"  {where or '(key)'}: found {text[0]}, expected {text[1]}"]


def check_key(found: Any, expected: Any, path: PathLike) -> None:
    """Raise :class:`RunMismatchError` naming ``path`` (the output) and each differing field (``config.lr:
    found 0.1, expected 0.2``) unless the two keys are equal after JSON normalisation."""
    lines = _diff(*(json.loads(json.dumps(k, default=jsonable)) for k in (found, expected)), "")
    if lines:
        raise RunMismatchError(f"{path} holds a run with other settings, data or weights:\n" + "\n".join(lines)
                               + "\n" + _FRESH)


def _hash_into(h: Any, t: Any, exact: bool) -> None:
    t = t.detach() if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t))
    t = t if exact or not t.is_floating_point() else t.to(torch.float32)
    h.update(f"{str(t.dtype)[6:]}{tuple(t.shape)};".encode())
    h.update(tensor_bytes(t))


def tensor_fingerprint(*tensors: Any, exact: bool = False) -> str:
    """sha256 hex over the dtypes, shapes and values of tensors or numpy arrays (any shape and device), in order.

    By default floating tensors are cast to float32 first, so fp32 and fp64 copies of the same weights agree
    (like ``stats.spec_fingerprint``); ``exact=True`` hashes them as they are. Integers and bools are exact."""
    h = hashlib.sha256()
    for t in tensors:
        _hash_into(h, t, exact)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module, *, exclude: Sequence[str] = (), exact: bool = False) -> str:
    """sha256 hex over a module's parameters and buffers and their names (sorted), as :func:`tensor_fingerprint`;
    names starting with a prefix in ``exclude`` are skipped (``("visual.",)``: the text side of a CLIP)."""
    h = hashlib.sha256()
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name in sorted(n for n in named if not n.startswith(tuple(exclude))):
        h.update(f"{name}:".encode())
        _hash_into(h, named[name], exact)
    return h.hexdigest()


def texts_fingerprint(texts: Iterable[str]) -> str:
    """sha256 hex of a sequence of strings (order matters; unambiguous for any characters)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def images_fingerprint(images: Any) -> str:
    """sha256 hex of an image batch, a tensor / array (N, ...), or of a sequence of tensors, arrays or PIL
    images (each hashed with its shape), as :func:`tensor_fingerprint` (floating values as float32)."""
    items = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else list(images)
    return tensor_fingerprint(*(im if isinstance(im, torch.Tensor) else np.asarray(im) for im in items))


# ---- resumable run folders ---------------------------------------------------------------------------------
_PART, _RECORDS = ".part.safetensors", ".records.jsonl"
_OWNED = re.compile(r"run\.json|.+\.part\.safetensors|.+\.records\.jsonl|\.(run\.json|.+\.part\.safetensors)\..+\.tmp")


class RunDir:
    """An output folder whose named parts let a killed run resume, never mixing runs of different keys.

    ``run.json`` holds the key. The run owns exactly the files (not folders) directly in ``path`` named
    ``run.json``, ``<name>.part.safetensors`` (parts), ``<name>.records.jsonl`` (:meth:`records`) and their
    temporaries ``.<file>.<random>.tmp``: ``fresh=True`` deletes only these, so final outputs and user files
    survive (final outputs are rewritten atomically anyway).

    Args:
        path: the folder (created if needed).
        key: this run's key (:func:`run_key`); stored normalised as ``.key``.
        fresh: delete the previous run's files and start over.

    Attributes:
        resumed: True when ``run.json`` already held this key.

    Raises:
        RunMismatchError: ``run.json`` holds another key, or run files lie there without a ``run.json``.
        CorruptFileError: ``run.json`` is unreadable.
    """

    def __init__(self, path: PathLike, key: Mapping, *, fresh: bool = False):
        self.path, self.resumed = Path(path), False
        self.key = json.loads(json.dumps(dict(key), default=jsonable))
        self.path.mkdir(parents=True, exist_ok=True)
        run_file = self.path / "run.json"
        if fresh:
            self.clear()
        elif run_file.exists():
            found = read_json(run_file)
            if not (isinstance(found, dict) and found.get("format") == "nha-run" and "key" in found):
                raise CorruptFileError(run_file, "no run key in it", "an nha_plugin run.json")
            check_key(found["key"], self.key, self.path)
            self.resumed = True
            return
        elif self._owned():
            raise RunMismatchError(f"{self.path} holds run files ({', '.join(self._owned()[:3])}, ...) but no "
                                   f"run.json, so their settings are unknown. {_FRESH}")
        write_json(run_file, {"format": "nha-run", "version": FORMAT_VERSION, "key": self.key})

    def _owned(self) -> List[str]:
        return sorted(p.name for p in self.path.iterdir() if _OWNED.fullmatch(p.name) and p.is_file())

    def clear(self) -> None:
        """Delete the run's files, ``run.json`` first (a half-cleared folder is then refused, never resumed)."""
        for name in sorted(self._owned(), key=lambda n: n != "run.json"):
            (self.path / name).unlink(missing_ok=True)

    def _file(self, name: str, suffix: str) -> Path:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise ValueError(f"part names must be non-empty, without '/', '\\' or a leading '.'; got {name!r}")
        return self.path / f"{name}{suffix}"

    def save_part(self, name: str, tree: Any) -> Path:
        """Save a state tree (:func:`save_state`) as ``<name>.part.safetensors`` atomically. Returns its path."""
        return save_state(self._file(name, _PART), tree)

    def load_part(self, name: str, *, device: Device = "cpu", on_corrupt: str = "raise") -> Any:
        """The tree of part ``name`` (torch tensors on ``device``), or None when it does not exist (yet).

        Args:
            on_corrupt: ``"raise"`` (default) a :class:`CorruptFileError` naming the file: parts are written
                atomically, so corruption means a disk fault or tampering, worth seeing; ``"recompute"``:
                warn, delete the part and return None.
        """
        path = self._file(name, _PART)
        try:
            return load_state(path, device)
        except FileNotFoundError:
            return None
        except CorruptFileError as e:
            if on_corrupt != "recompute":
                raise
            warnings.warn(f"{e}; deleted, it will be recomputed", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def part_path(self, name: str) -> Path:
        """The file a part is kept in (to name it in errors); it may not exist yet."""
        return self._file(name, _PART)

    def has_part(self, name: str) -> bool:
        """Whether part ``name`` exists (its content is checked by :meth:`load_part`)."""
        return self._file(name, _PART).is_file()

    def parts(self) -> List[str]:
        """Names of the saved parts, sorted."""
        return sorted(p.name[:-len(_PART)] for p in self.path.glob(f"*{_PART}") if not p.name.startswith("."))

    def records(self, name: str) -> Path:
        """Path of the run's record file ``<name>.records.jsonl`` (for :func:`append_records`)."""
        return self._file(name, _RECORDS)


# ---- append-only records -----------------------------------------------------------------------------------
def _row(line: bytes) -> Optional[dict]:
    with contextlib.suppress(ValueError):     # JSONDecodeError and UnicodeDecodeError
        row = json.loads(line)
        return row if isinstance(row, dict) else None
    return None


def _complete_end(fd: int, size: int) -> int:
    """``size``, or where the last line starts when :func:`read_records` would drop it."""
    chunk = 4096
    while True:                               # doubling reads: O(length of the last line)
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        nl = data.rfind(b"\n", 0, max(0, len(data) - 1))
        if nl >= 0 or start == 0:
            break
        chunk *= 2
    line = data[nl + 1:]
    return size if not line or (line.endswith(b"\n") and _row(line) is not None) else start + nl + 1


def append_records(path: PathLike, rows: Iterable[Mapping]) -> None:
    """Append JSON-able dicts to a JSONL file, each line in one ``write`` (O_APPEND: concurrent writers never
    interleave), then fsync. New files get mode 0o644 minus the umask.

    A last line :func:`read_records` would drop (torn by a kill) is cut off first, with a warning, so it cannot
    glue onto the next row: read the records first and recompute the missing ones."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        end = _complete_end(fd, size)
        if end < size:
            warnings.warn(f"{path}: cut a torn or unparseable last line ({size - end} bytes) before appending",
                          stacklevel=2)
            os.ftruncate(fd, end)
        for row in rows:
            if not isinstance(row, Mapping):
                raise TypeError(f"records must be dicts; got {type(row).__name__}")
            data = (json.dumps(dict(row), default=jsonable) + "\n").encode()
            while data:                       # one call for a regular file; the loop only guards short writes
                data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: PathLike) -> List[dict]:
    """The rows of a JSONL file of :func:`append_records` ([] when the file does not exist).

    A line counts when it ends with a newline and is a JSON object. A torn or unparseable last line (a
    killed writer, garbage after a crash) is dropped with a warning; the caller recomputes those rows, with
    per-item seeds (derived from the item, not a global RNG stream) so a resumed run reproduces the numbers
    of an uninterrupted one.

    Raises:
        CorruptFileError: a line other than the last is not a JSON object (names the file and the line).
    """
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    tail, rows = lines.pop(), []
    for i, line in enumerate(lines, 1):
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif i == len(lines) and not tail:
            warnings.warn(f"{path}: dropped an unparseable last line {i}; recompute its rows", stacklevel=2)
        else:
            raise CorruptFileError(path, f"line {i} is not a JSON object", "one JSON object per line")
    if tail:
        warnings.warn(f"{path}: dropped a torn last line {len(lines) + 1} ({len(tail)} bytes, no newline); "
                      "recompute its rows", stacklevel=2)
    return rows


# ---- processes of one run (torchrun) ---------------------------------------------------------------------------
def dist_info() -> tuple:
    """``(rank, world size)`` of this process under an initialised ``torch.distributed``, else ``(0, 1)``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): NCCL for CUDA, else
    gloo; each process then uses GPU ``LOCAL_RANK``. Returns whether this call created the group."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def barrier() -> None:
    """Wait for every process of the group (no-op in a single process)."""
    import torch.distributed as dist
    if dist_info()[1] > 1:
        dist.barrier()
