"""Quantus without glue: an ``explain_func`` for NAD and every registered harness method, the read-out model that
Quantus should evaluate (and MPRT should randomise), and the arrays Quantus expects.

    import quantus
    from nha_plugin.harness.quantus import explain_func, image_readout, quantus_arrays

    model = image_readout(head)                       # the image tower and the read-out, nothing else
    x, y, s = quantus_arrays(items, classes)          # (N,3,S,S) float32, (N,) int64, (N,1,S,S) uint8
    scores = quantus.PointingGame(disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, s_batch=s, explain_func=explain_func,
        explain_func_kwargs={"method": "nad_spatial"}, device="cpu")

**One lift, every metric.** :func:`explain_func` returns (B, 1, S, S) float32 maps: the harness's own
post-processing (:func:`nha_plugin.harness.registry.to_pixel_map`), i.e. pixel attributions summed over the
channels and layer maps (NAD's 7 x 7 layer4 grid) upsampled *bilinearly* (``align_corners=False``). It is the
shape every Quantus family accepts: localisation metrics flatten ``a`` and ``s`` (B, 1, S, S) together (a
(B, 3, S, S) map, as ``nha.lift_to_input`` gives for Captum's infidelity, fails there with a broadcast error);
faithfulness and randomisation metrics broadcast it over the channels. Why bilinear: it is what the harness
scores, so a Quantus number and a harness number describe the same map; and a nearest-neighbour lift turns
each cell into an S/h x S/w plateau of tied maxima, which Quantus's PointingGame counts as a hit when *any* tied
pixel falls in the mask, so the lift alone would change the pointing game. Bilinear keeps one maximum near the
best cell's centre (ties remain only along the outer half-cells, where interpolation clamps).

**MPRT randomises what explains the output.** A ``ZeroShotClassifier`` holds the whole CLIP model, text tower
included; MPRT re-draws every module with ``reset_parameters``, so on it most of its "layers" are text-tower
layers that cannot change an image's logits (their similarity is 1, inflating the average, and their
explanations are wasted time). :func:`image_readout` holds only the image tower and the read-out matrix (a
buffer, not a layer: the text directions define *what* is explained and are kept, as the harness's own
randomisation check keeps them).

Quantus itself is imported lazily (:func:`quantus_metric`); without it the error names the ``bench`` extra.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..readout import LinearReadout, contrastive
from .captum_methods import CAPTUM_SETTINGS, CaptumSettings
from .data import BenchItem, items_to_tensor
from .forward import model_of
from .registry import explain, get_method
from .seeds import image_seeds

__all__ = ["explain_func", "image_readout", "quantus_arrays", "quantus_metric", "require_quantus",
           "EXPLAIN_KWARGS"]

# the keyword arguments explain_func understands; Quantus adds ``device`` itself
EXPLAIN_KWARGS = ("method", "captum", "seed", "device")


def require_quantus():
    """The ``quantus`` module; ImportError naming the extra that installs it when it is missing."""
    try:
        return importlib.import_module("quantus")
    except ImportError as err:
        raise ImportError("Quantus is not installed; install the benchmark extra: pip install 'nha-plugin[bench]'"
                          ) from err


def quantus_metric(name: str, **kwargs: Any):
    """A Quantus metric built by its class name (``"PointingGame"``, ``"MPRT"``, ...) with ``kwargs``.

    Raises:
        ImportError: Quantus is not installed (names the ``bench`` extra).
        ValueError: Quantus has no metric of that name.
    """
    quantus = require_quantus()
    cls = getattr(quantus, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"quantus {quantus.__version__} has no metric {name!r}")
    return cls(**kwargs)


def image_readout(forward: nn.Module, target_mode: str = "plain") -> LinearReadout:
    """The read-out model to hand Quantus: the image tower and the read-out matrix only.

    Args:
        forward: a linear read-out (``ZeroShotClassifier``, ``TextSimilarity``, ``LinearReadout``) over a CLIP
            model or its image tower; left unchanged (its image tower is shared, not copied; Quantus's MPRT
            copies what it randomises).
        target_mode: ``"plain"`` (its logits) or ``"contrastive"`` (``logit_c - mean_k logit_k``, through
            :func:`nha_plugin.readout.contrastive`).

    Returns:
        A :class:`~nha_plugin.readout.LinearReadout` with the same logits, whose parameters are exactly the
        image tower's; the read-out matrix is a buffer.
    """
    if target_mode not in ("plain", "contrastive"):
        raise ValueError(f"unknown target_mode {target_mode!r}; expected 'plain' or 'contrastive'")
    model = model_of(forward)
    visual = getattr(model, "visual", model)
    if visual.training:
        raise ValueError("the image tower is in training mode (BatchNorm would use batch statistics and Quantus "
                         "refuses it); call model.eval() before image_readout")
    head = LinearReadout(visual, forward.readout.detach().clone(), logit_scale=getattr(forward, "logit_scale", 1.0),
                         normalize=getattr(forward, "normalize", False), labels=getattr(forward, "labels", None))
    head = contrastive(head) if target_mode == "contrastive" else head
    # the new wrappers only: .eval() would recurse into the caller's tower (already in eval mode, checked above)
    head.training = False
    return head


def explain_func(model: nn.Module, inputs: Any, targets: Any, method: str = "nad_spatial",
                 captum: CaptumSettings = CAPTUM_SETTINGS, seed: int = 0, device: Optional[str] = None,
                 **unknown: Any) -> np.ndarray:
    """Quantus's ``explain_func``: maps of a registered harness method for a batch.

    Args:
        model: the read-out (:func:`image_readout`), or a Quantus model wrapper around it.
        inputs: (B, 3, S, S) images, channel first (numpy or tensor; Quantus hands numpy).
        targets: (B,) read-out columns (numpy, list or tensor) or one int.
        method: a registered harness method (``nha_plugin.harness.available_methods()``); NAD by default.
        captum: the Captum methods' settings.
        seed: stochastic methods (``gradient_shap``) draw image b's numbers from the seed of (seed, b).
        device: accepted because Quantus passes it; the model's own device is used.

    Returns:
        (B, 1, S, S) float32 numpy maps (channels summed, layer maps lifted bilinearly; see the module
        docstring for why).

    Raises:
        TypeError: an unknown keyword argument (the accepted ones are :data:`EXPLAIN_KWARGS`).
    """
    if unknown:
        raise TypeError(f"explain_func got unknown keyword argument(s) {sorted(unknown)}; it accepts "
                        f"{list(EXPLAIN_KWARGS)}")
    if hasattr(model, "get_model"):                               # a Quantus ModelInterface
        model = model.get_model()
    param = next(model.parameters())
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    if x.dim() != 4:
        raise ValueError(f"expected inputs (B, C, S, S), channel first; got shape {tuple(x.shape)}")
    x = x.to(device=param.device, dtype=param.dtype)
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets,
                        dtype=torch.long, device=x.device).flatten()
    m = get_method(method)
    seeds = image_seeds(seed, range(x.shape[0])) if m.stochastic else None
    maps = explain(m, model, x, t, captum=captum, seeds=seeds).maps
    return maps[:, None].cpu().numpy().astype(np.float32)


def quantus_arrays(items: Sequence[BenchItem], classes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays Quantus expects for benchmark items.

    Args:
        items: images with their object masks and labels (:func:`nha_plugin.harness.data.load_benchmark_data`).
        classes: the read-out's class names (labels are looked up here).

    Returns:
        ``x`` (N, 3, S, S) float32 normalised images, ``y`` (N,) int64 class indices, ``s`` (N, 1, S, S) uint8
        object masks (Quantus's segmentation layout).
    """
    x = items_to_tensor(items).float().numpy()
    y = np.array([list(classes).index(it.label) for it in items], dtype=np.int64)
    s = np.stack([np.asarray(it.mask, dtype=np.uint8) for it in items])[:, None]
    return x, y, s
