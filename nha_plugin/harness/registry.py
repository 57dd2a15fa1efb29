"""The method registry: every attribution method turns (forward wrapper, images, target) into a map.

This module knows no method; the family modules (:mod:`.nad`, :mod:`.clip_baselines`, :mod:`.captum_methods`,
:mod:`.lrp`, :mod:`.floors`, :mod:`.vit_methods`) register theirs when :mod:`nha_plugin.harness` is imported.

A method is a function ``fn(forward, images, target, **options) -> Tensor`` (or ``(Tensor, completeness_error)``
when it claims completeness). ``forward`` is a linear read-out module (``ZeroShotClassifier``,
``TextSimilarity``, ``LinearReadout``: images (B, 3, S, S) -> logits (B, K), with ``model``, ``readout``,
``logit_scale``, ``normalize``); ``target`` is a (B,) long tensor of read-out columns. The raw attribution may
be pixel-shaped (B, 3, S, S), a layer map (B, 1, h, w) or (B, h, w); :func:`explain` post-processes every
method identically (channels summed, bilinear upsampling to S, float32) and times it.

Options are keyword arguments a method declares at registration (``options=("captum", "seeds")``):
:func:`explain` hands each method the options it declares and no others, so one call serves every method.
``seeds`` (one int per image) is the convention of stochastic methods: image b's random draws depend only
on ``seeds[b]``, so recomputing any subset of a batch reproduces its numbers.

Register a new method in a few lines::

    from nha_plugin.harness import register_method

    @register_method("my_grad_norm", family="user", description="L2 norm of the input gradient")
    def my_grad_norm(forward, images, target):
        x = images.clone().requires_grad_(True)
        forward(x).gather(1, target[:, None]).sum().backward()
        return x.grad.norm(dim=1)                     # (B, S, S)

Completeness errors are relative: ``|sum(attribution) + reported constants - claimed total| / |f(x)[target]|``.
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Method", "MethodFn", "Explanation", "MethodUnavailableError", "METHODS", "UNAVAILABLE", "register_method",
           "mark_unavailable", "import_family", "get_method", "available_methods", "explain", "to_pixel_map"]

MethodFn = Callable[..., Union[Tensor, Tuple[Tensor, Tensor]]]


class MethodUnavailableError(KeyError):
    """A known method whose optional dependency is not installed."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Method:
    """One registered attribution method.

    Attributes:
        name: registry key.
        fn: ``fn(forward, images (B,3,S,S), target (B,), **options) -> map`` or ``(map, completeness_error (B,))``.
        family: "nad" | "clip" | "captum" | "zennit" | "floor" | "vit" | "user".
        description: one line for the protocol.
        claims_completeness: whether ``fn`` returns a completeness error.
        needs_grad: whether it needs autograd (others run under ``torch.no_grad``).
        target_dependent: False for maps that ignore the target (raw attention, floors).
        options: keyword options ``fn`` accepts (e.g. ``"captum"`` settings, ``"seeds"`` per image).
    """

    name: str
    fn: MethodFn
    family: str = "user"
    description: str = ""
    claims_completeness: bool = False
    needs_grad: bool = True
    target_dependent: bool = True
    options: Tuple[str, ...] = ()

    @property
    def stochastic(self) -> bool:
        """Whether the method draws random numbers (it then takes per-image ``seeds``)."""
        return "seeds" in self.options


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        method: the method's name.
        maps: (B, S, S) float32 pixel maps after the shared post-processing.
        seconds: wall time of the whole call (method + post-processing), seconds.
        completeness_error: (B,) relative completeness error, or None when the method makes no claim.
        raw: the method's own output before post-processing.
    """

    method: str
    maps: Tensor
    seconds: float
    completeness_error: Optional[Tensor] = None
    raw: Optional[Tensor] = None

    @property
    def seconds_per_image(self) -> float:
        """The call's wall time divided by the batch size."""
        return self.seconds / max(1, self.maps.shape[0])


METHODS: Dict[str, Method] = {}
UNAVAILABLE: Dict[str, str] = {}      # name -> why it cannot run here (what to install)


def register_method(name: str, *, family: str = "user", description: str = "", completeness: bool = False,
                    needs_grad: bool = True, target_dependent: bool = True, options: Sequence[str] = (),
                    overwrite: bool = False):
    """Decorator that registers ``fn(forward, images, target, **options)`` under ``name``.

    Args:
        name: the registry key.
        family, description, completeness, needs_grad, target_dependent, options: see :class:`Method`
            (``completeness`` fills ``claims_completeness``).
        overwrite: replace a method registered under the same name.

    Returns:
        A decorator that returns ``fn`` unchanged.
    """

    def deco(fn: MethodFn) -> MethodFn:
        if name in METHODS and not overwrite:
            raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
        METHODS[name] = Method(name, fn, family, description, completeness, needs_grad, target_dependent,
                               tuple(options))
        UNAVAILABLE.pop(name, None)
        return fn

    return deco


def mark_unavailable(names: Iterable[str], reason: str) -> None:
    """Record methods that exist but cannot run here (a missing optional package): asking for them raises
    :class:`MethodUnavailableError` with ``reason`` (which should say what to install)."""
    for name in names:
        if name not in METHODS:
            UNAVAILABLE[name] = reason


def import_family(module: str, methods: Sequence[str], needs: str, extra: str) -> bool:
    """Import a family module that needs the optional package ``needs``, so that its methods register; when
    ``needs`` is not installed, mark ``methods`` unavailable instead (asking for them then says
    ``pip install 'nha-plugin[extra]'``). Any other import failure propagates.

    Args:
        module: the family module's absolute name.
        methods: the names it registers.
        needs: the optional package's import name.
        extra: the nha-plugin extra that installs it.

    Returns:
        Whether the module was imported.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        if importlib.util.find_spec(needs) is not None:
            raise
        mark_unavailable(methods, f"it needs {needs}: pip install 'nha-plugin[{extra}]'")
        return False
    return True


def available_methods() -> List[str]:
    """Registered method names, in registration order (without the ones :func:`mark_unavailable` recorded)."""
    return list(METHODS)


def get_method(name: Union[str, Method]) -> Method:
    """The :class:`Method` registered under ``name`` (a Method is returned as it is).

    Raises:
        MethodUnavailableError: the method needs an optional package that is not installed.
        KeyError: no such method.
    """
    if isinstance(name, Method):
        return name
    if name in METHODS:
        return METHODS[name]
    if name in UNAVAILABLE:
        raise MethodUnavailableError(f"method {name!r} is not available: {UNAVAILABLE[name]}")
    raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")


def to_pixel_map(raw: Tensor, size: int) -> Tensor:
    """The shared post-processing of every method's output.

    Args:
        raw: (B, C, H, W) pixel attributions (channels summed) or layer maps (B, 1, h, w) / (B, h, w).
        size: the image side S.

    Returns:
        (B, size, size) float32, detached; layer maps upsampled bilinearly (align_corners=False).
    """
    raw = raw.detach().float()
    if raw.dim() == 3:
        raw = raw[:, None]
    if raw.dim() != 4:
        raise ValueError(f"expected an attribution (B, C, H, W) or (B, h, w); got {tuple(raw.shape)}")
    if raw.shape[1] != 1:
        raw = raw.sum(dim=1, keepdim=True)
    if raw.shape[-2:] != (size, size):
        raw = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)
    return raw[:, 0]


def explain(method: Union[str, Method], forward: nn.Module, images: Tensor, target: Any,
            **options: Any) -> Explanation:
    """Run one method on a batch and post-process its map; times the call (method + post-processing).

    Args:
        method: a registered name or a :class:`Method`.
        forward: the linear read-out (see the module docstring).
        images: (B, 3, S, S).
        target: int or (B,) read-out columns.
        **options: e.g. ``captum=CaptumSettings(...)``, ``seeds=[...]`` (B ints); each method receives the
            ones it declares (:attr:`Method.options`).

    Returns:
        An :class:`Explanation` with (B, S, S) maps.
    """
    m = get_method(method)
    target = torch.as_tensor(target, dtype=torch.long, device=images.device).flatten()
    if target.numel() == 1:
        target = target.expand(images.shape[0])
    kwargs = {k: v for k, v in options.items() if k in m.options and v is not None}
    if "seeds" in kwargs:
        kwargs["seeds"] = [int(s) for s in kwargs["seeds"]]
        if len(kwargs["seeds"]) != images.shape[0]:
            raise ValueError(f"seeds must hold one int per image ({images.shape[0]}); got {len(kwargs['seeds'])}")
    start = time.perf_counter()
    with torch.set_grad_enabled(m.needs_grad):
        out = m.fn(forward, images, target, **kwargs)
    delta = None
    if isinstance(out, tuple):
        out, delta = out
        delta = delta.detach().float().abs()
    maps = to_pixel_map(out, images.shape[-1])
    seconds = time.perf_counter() - start
    return Explanation(m.name, maps, seconds, delta if m.claims_completeness else None, out.detach())
