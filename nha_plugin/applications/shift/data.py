"""A monitored dataset: images in groups (years, months, sites) with each concept's presence, and its batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ShiftData", "image_batches"]


@dataclass
class ShiftData:
    """Images grouped for monitoring, with each concept's presence.

    Attributes:
        groups: (N,) group label per image (e.g. the year).
        presence: concept name -> (N,) bool.
        load: image index -> PIL image.
        name: a description for reports.
        presence_rule: concept name -> how presence was read (for reports).
    """

    groups: np.ndarray
    presence: Dict[str, np.ndarray]
    load: Callable[[int], "object"]
    name: str
    presence_rule: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = np.asarray(self.groups)
        for c, p in self.presence.items():
            p = np.asarray(p).astype(bool)
            if p.shape != self.groups.shape:
                raise ValueError(f"presence of {c!r} has {p.size} entries for {self.groups.size} images")
            self.presence[c] = p

    def __len__(self) -> int:
        return int(self.groups.size)

    @property
    def order(self) -> list:
        """The group labels, sorted, as Python scalars (the first is the default reference group)."""
        return sorted(set(self.groups.tolist()))

    @classmethod
    def from_scenes(cls, n: int, seed: int = 424242) -> "ShiftData":
        """``n`` generic generated scenes (every concept at its natural rate), one group, no presence labels:
        a fit set for signs and PC0s independent of the monitored groups (as the paper fits on ImageNet)."""
        from PIL import Image

        from ...scenes import SceneDataset

        scenes = SceneDataset(n, seed=seed)
        return cls(groups=np.zeros(n, dtype=int), presence={}, load=lambda k: Image.fromarray(scenes[k].image),
                   name=f"SceneDataset(n={n}, seed={seed})")

    @classmethod
    def from_sampler(cls, sampler, concept: str) -> "ShiftData":
        """All scenes of a :class:`~nha_plugin.scenes.ShiftSampler`; presence = the planted
        concept (``scene.meta["has_concept"]``, exact)."""
        from PIL import Image

        index = [(year, i) for year in sampler.years for i in range(sampler.n_per_group)]
        presence = np.concatenate([sampler.has_concept(year) for year in sampler.years])
        attr, value = sampler.concept
        return cls(groups=np.array([y for y, _ in index]), presence={concept: presence},
                   load=lambda k: Image.fromarray(sampler.scene(*index[k]).image),
                   name=f"scenes ShiftSampler(concept={attr}={value}, shares={sampler.shares}, "
                        f"n_per_group={sampler.n_per_group}, seed={sampler.seed})",
                   presence_rule={concept: f"planted {attr} == {value!r} (exact)"})


def image_batches(data: ShiftData, indices: Sequence[int], preprocess, batch_size: int, device, dtype,
                  desc: str, progress: bool) -> Iterable[Tuple[np.ndarray, Tensor]]:
    """The images ``indices`` of ``data``, preprocessed, in batches, with a tqdm bar.

    Args:
        data: the dataset.
        indices: image indices, in the order they are yielded.
        preprocess: PIL image -> (3, S, S) tensor (the model's).
        batch_size: images per batch.
        device, dtype: where the batches go.
        desc: the bar's label; progress: show the bar.

    Yields:
        ``(idx, images)``: the batch's indices (b,) and its images (b, 3, S, S).
    """
    from tqdm.auto import tqdm

    indices = list(indices)
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, len(indices), batch_size):
            idx = np.asarray(indices[i:i + batch_size])
            images = torch.stack([preprocess(data.load(int(j)).convert("RGB")) for j in idx])
            yield idx, images.to(device=device, dtype=dtype)
            bar.update(len(idx))
