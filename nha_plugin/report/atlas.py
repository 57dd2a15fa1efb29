"""The atlas of a CLIP-ResNet's attention-pool units: every head, every neuron and every (head, neuron) pair.

Per unit: OMP words with coefficients (:func:`nha_plugin.text.describe_units`, heads and neurons along the PC0
of their contributions over the images), importance from :class:`nha_plugin.stats.DatasetStats` (pairs: the
paper's top-k centred norm; heads and neurons: RMS norm of the centred contribution), its share of the total
of its kind, a sparsity figure ``k90`` (how many of its pairs hold 90% of its pair importance) and its
top-activating images with the unit's map over the 7x7 (h x w) token grid.

Activation of image b along unit direction d (what ranks the top images): the centred contribution projected
on d. With ``w[h, n] = u[h, n] . d``: a pair ``(s[b,h,n] - mean) * ||u|| * pc0_sign``, a head
``sum_n (s[b,h,n] - mean) w[h, n]``, a neuron ``sum_h (s[b,h,n] - mean) w[h, n]``. Its map over spatial token t
replaces ``s[b,h,n]`` by the token's share ``a[b,h,t] z[b,t,n]`` (since ``s = sum_t a z``; the mean token t=0
is left out of the picture).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..text.describe import neuron_directions
from .pictures import grid_values

__all__ = ["resnet_atlas", "synthetic_atlas", "k90"]


def k90(importances: np.ndarray) -> int:
    """How many of the largest entries of a non-negative vector hold 90% of its sum (0 for an all-zero one)."""
    v = np.sort(np.asarray(importances, np.float64))[::-1]
    total = v.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(v), 0.9 * total - 1e-12 * total) + 1)


@torch.no_grad()
def resnet_atlas(model, tokenizer, images: torch.Tensor, *, pool="scenes", k: int = 5, top: int = 4,
                 batch_size: int = 32, progress: bool = True) -> dict:
    """Describe every head, neuron and pair of a CLIP-ResNet over ``images``.

    Args:
        model: the CLIP model (or image tower) with its attention pool; left unchanged.
        tokenizer: its tokenizer (for the word pool).
        images: (N, 3, S, S) preprocessed images (the "dataset" of the statistics and top images).
        pool: word pool of :func:`nha_plugin.text.build_dictionary` (``"scenes"``, ``"words"``, a list).
        k: words per unit.
        top: top-activating images per unit.
        batch_size: images per forward pass.
        progress: tqdm bars.

    Returns:
        ``{"n_heads", "n_neurons", "grid": [h, w], "heads", "neurons", "pairs"}``; each unit a dict with
        ``id``, ``kind``, ``head``/``neuron``, ``importance``, ``share``, ``k90`` (heads, neurons),
        ``words`` [[word, coefficient], ...], ``residual`` and ``top`` [[image index, activation, grid], ...].
    """
    from ..adapters import get_spec
    from ..harness.forward import pool_inputs
    from ..pool import pair_coefficients, pair_directions
    from ..stats import collect
    from ..text import build_dictionary
    from ..text.describe import unit_direction
    from ..text.omp import sparse_decompose
    spec = get_spec(model).detached()
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    stats = collect(spec, batches, k=min(50, len(images)), progress=progress)
    a_all, z_all, grid = [], [], None
    for x in batches:
        feats, z, a = pool_inputs(spec, x.to(spec.c_weight.dtype))
        a_all.append(a.float())
        z_all.append(z.float())
        grid = list(feats.shape[-2:])
    a, z = torch.cat(a_all), torch.cat(z_all)                       # (B, H, T), (B, T, C)
    s = pair_coefficients(a, z)                                      # (B, H, C)
    H, C = s.shape[1:]
    mean = stats.pair_mean.float()
    u = pair_directions(spec).float()                                # (H, C, D)
    unorm = u.norm(dim=-1)
    dictionary = build_dictionary(model, tokenizer, pool, progress=progress)
    heads = [f"head:{h}" for h in range(H)]
    # one direction per unit, then one OMP call: describe_units would rebuild a head's pair directions per unit
    dirs = torch.cat([torch.stack([unit_direction(spec, unit, s).float() for unit in heads]),
                      neuron_directions(spec, s), F.normalize(u.transpose(0, 1).reshape(C * H, -1), dim=-1)])
    codes = sparse_decompose(dirs, dictionary.atoms, k=k)
    desc = [{"words": dictionary.words(codes, i), "kind": kind,
             "residual": float(codes.residual_norms[i] / codes.target_norms[i])}
            for i, kind in enumerate(["head"] * H + ["neuron"] * C + ["pair"] * (H * C))]
    pair_imp = stats.importance.float()                              # (H, C)
    # u[h,n] . d for each head's own pairs (H, C) and each neuron's own pairs (C, H)
    w_heads = torch.einsum("hcd,hd->hc", u, dirs[:H])
    w_neurons = torch.einsum("hcd,cd->ch", u, dirs[H:H + C])                         # (H + C, H, C): u[h,n] . d_unit
    centred = s - mean
    sign = stats.pc0_sign.float()

    def tops(act: torch.Tensor, token_map: Callable[[int], torch.Tensor]) -> list:
        order = act.argsort(descending=True)[:top].tolist()
        return [[b, round(float(act[b]), 4), grid_values(token_map(b)[1:].reshape(grid))] for b in order]

    out_heads, out_neurons, out_pairs = [], [], []
    head_imp, neuron_imp = stats.head_importance.float(), stats.neuron_importance.float()
    for h in range(H):
        wh = w_heads[h]                                               # (C,)
        out_heads.append(dict(desc[h], id=f"head:{h}", head=h, importance=float(head_imp[h]),
                              share=float(head_imp[h] / head_imp.sum()), k90=k90(pair_imp[h].numpy()),
                              top=tops(centred[:, h] @ wh, lambda b, h=h, wh=wh: (a[b, h, :, None] * z[b]) @ wh)))
    for n in range(C):
        wn = w_neurons[n]                                            # (H,)
        out_neurons.append(dict(desc[H + n], id=f"neuron:{n}", neuron=n, importance=float(neuron_imp[n]),
                                share=float(neuron_imp[n] / neuron_imp.sum()), k90=k90(pair_imp[:, n].numpy()),
                                top=tops(centred[:, :, n] @ wn,
                                         lambda b, n=n, wn=wn: (a[b].T * z[b, :, n, None]) @ wn)))
    total = float(pair_imp.sum())
    for i, (n, h) in enumerate((n, h) for n in range(C) for h in range(H)):
        f = float(unorm[h, n] * sign[h, n])
        out_pairs.append(dict(desc[H + C + i], id=f"H{h}N{n}", head=h, neuron=n, importance=float(pair_imp[h, n]),
                              share=float(pair_imp[h, n]) / total,
                              top=tops(centred[:, h, n] * f, lambda b, h=h, n=n, f=f: a[b, h] * z[b, :, n] * f)))
    for unit in out_heads + out_neurons + out_pairs:
        unit["words"] = [[wd, round(float(c), 4)] for wd, c in unit["words"]]
    return {"n_heads": H, "n_neurons": C, "grid": grid, "heads": out_heads, "neurons": out_neurons,
            "pairs": out_pairs, "pool": dictionary.pool, "k": k}


def synthetic_atlas(n_heads: int = 48, n_neurons: int = 3072, k: int = 5, seed: int = 0,
                    vocabulary: Optional[List[str]] = None) -> dict:
    """An atlas of random units of a given size (RN50x16: 48 heads x 3072 neurons = 147,456 pairs) with random
    words and importances, to measure the site at scale. No top images.

    Returns:
        The same layout as :func:`resnet_atlas`.
    """
    rng = np.random.default_rng(seed)
    vocab = vocabulary or [f"{a}{b}" for a in ("yellow", "red", "stripe", "dog", "sky", "wood", "car", "cat")
                           for b in ("", "s", "ish", "y", "-like", " pattern", " scene", " photo")]

    def words() -> list:
        picks = rng.choice(len(vocab), size=k, replace=False)
        coefs = np.sort(rng.normal(size=k))[::-1]
        return [[vocab[j], round(float(c), 4)] for j, c in zip(picks, coefs)]

    imp = rng.gamma(1.0, size=(n_heads, n_neurons))
    heads = [{"id": f"head:{h}", "kind": "head", "head": h, "importance": float(imp[h].sum()),
              "share": float(imp[h].sum() / imp.sum()), "k90": k90(imp[h]), "words": words(), "top": [],
              "residual": 0.5} for h in range(n_heads)]
    neurons = [{"id": f"neuron:{n}", "kind": "neuron", "neuron": n, "importance": float(imp[:, n].sum()),
                "share": float(imp[:, n].sum() / imp.sum()), "k90": k90(imp[:, n]), "words": words(), "top": [],
                "residual": 0.5} for n in range(n_neurons)]
    pairs = [{"id": f"H{h}N{n}", "kind": "pair", "head": h, "neuron": n, "importance": float(imp[h, n]),
              "share": float(imp[h, n] / imp.sum()), "words": words(), "top": [], "residual": 0.5}
             for n in range(n_neurons) for h in range(n_heads)]
    return {"n_heads": n_heads, "n_neurons": n_neurons, "grid": [7, 7], "heads": heads, "neurons": neurons,
            "pairs": pairs, "pool": "synthetic", "k": k}
