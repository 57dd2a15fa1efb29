"""Every pair of a CLIP-ResNet attention pool described by OMP, written to JSON and/or Parquet (``nha describe --all``).

The work is split into chunks of heads. Each finished chunk is a part of a :class:`nha_plugin.runs.RunDir` in
``<first output>.parts/`` (checksummed safetensors, nothing unpickled), so a killed run resumes where it stopped.
The folder's ``run.json`` keys the run by the settings (``k``, chunking, screening), the dictionary (texts,
templates, normalisation and the exact atoms), the pool weights and :data:`PARTS_VERSION`: a folder holding
another run is refused (:class:`~nha_plugin.runs.RunMismatchError`, naming each difference) unless ``fresh``
(``--fresh``) discards it. A part that is unreadable or not a part of this run raises
:class:`~nha_plugin.files.CorruptFileError` naming the file. The outputs are written atomically once every chunk
exists; the parts stay for re-export and can be deleted afterwards.

Under ``torchrun`` (an initialised ``torch.distributed`` group) the chunks are dealt round-robin over the ranks:
rank r computes chunks r, r + W, r + 2W, ... into the shared parts folder, and after a barrier rank 0 merges every
part into the outputs, the same files a single process writes. A killed rank's chunks are picked up by whichever
rank owns them on the next launch, at any world size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..files import CorruptFileError, atomic_path, write_json
from ..pool import pair_directions
from ..runs import RunDir, barrier, dist_info, run_key, tensor_fingerprint, texts_fingerprint
from ..spec import AttentionPoolSpec
from .describe import TextDictionary, pair_label
from .omp import sparse_decompose

__all__ = ["describe_all_pairs", "all_pairs_key", "PARTS_VERSION"]

PARTS_VERSION = 2            # 1: torch.save'd heads_*.pt parts keyed by settings.json (no longer read)
_FIELDS = {"indices": torch.int32, "coefficients": torch.float32, "relative_residual": torch.float32,
           "direction_norm": torch.float32}


def all_pairs_key(spec: AttentionPoolSpec, dictionary: TextDictionary, k: int, *, heads_per_chunk: int = 1,
                  screen: Optional[int] = None, meta: Optional[dict] = None) -> dict:
    """The run key (:func:`nha_plugin.runs.run_key`) of :func:`describe_all_pairs`: what its parts depend on.

    Returns:
        ``{"version", "config": {k, heads_per_chunk, screen}, "data": the dictionary's identity, "weights":
        fingerprint of the pool's W_v and W_o, "meta": meta}``.
    """
    data = {"pool": dictionary.pool, "num_texts": len(dictionary), "texts": texts_fingerprint(dictionary.texts),
            "templates": texts_fingerprint(dictionary.templates or []), "normalization": dictionary.normalization,
            "atoms": tensor_fingerprint(dictionary.atoms)}
    return run_key({"k": k, "heads_per_chunk": heads_per_chunk, "screen": screen}, data=data,
                   weights=tensor_fingerprint(spec.v_weight, spec.c_weight), version=PARTS_VERSION, meta=meta or {})


def _check_part(part: dict, path: Path, rows: int, k: int) -> dict:
    """``part`` when it holds the four tensors of ``rows`` pairs with ``k`` words; else CorruptFileError."""
    shapes = {"indices": (rows, k), "coefficients": (rows, k), "relative_residual": (rows,),
              "direction_norm": (rows,)}
    ok = isinstance(part, dict) and set(part) == set(shapes) and all(
        isinstance(part[n], Tensor) and part[n].dtype == _FIELDS[n] and tuple(part[n].shape) == shapes[n]
        for n in shapes)
    if not ok:
        found = {n: (str(t.dtype), tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
                 for n, t in part.items()} if isinstance(part, dict) else type(part).__name__
        raise CorruptFileError(path, f"it holds {found}",
                               f"a part of this run: {', '.join(f'{n} {s}' for n, s in shapes.items())}")
    return part


def describe_all_pairs(spec: AttentionPoolSpec, dictionary: TextDictionary, outputs: Sequence[Union[str, Path]],
                       k: int = 64, *, heads_per_chunk: int = 1, device=None, chunk_size: Optional[int] = None,
                       progress: bool = True, meta: Optional[dict] = None, screen: Optional[int] = None,
                       fresh: bool = False) -> dict:
    """OMP descriptions of every pair (H * C of them) written to JSON and/or Parquet files, resumably.

    Args:
        spec: the model's attention-pool spec.
        dictionary: the words (:func:`~nha_plugin.text.describe.build_dictionary`).
        outputs: paths ending in ``.json`` or ``.parquet``; the parts go to ``<outputs[0]>.parts/``.
        k: words per pair.
        heads_per_chunk: heads per resumable part.
        device, chunk_size, screen: passed to :func:`~nha_plugin.text.omp.sparse_decompose`.
        progress: tqdm bar over the chunks (rank 0's).
        meta: extra JSON-able fields for the output header (e.g. the model name); part of the run key.
        fresh: discard the parts of an earlier run in the parts folder and start over.

    Returns:
        The header dict (model sizes, pool, k, normalization, number of pairs, meta). Under torchrun only rank 0
        writes the outputs; every rank returns the header.

    Raises:
        RunMismatchError: the parts folder holds a run with another key (and ``fresh`` is False).
        CorruptFileError: a part or ``run.json`` is unreadable, or a part is not one of this run.
    """
    outputs = [Path(p) for p in outputs]
    if not outputs:
        raise ValueError("give at least one output path (.json or .parquet)")
    for p in outputs:
        if p.suffix not in (".json", ".parquet"):
            raise ValueError(f"output {p} must end in .json or .parquet; got suffix {p.suffix!r}")
    spec = spec.detached()
    H, C = spec.num_heads, spec.num_neurons
    header = {"num_heads": H, "num_neurons": C, "output_dim": spec.output_dim, "num_pairs": H * C, "k": k,
              "pool": dictionary.pool, "num_texts": len(dictionary), "normalization": dictionary.normalization,
              "templates": len(dictionary.templates or []), "screen": screen, **(meta or {})}
    key = all_pairs_key(spec, dictionary, k, heads_per_chunk=heads_per_chunk, screen=screen, meta=meta)
    parts_dir = outputs[0].with_name(outputs[0].name + ".parts")
    rank, world = dist_info()
    # rank 0 alone creates (or, with fresh, wipes) the folder; the others open it once it is keyed
    run = RunDir(parts_dir, key, fresh=fresh) if rank == 0 else None
    barrier()
    run = run or RunDir(parts_dir, key)
    from tqdm.auto import tqdm
    chunks = [(f"heads_{h0:05d}", h0, min(H, h0 + heads_per_chunk)) for h0 in range(0, H, heads_per_chunk)]
    mine = chunks[rank::world]
    for name, h0, h1 in tqdm(mine, desc=f"describing {H * C} pairs", unit="chunk",
                             disable=not progress or rank != 0):
        if run.has_part(name):
            continue
        u = pair_directions(spec, heads=slice(h0, h1)).float().reshape(-1, spec.output_dim)
        codes = sparse_decompose(F.normalize(u, dim=1), dictionary.atoms, k=k, device=device,
                                 chunk_size=chunk_size, screen=screen)
        run.save_part(name, {"indices": codes.indices.cpu().int(), "coefficients": codes.coefficients.cpu().float(),
                             "relative_residual": (codes.residual_norms / codes.target_norms).cpu().float(),
                             "direction_norm": u.norm(dim=1).cpu()})
    barrier()
    if rank != 0:
        return header
    parts = [_check_part(run.load_part(name), run.path / f"{name}.part.safetensors", (h1 - h0) * C, k)
             for name, h0, h1 in chunks]
    cat = {field: torch.cat([p[field] for p in parts]) for field in _FIELDS}
    heads, neurons = torch.arange(H).repeat_interleave(C), torch.arange(C).repeat(H)
    for path in outputs:
        writer = _write_json if path.suffix == ".json" else _write_parquet
        writer(path, header, dictionary.texts, cat, heads, neurons)
    return header


def _write_json(path: Path, header: dict, texts: Sequence[str], cat: dict, heads: Tensor, neurons: Tensor) -> None:
    """One JSON object: the header and ``pairs``, a list of H*C rows (pair, head, neuron, words, ...)."""
    idx, coef = cat["indices"].tolist(), cat["coefficients"].tolist()
    res, nrm = cat["relative_residual"].tolist(), cat["direction_norm"].tolist()
    pairs = [{"pair": pair_label(h, n), "head": h, "neuron": n, "words": [texts[i] for i in idx[r]],
              "coefficients": [round(c, 6) for c in coef[r]], "relative_residual": round(res[r], 6),
              "direction_norm": nrm[r]}
             for r, (h, n) in enumerate(zip(heads.tolist(), neurons.tolist()))]
    write_json(path, {**header, "pairs": pairs}, indent=None)


def _write_parquet(path: Path, header: dict, texts: Sequence[str], cat: dict, heads: Tensor,
                   neurons: Tensor) -> None:
    """A table of H*C rows (words dictionary-encoded, fixed-size lists of k); the header in the schema metadata
    under ``nha_describe``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Parquet output needs pyarrow: pip install 'nha-plugin[text]' (or write .json)") from e
    vocab = pa.array(texts, pa.string())
    idx = cat["indices"].numpy()
    k = idx.shape[1]
    words = pa.FixedSizeListArray.from_arrays(
        pa.DictionaryArray.from_arrays(pa.array(idx.reshape(-1)), vocab), k)
    coefs = pa.FixedSizeListArray.from_arrays(pa.array(cat["coefficients"].numpy().reshape(-1)), k)
    table = pa.table({
        "pair": pa.array([pair_label(h, n) for h, n in zip(heads.tolist(), neurons.tolist())]),
        "head": pa.array(heads.numpy().astype("int32")), "neuron": pa.array(neurons.numpy().astype("int32")),
        "words": words, "coefficients": coefs,
        "relative_residual": pa.array(cat["relative_residual"].numpy()),
        "direction_norm": pa.array(cat["direction_norm"].numpy()),
    }).replace_schema_metadata({"nha_describe": json.dumps(header)})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
