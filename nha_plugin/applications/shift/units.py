"""The units a concept is read from, and its per-image scores (docs/methods.md §1).

    PC0[h,n]   = sign[h,n] * u[h,n] / ||u[h,n]||                   (H, C, D)   u = pair_directions(spec)
    TopK(t)    = the k pairs with the largest <PC0[h,n], t>         t = the concept's text embedding
    score(y)   = || sum_{(h,n) in TopK(t)} s[h,n] u[h,n] || / ||y||  per image (y = its embedding)

:func:`pc0_signs` gives the paper's PC0 sign of every pair, :func:`unit_directions` those signs and the PC0
directions of neurons and heads (the baselines), :func:`select_units` a concept's top pairs, neurons and heads,
:func:`concept_scores` each image's score by every method in :data:`METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from ...decomposition import Contributions
from ...pool import check_pair_signs, pair_directions, pair_norms, pc_sign, target_weights
from ...spec import AttentionPoolSpec

__all__ = ["METHODS", "UnitDirections", "ConceptUnits", "pc0_signs", "pair_alignment", "unit_directions",
           "select_units", "concept_scores"]

METHODS = ("nad_pairs", "cosine", "neurons", "heads")


def pc0_signs(coefficients: Tensor, top: int = 50) -> Tensor:
    """The paper's PC0 sign of every pair from coefficients over a dataset.

    A pair's contribution is ``s[h,n] u[h,n]``, so the PC0 of its centred contributions is ``+-u/||u||`` and
    the paper's rule (flip unless more than half of the ``top`` largest centred contributions project
    positively) is :func:`nha_plugin.pool.pc_sign` on the ``top`` largest ``|s - mean s|``.

    Args:
        coefficients: pair coefficients s over a dataset, (B, H, C).
        top: images taken per pair (capped at B).

    Returns:
        (H, C) tensor of +1.0 / -1.0 in the coefficients' dtype.
    """
    if coefficients.dim() != 3 or coefficients.shape[0] < 1:
        raise ValueError(f"expected pair coefficients (B, H, C) with B >= 1; got {tuple(coefficients.shape)}")
    centred = coefficients - coefficients.mean(dim=0)
    k = min(int(top), centred.shape[0])
    idx = centred.abs().topk(k, dim=0).indices                          # (k, H, C)
    return pc_sign(centred.gather(0, idx), dim=0).to(coefficients.dtype)


def _check_text(text: Tensor, spec: AttentionPoolSpec) -> Tensor:
    text = torch.as_tensor(text)
    if text.dim() != 1 or text.shape[0] != spec.output_dim:
        raise ValueError(f"expected one text embedding of shape (D,) = ({spec.output_dim},); got {tuple(text.shape)}")
    return text.to(device=spec.c_weight.device, dtype=spec.c_weight.dtype)


def pair_alignment(spec: AttentionPoolSpec, text: Tensor, pair_signs: Optional[Tensor] = None) -> Tensor:
    """<PC0[h,n], t> = sign[h,n] <u[h,n], t> / ||u[h,n]|| for every pair, (H, C).

    Args:
        spec: the model's attention-pool spec.
        text: the concept's text embedding t, (D,) (not centred).
        pair_signs: (H, C) of +-1 (:func:`pc0_signs`, ``DatasetStats.pc0_sign``); None means +1 everywhere.

    Returns:
        (H, C) alignments in the spec's dtype.
    """
    spec = spec.detached()
    t = _check_text(text, spec)
    g = target_weights(spec, t[:, None])[..., 0]                         # <u[h,n], t>, (H, C)
    return check_pair_signs(pair_signs, spec) * g / pair_norms(spec).clamp_min(torch.finfo(g.dtype).tiny)


@dataclass
class UnitDirections:
    """Directions the concept units are ranked by.

    Attributes:
        pair_signs: (H, C) +-1, the PC0 sign of every pair.
        neurons: (C, D) unit PC0 of every neuron's contributions.
        heads: (H, D) unit PC0 of every head's contributions.
        source: where they come from ("weights" or "data: N images").
    """

    pair_signs: Tensor
    neurons: Tensor
    heads: Tensor
    source: str

    def to_state(self) -> dict:
        """A state tree for :func:`nha_plugin.files.save_state` (a run part)."""
        return {"pair_signs": self.pair_signs, "neurons": self.neurons, "heads": self.heads, "source": self.source}

    @classmethod
    def from_state(cls, state: dict) -> "UnitDirections":
        """The directions :meth:`to_state` stored."""
        return cls(**state)


def unit_directions(spec: AttentionPoolSpec, coefficients: Optional[Tensor] = None,
                    pair_signs: Optional[Tensor] = None, progress: bool = False) -> UnitDirections:
    """PC0 signs of pairs and PC0 directions of neurons and heads, from reference data when given.

    Args:
        spec: the model's attention-pool spec.
        coefficients: pair coefficients over a reference set, (B, H, C); None: weights only (every pair sign
            +1; neuron/head directions from :func:`nha_plugin.text.unit_direction` without data).
        pair_signs: (H, C) +-1 that overrides the signs computed from ``coefficients``.
        progress: tqdm bar over neurons.

    Returns:
        :class:`UnitDirections`.
    """
    from tqdm.auto import tqdm

    from ...text.describe import unit_direction

    spec = spec.detached()
    if coefficients is not None:
        if coefficients.dim() != 3 or tuple(coefficients.shape[1:]) != (spec.num_heads, spec.num_neurons):
            raise ValueError(f"coefficients must be (B, {spec.num_heads}, {spec.num_neurons}); "
                             f"got {tuple(coefficients.shape)}")
        coefficients = coefficients.to(device=spec.c_weight.device)
    if pair_signs is not None:
        signs = check_pair_signs(pair_signs, spec)
    elif coefficients is not None:
        signs = pc0_signs(coefficients.to(spec.c_weight.dtype))
    else:
        signs = check_pair_signs(None, spec)
    neurons = torch.stack([unit_direction(spec, ("neuron", (n,)), coefficients)
                           for n in tqdm(range(spec.num_neurons), desc="neuron PC0", disable=not progress)])
    heads = torch.stack([unit_direction(spec, ("head", (h,)), coefficients) for h in range(spec.num_heads)])
    source = "weights" if coefficients is None else f"data: {coefficients.shape[0]} images"
    return UnitDirections(pair_signs=signs, neurons=neurons, heads=heads, source=source)


@dataclass
class ConceptUnits:
    """The units a concept is read from.

    Attributes:
        concept: the concept's name.
        text: its text embedding t, (D,).
        pairs: (k, 2) long, rows (head, neuron), best first; ``pair_alignment`` (k,) their <PC0, t>.
        pair_vectors: (k, D) the pair directions u[h,n] of those pairs.
        neurons: (k_neurons,) long; ``neuron_alignment`` their <PC0, t>.
        heads: (k_heads,) long; ``head_alignment`` their <PC0, t>.
    """

    concept: str
    text: Tensor
    pairs: Tensor
    pair_alignment: Tensor
    pair_vectors: Tensor
    neurons: Tensor
    neuron_alignment: Tensor
    heads: Tensor
    head_alignment: Tensor

    def to_dict(self) -> dict:
        """JSON-ready ``{"pairs": [{"head", "neuron", "alignment"}...], "neurons": [...], "heads": [...]}``."""
        return {
            "pairs": [{"head": int(h), "neuron": int(n), "alignment": float(a)}
                      for (h, n), a in zip(self.pairs.tolist(), self.pair_alignment.tolist())],
            "neurons": [{"neuron": int(n), "alignment": float(a)}
                        for n, a in zip(self.neurons.tolist(), self.neuron_alignment.tolist())],
            "heads": [{"head": int(h), "alignment": float(a)}
                      for h, a in zip(self.heads.tolist(), self.head_alignment.tolist())],
        }


def select_units(spec: AttentionPoolSpec, text: Tensor, directions: Optional[UnitDirections] = None, k: int = 5,
                 k_neurons: int = 5, k_heads: int = 1, pair_signs: Optional[Tensor] = None,
                 concept: str = "") -> ConceptUnits:
    """The top-k pairs, neurons and heads for a concept, ranked by <PC0, t> (signed, largest first).

    Args:
        spec: the model's attention-pool spec.
        text: the concept's text embedding t, (D,), not centred.
        directions: from :func:`unit_directions`; None: weights only.
        k, k_neurons, k_heads: how many pairs / neurons / heads to keep.
        pair_signs: (H, C) +-1 overriding ``directions.pair_signs``; None (and no directions) means +1.
        concept: a name stored with the result.

    Returns:
        :class:`ConceptUnits`.
    """
    spec = spec.detached()
    H, C = spec.num_heads, spec.num_neurons
    for name, value, limit in (("k", k, H * C), ("k_neurons", k_neurons, C), ("k_heads", k_heads, H)):
        if not 1 <= int(value) <= limit:
            raise ValueError(f"{name} must be in 1..{limit} for this model (H={H}, C={C}); got {value}")
    if directions is None:
        directions = unit_directions(spec, pair_signs=pair_signs)
    signs = pair_signs if pair_signs is not None else directions.pair_signs
    t = _check_text(text, spec)
    align = pair_alignment(spec, t, signs)
    best = align.flatten().topk(int(k))
    pairs = torch.stack([best.indices // C, best.indices % C], dim=1)
    vectors = torch.stack([pair_directions(spec, heads=slice(h, h + 1))[0, n] for h, n in pairs.tolist()])
    n_align = directions.neurons.to(t) @ t
    h_align = directions.heads.to(t) @ t
    top_n = n_align.topk(int(k_neurons))
    top_h = h_align.topk(int(k_heads))
    return ConceptUnits(concept=concept, text=t, pairs=pairs, pair_alignment=best.values, pair_vectors=vectors,
                        neurons=top_n.indices, neuron_alignment=top_n.values, heads=top_h.indices,
                        head_alignment=top_h.values)


def concept_scores(contributions: Contributions, units: ConceptUnits) -> Dict[str, Tensor]:
    """Per-image scores of one concept by every method in :data:`METHODS`.

    ``nad_pairs`` = ||sum_{top pairs} s u|| / ||y||; ``cosine`` = cos(y, t); ``neurons`` =
    ||sum_{top neurons} sum_h s[h,n] u[h,n]|| / ||y||; ``heads`` = ||sum_{top heads} W_o^h W_v^h s_h|| / ||y||.

    Args:
        contributions: the decomposition of B images (``nha_plugin.decompose``).
        units: the concept's units (:func:`select_units`).

    Returns:
        method -> scores (B,).
    """
    y = contributions.embedding
    norm = y.norm(dim=-1)
    s = contributions.pair_coefficients
    vectors = units.pair_vectors.to(s)
    pair_part = torch.einsum("bk,kD->bD", s[:, units.pairs[:, 0], units.pairs[:, 1]], vectors)
    neuron_part = contributions.neuron_contributions(units.neurons.to(s.device)).sum(dim=1)
    head_part = contributions.head_contributions()[:, units.heads.to(s.device)].sum(dim=1)
    t = units.text.to(y)
    return {
        "nad_pairs": pair_part.norm(dim=-1) / norm,
        "cosine": (y @ t) / (norm * t.norm()),
        "neurons": neuron_part.norm(dim=-1) / norm,
        "heads": head_part.norm(dim=-1) / norm,
    }
