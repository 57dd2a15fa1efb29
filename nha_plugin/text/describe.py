"""Sparse text descriptions of pairs, heads and neurons of a CLIP-ResNet attention pool.

A pair's contribution is ``s[h,n] * u[h,n]`` with a fixed direction, so pair descriptions need no data: OMP
writes ``u[h,n] / ||u[h,n]||`` as ``k`` words. Neurons (``sum_h s[h,n] u[h,n]``) and heads are not rank-1;
their direction is the first principal component of their contributions over a dataset when pair
coefficients ``s`` (B, H, C) are given (sign: the majority of the 50 largest centred contributions project
positively, as in the paper), and the top singular vector of their pair directions otherwise (the PC0
under isotropic, uncorrelated coefficients; sign: the pair directions' sum projects positively).

Unit names follow TransformerLens-style labels: ``pair:H3N17`` (head 3, neuron 17), ``head:3``, ``neuron:17``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..pool import pair_directions, pc_sign
from ..spec import AttentionPoolSpec
from .cache import embed_texts
from .omp import SparseCodes, prepare_dictionary, sparse_decompose
from .pools import get_pool, get_templates

__all__ = ["TextDictionary", "build_dictionary", "parse_unit", "unit_direction", "describe", "describe_units",
           "subconcepts", "describe_all_pairs", "collect_coefficients", "pair_label", "head_text_span"]

_UNIT_RE = re.compile(r"^(?:pair:)?H(\d+)N(\d+)$|^head:(\d+)$|^H(\d+)$|^neuron:(\d+)$|^N(\d+)$")


@dataclass
class TextDictionary:
    """A word pool embedded by a model and prepared for OMP.

    Attributes:
        texts: the N words/phrases.
        embeddings: (N, D) unit text embeddings (templates averaged when given).
        atoms: (N, D) the OMP dictionary (:func:`~nha_plugin.text.omp.prepare_dictionary` of the embeddings).
        templates: the templates used (None: bare texts).
        normalization: ``"text"`` or ``"legacy_axis0"``.
    """

    texts: list[str]
    embeddings: Tensor
    atoms: Tensor
    templates: Optional[list[str]] = None
    normalization: str = "text"
    pool: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def words(self, codes: SparseCodes, row: int) -> list[tuple[str, float]]:
        return codes.words(self.texts, row)


def build_dictionary(model: nn.Module, tokenizer: Callable, pool: Union[str, Sequence[str]] = "words",
                     templates: Union[None, str, Sequence[str]] = "photo", normalization: str = "text", *,
                     cache_dir=None, progress: bool = True, batch_size: int = 256) -> TextDictionary:
    """Embed a pool (see :func:`~nha_plugin.text.pools.get_pool`) with ``templates`` (cached on disk) and prepare
    it as an OMP dictionary (centred over texts, then normalised per ``normalization``)."""
    texts = get_pool(pool)
    tpl = get_templates(templates)
    emb = embed_texts(model, tokenizer, texts, tpl, cache_dir=cache_dir, progress=progress, batch_size=batch_size)
    return TextDictionary(texts=texts, embeddings=emb, atoms=prepare_dictionary(emb, normalization),
                          templates=tpl, normalization=normalization,
                          pool=pool if isinstance(pool, str) else f"{len(texts)} custom texts")


def pair_label(h: int, n: int) -> str:
    return f"H{h}N{n}"


def parse_unit(unit: str) -> tuple[str, tuple[int, ...]]:
    """``"pair:H3N17"`` -> ("pair", (3, 17)); ``"head:3"`` -> ("head", (3,)); ``"neuron:17"`` -> ("neuron", (17,))."""
    m = _UNIT_RE.match(unit.strip())
    if not m:
        raise ValueError(f"cannot read unit {unit!r}: use pair:H3N17, head:3 or neuron:17")
    g = m.groups()
    if g[0] is not None:
        return "pair", (int(g[0]), int(g[1]))
    if g[2] is not None or g[3] is not None:
        return "head", (int(g[2] if g[2] is not None else g[3]),)
    return "neuron", (int(g[4] if g[4] is not None else g[5]),)


def _check_index(kind: str, index: tuple[int, ...], spec: AttentionPoolSpec) -> None:
    H, C = spec.num_heads, spec.num_neurons
    h = index[0] if kind in ("pair", "head") else None
    n = index[-1] if kind in ("pair", "neuron") else None
    if h is not None and not 0 <= h < H:
        raise ValueError(f"head {h} out of range: this model has H={H} heads (0..{H - 1})")
    if n is not None and not 0 <= n < C:
        raise ValueError(f"neuron {n} out of range: this model has C={C} neurons (0..{C - 1})")


def _neuron_pairs(spec: AttentionPoolSpec, n: int) -> Tensor:
    """U_n = [u[0,n] ... u[H-1,n]], (H, D)."""
    H, d = spec.num_heads, spec.head_dim
    wo = rearrange(spec.c_weight, "D (h j) -> D h j", h=H, j=d)
    wv = rearrange(spec.v_weight[:, n], "(h j) -> h j", h=H, j=d)
    return torch.einsum("Dhj,hj->hD", wo, wv)


def _pc0(x: Tensor, reference: Optional[Tensor] = None) -> Tensor:
    """First principal direction (D,) of rows x (K, D); centred first when ``reference`` is None.

    Sign: with data (reference None), the paper's rule on the 50 largest centred rows
    (:func:`nha_plugin.pool.pc_sign`); otherwise ``reference`` (D,) projects positively."""
    if reference is None:
        xc = x - x.mean(dim=0)
        v = torch.linalg.svd(xc, full_matrices=False).Vh[0]
        top = xc[xc.norm(dim=1).argsort(descending=True)[:50]]
        return v * pc_sign(top @ v).to(v)
    v = torch.linalg.svd(x, full_matrices=False).Vh[0]
    return -v if float(reference @ v) < 0 else v


def unit_direction(spec: AttentionPoolSpec, unit: Union[str, tuple[str, tuple[int, ...]]],
                   coefficients: Optional[Tensor] = None) -> Tensor:
    """The unit-norm direction (D,) a unit writes along.

    Args:
        spec: the model's attention-pool spec (``nha_plugin.adapters.get_spec(model)``).
        unit: ``"pair:H3N17"`` | ``"head:3"`` | ``"neuron:17"`` or a parsed ``(kind, index)``.
        coefficients: optional pair coefficients s (B, H, C) over a dataset (``decompose(...).pair_coefficients``);
            used by heads and neurons (PC0 of their contributions). Pairs never need them.
    """
    kind, index = parse_unit(unit) if isinstance(unit, str) else unit
    _check_index(kind, index, spec)
    spec = spec.detached()
    if coefficients is not None and (coefficients.dim() != 3 or
                                     coefficients.shape[1:] != (spec.num_heads, spec.num_neurons)):
        raise ValueError(f"coefficients must be pair coefficients (B, {spec.num_heads}, {spec.num_neurons}); "
                         f"got {tuple(coefficients.shape)}")
    dt = torch.float64 if spec.c_weight.dtype == torch.float64 else torch.float32
    if kind == "pair":
        h, n = index
        u = pair_directions(spec, heads=slice(h, h + 1))[0, n]
        return F.normalize(u.to(dt), dim=0)
    if kind == "neuron":
        U = _neuron_pairs(spec, index[0]).to(dt)                                 # (H, D)
        if coefficients is None:
            return _pc0(U, reference=U.sum(dim=0))
        return _pc0(coefficients[:, :, index[0]].to(U) @ U)
    h = index[0]
    U = pair_directions(spec, heads=slice(h, h + 1))[0].to(dt)                  # (C, D)
    if coefficients is None:
        return _pc0(U, reference=U.sum(dim=0))
    return _pc0(coefficients[:, h].to(U) @ U)


def describe_units(spec: AttentionPoolSpec, units: Sequence[str], dictionary: TextDictionary, k: int = 10, *,
                   coefficients: Optional[Tensor] = None, device=None) -> list[dict]:
    """Describe several units with ``k`` words each.

    Returns one dict per unit: ``unit`` (label), ``kind``, ``source`` ("weights" | "data"), ``words``
    [(word, coefficient), ...] sorted by |coefficient|, ``relative_residual`` ||u - recon|| / ||u||.
    """
    parsed = [parse_unit(u) for u in units]
    dirs = torch.stack([unit_direction(spec, p, coefficients) for p in parsed])
    codes = sparse_decompose(dirs, dictionary.atoms, k=k, device=device)
    out = []
    for i, (kind, index) in enumerate(parsed):
        label = pair_label(*index) if kind == "pair" else f"{kind}:{index[0]}"
        out.append({"unit": label, "kind": kind,
                    "source": "data" if coefficients is not None and kind != "pair" else "weights",
                    "words": dictionary.words(codes, i),
                    "relative_residual": float(codes.residual_norms[i] / codes.target_norms[i])})
    return out


def describe(model_or_spec, unit: str, dictionary: TextDictionary, k: int = 10, *,
             coefficients: Optional[Tensor] = None) -> dict:
    """Describe one unit (see :func:`describe_units`) of a model or spec."""
    return describe_units(_spec(model_or_spec), [unit], dictionary, k, coefficients=coefficients)[0]


def _spec(model_or_spec) -> AttentionPoolSpec:
    if isinstance(model_or_spec, AttentionPoolSpec):
        return model_or_spec
    from ..adapters import get_spec
    return get_spec(model_or_spec)


def subconcepts(spec: AttentionPoolSpec, neuron: int, dictionary: TextDictionary, k: int = 5, *,
                coefficients: Optional[Tensor] = None, top: Optional[int] = None) -> dict:
    """A neuron's words beside each of its pairs' words.

    Pairs are ordered by importance: ``||u[h,n]||`` times the standard deviation of ``s[:, h, n]`` when
    coefficients are given, ``||u[h,n]||`` alone otherwise. ``top`` keeps the most important pairs.

    Returns ``{"neuron": description, "pairs": [description + "importance", ...]}``.
    """
    _check_index("neuron", (neuron,), spec)
    norms = _neuron_pairs(spec.detached(), neuron).float().norm(dim=1)          # (H,)
    importance = norms if coefficients is None else norms * coefficients[:, :, neuron].float().std(dim=0)
    order = importance.argsort(descending=True)[:top].tolist()
    units = [f"neuron:{neuron}"] + [f"pair:H{h}N{neuron}" for h in order]
    desc = describe_units(spec, units, dictionary, k, coefficients=coefficients)
    for d, h in zip(desc[1:], order):
        d["importance"] = float(importance[h])
    return {"neuron": desc[0], "pairs": desc[1:]}


def head_text_span(spec: AttentionPoolSpec, head: int, coefficients: Tensor, dictionary: TextDictionary,
                   m: int = 20, rank: int = 80) -> dict:
    """TextSpan (METHODS.md §B) of one attention-pool head over a dataset: the head's contributions
    ``W_o^h W_v^h s_h`` (B, D) for pair coefficients (B, H, C), against the pool's text embeddings.

    Returns ``{"unit": "head:h", "kind": "head", "source": "data", "texts": [...], "variances": [...]}``."""
    from .textspan import text_span
    _check_index("head", (head,), spec)
    spec = spec.detached()
    U = pair_directions(spec, heads=slice(head, head + 1))[0].float()            # (C, D)
    res = text_span(coefficients[:, head].float() @ U, dictionary.embeddings, dictionary.texts, m=m, rank=rank)
    return {"unit": f"head:{head}", "kind": "head", "source": "data", "method": "textspan",
            "texts": res.texts, "variances": res.variances.tolist()}


@torch.no_grad()
def collect_coefficients(model: nn.Module, images: Iterable[Tensor]) -> Tensor:
    """Pair coefficients s (B, H, C) over batches of preprocessed images (each (b, 3, S, S)), on the CPU."""
    from ..models import decompose
    out = [decompose(model, x).pair_coefficients.float().cpu() for x in images]
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


# ---- all pairs -------------------------------------------------------------------------------------------
def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def describe_all_pairs(spec: AttentionPoolSpec, dictionary: TextDictionary, outputs: Sequence[Union[str, Path]],
                       k: int = 64, *, heads_per_chunk: int = 1, device=None, chunk_size: Optional[int] = None,
                       progress: bool = True, meta: Optional[dict] = None, screen: Optional[int] = None) -> dict:
    """OMP descriptions of every pair (H * C of them) written to JSON and/or Parquet files.

    Work proceeds in chunks of ``heads_per_chunk`` heads; each finished chunk is saved atomically under
    ``<first output>.parts/``, so an interrupted run resumes where it stopped (parts from a run with other
    settings, weights or dictionary are discarded and recomputed). Outputs are written atomically once all
    chunks exist; the parts stay for re-export and can be deleted afterwards.

    Args:
        outputs: paths ending in ``.json`` or ``.parquet``.
        meta: extra fields for the output header (e.g. the model name).

    Returns the header dict (model sizes, pool, k, normalization, number of pairs).
    """
    outputs = [Path(p) for p in outputs]
    if not outputs:
        raise ValueError("give at least one output path (.json or .parquet)")
    for p in outputs:
        if p.suffix not in (".json", ".parquet"):
            raise ValueError(f"output {p} must end in .json or .parquet")
    spec = spec.detached()
    H, C = spec.num_heads, spec.num_neurons
    header = {"num_heads": H, "num_neurons": C, "output_dim": spec.output_dim, "num_pairs": H * C, "k": k,
              "pool": dictionary.pool, "num_texts": len(dictionary), "normalization": dictionary.normalization,
              "templates": len(dictionary.templates or []), "screen": screen, **(meta or {})}
    parts_dir = outputs[0].with_name(outputs[0].name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps({**header, "texts_hash": hash_texts(dictionary.texts),
                              "weights_hash": _tensor_hash(spec.v_weight, spec.c_weight, dictionary.atoms),
                              "heads_per_chunk": heads_per_chunk}, sort_keys=True)
    stamp = parts_dir / "settings.json"
    if not stamp.is_file() or stamp.read_text() != fingerprint:
        for old in parts_dir.glob("heads_*.pt"):
            old.unlink()
        _atomic_bytes(stamp, fingerprint.encode())
    from tqdm.auto import tqdm
    chunks = list(range(0, H, heads_per_chunk))
    for h0 in tqdm(chunks, desc=f"describing {H * C} pairs", unit="chunk", disable=not progress):
        part = parts_dir / f"heads_{h0:05d}.pt"
        if part.is_file():
            continue
        h1 = min(H, h0 + heads_per_chunk)
        u = pair_directions(spec, heads=slice(h0, h1)).float().reshape(-1, spec.output_dim)
        norms = u.norm(dim=1)
        codes = sparse_decompose(F.normalize(u, dim=1), dictionary.atoms, k=k, device=device,
                                 chunk_size=chunk_size, screen=screen)
        blob = {"indices": codes.indices.cpu().int(), "coefficients": codes.coefficients.cpu().float(),
                "relative_residual": (codes.residual_norms / codes.target_norms).cpu().float(),
                "direction_norm": norms.cpu()}
        tmp = part.with_name(f"{part.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, part)
    blobs = [torch.load(parts_dir / f"heads_{h0:05d}.pt", weights_only=True) for h0 in chunks]
    cat = {key: torch.cat([b[key] for b in blobs]) for key in blobs[0]}
    heads = torch.arange(H).repeat_interleave(C)
    neurons = torch.arange(C).repeat(H)
    for path in outputs:
        if path.suffix == ".json":
            _write_json(path, header, dictionary.texts, cat, heads, neurons)
        else:
            _write_parquet(path, header, dictionary.texts, cat, heads, neurons)
    return header


def hash_texts(texts: Sequence[str]) -> str:
    import hashlib
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _tensor_hash(*tensors: Tensor) -> str:
    import hashlib
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _write_json(path: Path, header: dict, texts, cat: dict, heads: Tensor, neurons: Tensor) -> None:
    idx, coef = cat["indices"].tolist(), cat["coefficients"].tolist()
    res, nrm = cat["relative_residual"].tolist(), cat["direction_norm"].tolist()
    pairs = [{"pair": pair_label(h, n), "head": h, "neuron": n, "words": [texts[i] for i in idx[r]],
              "coefficients": [round(c, 6) for c in coef[r]], "relative_residual": round(res[r], 6),
              "direction_norm": nrm[r]}
             for r, (h, n) in enumerate(zip(heads.tolist(), neurons.tolist()))]
    _atomic_bytes(path, json.dumps({**header, "pairs": pairs}).encode())


def _write_parquet(path: Path, header: dict, texts, cat: dict, heads: Tensor, neurons: Tensor) -> None:
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
