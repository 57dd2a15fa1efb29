"""Per-image seeds and the global random generators: how the harness makes random draws repeatable.

Every random draw of a benchmark depends on one image's seed, :func:`image_seeds` of the configuration's seed
and the image's position, never on a generator stream shared across images. Libraries that draw from the
global generators (Captum's GradientShap: numpy and torch) are seeded per image inside
:func:`global_rngs_restored`, which gives the caller its generator states back.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List

import numpy as np
import torch

__all__ = ["image_seeds", "seed_globals", "global_rngs_restored"]


def image_seeds(seed: int, indices: Iterable[int]) -> List[int]:
    """One 32-bit seed per image index, from ``numpy.random.SeedSequence((seed, index))`` (independent streams
    for different indices or seeds).

    Args:
        seed: the run's seed (``BenchmarkConfig.seed``).
        indices: image positions in the benchmark.

    Returns:
        A list of ints in [0, 2**32), one per index.
    """
    return [int(np.random.SeedSequence((int(seed), int(i))).generate_state(1)[0]) for i in indices]


def seed_globals(seed: int) -> None:
    """Seed numpy's and torch's global generators (torch: every device) with ``seed``."""
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def global_rngs_restored(device: torch.device) -> Iterator[None]:
    """Restore numpy's and torch's global generator states (CPU, and ``device`` when it is a GPU) on exit.

    Args:
        device: the device the draws happen on.
    """
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(state)
