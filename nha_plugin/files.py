"""Safe outputs: atomic writes, JSON, and pickle-free tensor and state files.

Every write goes through :func:`atomic_path` (unique temporary file in the destination folder, fsync,
``os.replace``): readers see the old file or the new one, and any number of processes may write one path.
Run state goes through :func:`save_state` (safetensors + JSON metadata + a sha256 per tensor): nothing read
from an output folder is ever unpickled, and corrupted bytes are detected. Resumable runs built on these
files (run keys, run folders, per-item records) live in :mod:`nha_plugin.runs`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["FORMAT_VERSION", "CorruptFileError", "atomic_path", "write_bytes", "write_text", "write_json",
           "save_figure", "read_json", "save_tensors", "load_tensors", "save_state", "load_state", "jsonable",
           "tensor_bytes"]

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]


class CorruptFileError(ValueError):
    """A file is empty, truncated, corrupted or not in the expected format. ``.path`` is the file."""

    def __init__(self, path: PathLike, problem: str, expected: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}; expected {expected}. It was not written completely or has changed "
                         "since: delete it, or rerun with --fresh (fresh=True) to recompute it")


# ---- atomic writes -----------------------------------------------------------------------------------------
def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads: read /proc where it exists
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(re.search(r"^Umask:\s*(\d+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically, on any error it is removed.

    The temporary ``.<name>.<random>.tmp`` lies in the destination folder (created if needed), so concurrent
    writers never share one and ``os.replace`` stays on one file system. It is fsynced, given mode 0o644
    minus the umask (``mkstemp`` creates 0o600), then renamed. Use it with any writer taking a path
    (``pq.write_table(table, tmp)``); writers that add a suffix to the name (``np.save``) need an open file.

    Args:
        path: the final file.

    Yields:
        The temporary file (exists, empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)        # the writer may have reopened or replaced the file: sync that
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)                 # no fsync of the folder: a power cut may bring back the old file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`). Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`). Returns the path."""
    return write_bytes(path, text.encode(encoding))


def jsonable(obj: Any) -> Any:
    """``json.dumps`` default: paths as strings, numpy scalars as Python numbers."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-able: convert it (str(), .tolist(), float()) first")


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write ``json.dumps(obj, indent=indent)`` and a newline atomically. Returns the path.

    Paths and numpy scalars are converted, other non-JSON values raise TypeError. NaN and infinities are
    allowed: written as ``NaN`` / ``Infinity``, which Python reads back but strict JSON parsers reject."""
    return write_text(path, json.dumps(obj, indent=indent, default=jsonable) + "\n")


def save_figure(path: PathLike, fig, **savefig_kwargs) -> Path:
    """``fig.savefig`` atomically, in the format of the path's suffix (``.png``, ``.pdf``, ...); the figure is
    left open (closing it is the caller's). Returns the path."""
    fmt = savefig_kwargs.pop("format", None) or Path(path).suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"cannot tell the image format of {path}: give it a suffix such as .png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)
    return Path(path)


def read_json(path: PathLike) -> Any:
    """``json.loads`` of a file. Raises FileNotFoundError if missing, :class:`CorruptFileError` if not JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except ValueError as e:                   # JSONDecodeError and UnicodeDecodeError
        raise CorruptFileError(path, f"not valid JSON ({e})", "a complete JSON file") from e


# ---- tensor files and state trees --------------------------------------------------------------------------
_SUMS, _STATE = "nha_sha256", "nha_state"


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (any dtype, bf16 included) as a flat uint8 array, for checksums and hashes."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write name -> tensor to a safetensors file atomically, with the sha256 of each tensor's bytes.

    Tensors go to the CPU; non-contiguous ones and ones sharing storage with an earlier one are copied
    (safetensors refuses both). Any safetensors reader can read the file.

    Args:
        path: the file (``.safetensors`` by convention).
        tensors: tensors of any shape and of any dtype safetensors stores (all but complex128).
        metadata: str -> str header entries (``nha_sha256`` is reserved for the checksums).

    Returns:
        The path.
    """
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone(memory_format=torch.contiguous_format) if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr or None)                 # empty tensors share the null pointer harmlessly
    meta = dict(metadata or {})
    if _SUMS in meta:
        raise ValueError(f"metadata key {_SUMS!r} is reserved for the checksums")
    meta[_SUMS] = json.dumps({k: hashlib.sha256(tensor_bytes(t)).hexdigest() for k, t in out.items()})
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return Path(path)


def load_tensors(path: PathLike, device: Device = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a safetensors file and verify the checksums :func:`save_tensors` stored (files of other writers,
    e.g. bundled weights, have none and load unchecked; safetensors itself only checks the header).

    Returns:
        ``(tensors, metadata)``: name -> tensor on ``device``; the header's str -> str entries, checksums removed.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: empty, truncated, not safetensors (e.g. a pickle, never unpickled), or checksum mismatch.
    """
    expected = "a safetensors file written by nha_plugin"
    with open(path, "rb") as f:
        head, size = f.read(8), os.fstat(f.fileno()).st_size
    if size < 8 or int.from_bytes(head, "little") > size - 8:
        sniff = " (a torch.save/pickle file? it is never unpickled)" if head[:1] == b"\x80" or head[:2] == b"PK" else ""
        raise CorruptFileError(path, "the file is empty" if size == 0 else f"not safetensors or truncated{sniff}",
                               expected)
    try:
        with safe_open(str(path), framework="pt") as f:    # one handle: metadata and tensors of the same file
            meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
        sums = json.loads(meta.pop(_SUMS, "{}"))
        bad = [k for k, t in tensors.items() if k in sums and sums[k] != hashlib.sha256(tensor_bytes(t)).hexdigest()]
    except Exception as e:                    # SafetensorError, bad header JSON, ...: never surfaces raw
        raise CorruptFileError(path, f"unreadable safetensors data ({e})", expected) from e
    if bad:
        raise CorruptFileError(path, f"the bytes of tensor {bad[0]!r} do not match their checksum", expected)
    # fresh copies: safetensors hands out views at arbitrary byte offsets, and BLAS rounds unaligned inputs
    # differently, so a resumed run would drift from an uninterrupted one in the last bits
    return {k: t.to(device=device, copy=True) for k, t in tensors.items()}, meta


def _flatten(x: Any, where: str, flat: Dict[str, torch.Tensor]) -> Any:
    """JSON node for ``x``; tensors and arrays go to ``flat`` under their tree path and are referenced by it."""
    def ref(tag: str, t: torch.Tensor) -> dict:
        name = base = where.lstrip("/") or "root"
        i = 0
        while name in flat:                   # keys 0 and "0" in one dict have the same path
            i += 1
            name = f"{base}#{i}"
        flat[name] = t
        return {tag: name}

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        return ref("t", x)
    if isinstance(x, (np.ndarray, np.generic)):
        ok = isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable   # else from_numpy refuses
        try:
            return ref("a" if isinstance(x, np.ndarray) else "s", torch.from_numpy(x if ok else np.array(x)))
        except TypeError as e:
            raise TypeError(f"state tree value at {where or '/'}: {e}") from e
    if isinstance(x, (list, tuple)):
        items = [_flatten(v, f"{where}/{i}", flat) for i, v in enumerate(x)]
        return {"tuple": items} if isinstance(x, tuple) else items
    if isinstance(x, dict):
        for k in x:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"state tree dict at {where or '/'} has a key of type {type(k).__name__}; keys "
                                "must be str, int, float, bool or None")
        return {"dict": [[k, _flatten(v, f"{where}/{k}", flat)] for k, v in x.items()]}
    raise TypeError(f"state tree value at {where or '/'} has type {type(x).__name__}; supported: dict, list, tuple, "
                    "torch.Tensor, numpy array/scalar, str, int, float, bool, None (convert it first)")


def _unflatten(node: Any, tensors: Dict[str, torch.Tensor], device: Device) -> Any:
    if isinstance(node, list):
        return [_unflatten(v, tensors, device) for v in node]
    if not isinstance(node, dict):
        return node
    (tag, value), = node.items()
    if tag in ("t", "a", "s"):
        t = tensors[value]
        return t.to(device) if tag == "t" else t.numpy() if tag == "a" else t.numpy()[()]
    if tag == "tuple":
        return tuple(_unflatten(v, tensors, device) for v in value)
    if tag == "dict":
        return {k: _unflatten(v, tensors, device) for k, v in value}
    raise KeyError(tag)


def save_state(path: PathLike, tree: Any) -> Path:
    """Write a state tree atomically: tensors and arrays in one safetensors file, the rest in its JSON metadata.

    A tree nests dicts (keys str/int/float/bool/None, order kept), lists and tuples of torch tensors (any
    shape, device, dtype but complex128), numpy arrays and scalars, str, int, float (NaN/inf too), bool and
    None. :func:`load_state` returns it exactly: types (tuples stay tuples, int keys ints, numpy numpy),
    dtypes, shapes and bits, so optimizer state dicts and the states of ``torch.get_rng_state()``,
    ``np.random.get_state()``, ``random.getstate()`` and numpy Generators round-trip. Subclasses come back as
    their base (OrderedDict -> dict, namedtuple -> tuple, Parameter -> Tensor). Tensor names in the file are
    tree paths (``optimizer/state/0/exp_avg``).

    Args:
        path: the file (``.safetensors`` by convention).
        tree: the state.

    Returns:
        The path.
    """
    flat: Dict[str, torch.Tensor] = {}
    spec = {"format": "nha-state", "version": FORMAT_VERSION, "tree": _flatten(tree, "", flat)}
    return save_tensors(path, flat, {_STATE: json.dumps(spec)})


def load_state(path: PathLike, device: Device = "cpu") -> Any:
    """The tree :func:`save_state` wrote, torch tensors on ``device`` (checksums verified, nothing unpickled).

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: as :func:`load_tensors`, or not a state file, or another format version.
    """
    tensors, meta = load_tensors(path)
    expected = f"an nha_plugin state file of format version {FORMAT_VERSION}"
    try:
        spec = json.loads(meta[_STATE])
        version = spec["version"] if spec["format"] == "nha-state" else None
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(path, "no state tree in its metadata", expected) from e
    if version != FORMAT_VERSION:
        raise CorruptFileError(path, f"state format version {version!r}", expected)
    try:
        return _unflatten(spec.get("tree"), tensors, device)
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(path, f"a malformed state tree ({e!r})", expected) from e
