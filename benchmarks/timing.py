"""One way to time things side by side: interleaved rounds, warm-up, repeats, median with its spread.

Timing all forwards and then all decompositions lets a shared machine's load change between the two and swing
the ratio (0.88 to 1.03 on the same code). Here every round runs each callable once, in turn (a, b, a, b, ...),
so a load that drifts hits all of them alike; the ratio of two callables is taken round by round, and its median
and range are reported with the per-callable medians.

    from timing import time_interleaved, ratio
    t = time_interleaved({"forward": forward, "decomposition": decomposition}, repeats=5)
    t["forward"]["median"], ratio(t, "decomposition", "forward")["median"]

The benchmarks are scripts, not a package: each inserts its own folder in ``sys.path`` to import this file.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

__all__ = ["time_interleaved", "ratio", "spread", "sync", "fmt"]


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def spread(values) -> dict:
    """{"median", "min", "max", "runs"} of a list of numbers."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
                     device: str = "cpu") -> dict:
    """Seconds of each callable over ``repeats`` interleaved rounds, after ``warmup`` untimed rounds.

    Args:
        fns: name -> callable with no arguments (the order is the order within each round).
        repeats: timed rounds (at least 5 for a reported figure; fewer only in smoke runs).
        warmup: untimed rounds first (allocator, caches, lazy initialisation, kernel selection).
        device: a CUDA device is synchronised around each call.

    Returns:
        name -> {"median", "min", "max", "runs"} in seconds; ``runs[i]`` of every name come from the same round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}")
    runs = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                runs[name].append(time.perf_counter() - start)
    return {name: spread(values) for name, values in runs.items()}


def ratio(timings: Mapping[str, dict], numerator: str, denominator: str) -> dict:
    """Round-by-round ratio ``timings[numerator] / timings[denominator]`` (seconds over seconds).

    For a speed ratio ("decomposition runs at 0.95x the forward's images/s") pass the forward as the numerator:
    ``ratio(t, "forward", "decomposition")``.

    Returns:
        {"median", "min", "max", "runs"} of the per-round ratios (not the ratio of the medians).
    """
    a, b = timings[numerator]["runs"], timings[denominator]["runs"]
    return spread([x / y for x, y in zip(a, b)])


def fmt(stat: dict, digits: int = 3, scale: float = 1.0) -> str:
    """"median [min, max]" of a :func:`spread` (each value times ``scale``)."""
    m, lo, hi = (scale * stat[key] for key in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
