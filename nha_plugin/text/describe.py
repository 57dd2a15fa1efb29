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

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pool import neuron_blocks, pair_directions, pc_sign
from ..spec import AttentionPoolSpec
from .cache import embed_texts
from .omp import SparseCodes, prepare_dictionary, sparse_decompose
from .pools import get_pool, get_templates

__all__ = ["TextDictionary", "build_dictionary", "parse_unit", "unit_direction", "neuron_directions", "describe",
           "describe_units", "subconcepts", "collect_coefficients", "pair_label", "head_text_span"]

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
        """[(text, coefficient), ...] of row ``row`` of OMP codes over this dictionary."""
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
    """The label of pair (head ``h``, neuron ``n``): ``"H3N17"``."""
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


def check_index(kind: str, index: tuple[int, ...], spec: AttentionPoolSpec) -> None:
    """Refuse a head or neuron index the model does not have (ValueError naming the valid range)."""
    H, C = spec.num_heads, spec.num_neurons
    h = index[0] if kind in ("pair", "head") else None
    n = index[-1] if kind in ("pair", "neuron") else None
    if h is not None and not 0 <= h < H:
        raise ValueError(f"head {h} out of range: this model has H={H} heads (0..{H - 1})")
    if n is not None and not 0 <= n < C:
        raise ValueError(f"neuron {n} out of range: this model has C={C} neurons (0..{C - 1})")


def _neuron_pairs(spec: AttentionPoolSpec, n: int, dtype: torch.dtype) -> Tensor:
    """U_n = [u[0,n] ... u[H-1,n]], (H, D) in ``dtype``."""
    return neuron_blocks(spec, slice(n, n + 1), dtype)[0].T


def _pc0(x: Tensor, reference: Optional[Tensor] = None) -> Tensor:
    """First principal direction (..., D) of rows x (..., K, D), batched over leading axes; centred first when
    ``reference`` is None.

    Sign: with data (reference None), the paper's rule on the 50 largest centred rows
    (:func:`nha_plugin.pool.pc_sign`); otherwise ``reference`` (D,) projects positively (2-D ``x`` only)."""
    if reference is None:
        xc = x - x.mean(dim=-2, keepdim=True)
        v = torch.linalg.svd(xc, full_matrices=False).Vh[..., 0, :]                  # (..., D)
        top = xc.norm(dim=-1).argsort(dim=-1, descending=True)[..., :50]              # (..., <=50)
        rows = torch.gather(xc, -2, top[..., None].expand(*top.shape, xc.shape[-1]))
        return v * pc_sign((rows * v[..., None, :]).sum(-1))[..., None].to(v)
    v = torch.linalg.svd(x, full_matrices=False).Vh[0]
    return -v if float(reference @ v) < 0 else v


@torch.no_grad()
def neuron_directions(spec: AttentionPoolSpec, coefficients: Tensor, *, dtype: torch.dtype = torch.float32,
                      chunk: int = 256) -> Tensor:
    """Every neuron's PC0 over a dataset, as :func:`unit_direction` gives it one neuron at a time, batched.

    Args:
        spec: the attention-pool spec.
        coefficients: pair coefficients s (B, H, C) over the dataset.
        dtype: the arithmetic's dtype.
        chunk: neurons per batched SVD (memory: chunk * B * D values).

    Returns:
        (C, D) unit directions in ``dtype``.
    """
    s = coefficients.to(dtype)
    out = []
    for start in range(0, s.shape[2], chunk):
        sl = slice(start, min(s.shape[2], start + chunk))
        contributions = torch.einsum("bhc,cDh->cbD", s[:, :, sl], neuron_blocks(spec, sl, dtype))   # (c, B, D)
        out.append(_pc0(contributions))
    return torch.cat(out)


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
    check_index(kind, index, spec)
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
        U = _neuron_pairs(spec, index[0], dt)                                    # (H, D)
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
    check_index("neuron", (neuron,), spec)
    norms = _neuron_pairs(spec, neuron, torch.float32).norm(dim=1)              # (H,)
    importance = norms if coefficients is None else norms * coefficients[:, :, neuron].float().std(dim=0)
    order = importance.argsort(descending=True)[:top].tolist()
    units = [f"neuron:{neuron}"] + [f"pair:H{h}N{neuron}" for h in order]
    desc = describe_units(spec, units, dictionary, k, coefficients=coefficients)
    for d, h in zip(desc[1:], order):
        d["importance"] = float(importance[h])
    return {"neuron": desc[0], "pairs": desc[1:]}


def head_text_span(spec: AttentionPoolSpec, head: int, coefficients: Tensor, dictionary: TextDictionary,
                   m: int = 20, rank: int = 80) -> dict:
    """TextSpan (docs/methods.md §2) of one attention-pool head over a dataset: the head's contributions
    ``W_o^h W_v^h s_h`` (B, D) for pair coefficients (B, H, C), against the pool's text embeddings.

    Returns ``{"unit": "head:h", "kind": "head", "source": "data", "texts": [...], "variances": [...]}``."""
    from .textspan import text_span
    check_index("head", (head,), spec)
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
