"""Waterbirds (Sagawa et al. 2020) from a user-supplied folder in the official layout; nothing is downloaded.

The folder holds ``metadata.csv`` and the images it names. Columns used: ``img_id``, ``img_filename`` (path
relative to the folder), ``y`` (0 = landbird, 1 = waterbird), ``split`` (0/1/2 = train/val/test) and ``place``
(0 = land background, 1 = water background); ``place_filename`` (the Places image the bird was pasted on) is
read when present and kept as metadata. Extra columns (e.g. the WILDS release's) are ignored.

Groups are label x place, numbered ``2 * y + place``: 0 landbird on land, 1 landbird on water, 2 waterbird
on land, 3 waterbird on water. Worst-group accuracy is the minimum of the per-group accuracies.

Images get the CLIP evaluation geometry: short side resized to ``size`` (bicubic), centre crop.

Example::

    ds = WaterbirdsDataset("/data/waterbird_complete95_forest2water2", split="test")
    item = ds[0]                     # item.image (224, 224, 3) uint8, item.label, item.place, item.group
    ds.group_counts()                # {"landbird on land": 2255, ...}
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .imagenet_s import resize_centre_crop

__all__ = ["WaterbirdsDataset", "WaterbirdsItem", "CLASS_NAMES", "PLACE_NAMES", "GROUP_NAMES", "SPLITS",
           "PLACE_KEYWORDS"]

CLASS_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")
GROUP_NAMES = tuple(f"{c} on {p}" for c in CLASS_NAMES for p in PLACE_NAMES)
SPLITS = {"train": 0, "val": 1, "test": 2}
REQUIRED_COLUMNS = ("img_id", "img_filename", "y", "split", "place")
# words that mark a text as being about the setting rather than the bird (Waterbirds backgrounds are
# Places365 forest/bamboo scenes for land and ocean/lake scenes for water)
PLACE_KEYWORDS = ("place", "places", "background", "scene", "scenery", "landscape", "setting", "forest", "woods",
                  "bamboo", "tree", "trees", "jungle", "field", "lake", "ocean", "sea", "beach", "water", "river",
                  "shore", "coast", "pond", "sky", "mountain", "city", "street", "indoor", "outdoor", "park",
                  "garden", "desert", "snow", "grass", "land")


@dataclass
class WaterbirdsItem:
    """One image: ``image`` (size, size, 3) uint8, ``label`` y, ``place``, ``group`` = 2 y + place."""

    index: int
    image: np.ndarray
    label: int
    place: int
    group: int
    filename: str


def _split_code(split: Union[str, int, None]) -> Optional[int]:
    if split is None or split == "all":
        return None
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}, 0/1/2 or 'all'")
        return SPLITS[split]
    if int(split) not in SPLITS.values():
        raise ValueError(f"unknown split {split!r}; expected 0 (train), 1 (val), 2 (test) or 'all'")
    return int(split)


class WaterbirdsDataset:
    """Lazy reader over ``root/metadata.csv``; ``ds[i]`` -> :class:`WaterbirdsItem`.

    Args:
        root: the Waterbirds folder (holding ``metadata.csv``).
        split: "train" | "val" | "test" | 0 | 1 | 2 | "all".
        size: output side in pixels (224 for CLIP ViT-B/L at 224 px).
        n: keep only the first ``n`` rows of the split (in file order).

    Attributes:
        labels, places, groups: (N,) int64 arrays of the kept rows.
        filenames: N relative image paths.
    """

    def __init__(self, root: Union[str, Path], split: Union[str, int, None] = "test", size: int = 224,
                 n: Optional[int] = None):
        self.root = Path(root)
        meta = self.root / "metadata.csv"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} not found: point root at the Waterbirds folder (the one holding "
                                    "metadata.csv and the bird image sub-folders)")
        code = _split_code(split)
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{meta} lacks column(s) {missing}; expected the official Waterbirds header "
                                 f"{','.join(REQUIRED_COLUMNS)},place_filename; found {reader.fieldnames}")
            rows = list(reader)
        ids, names, ys, places, place_files = [], [], [], [], []
        for line, row in enumerate(rows, start=2):
            try:
                y, s, p = int(row["y"]), int(row["split"]), int(float(row["place"]))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{meta} line {line}: y, split and place must be integers; got "
                                 f"y={row['y']!r}, split={row['split']!r}, place={row['place']!r}") from err
            if y not in (0, 1) or p not in (0, 1) or s not in (0, 1, 2):
                raise ValueError(f"{meta} line {line}: expected y and place in {{0, 1}} and split in {{0, 1, 2}}; "
                                 f"got y={y}, place={p}, split={s}")
            if code is not None and s != code:
                continue
            ids.append(row["img_id"])
            names.append(row["img_filename"])
            ys.append(y)
            places.append(p)
            place_files.append(row.get("place_filename"))
        if n is not None:
            ids, names, ys, places, place_files = (v[:n] for v in (ids, names, ys, places, place_files))
        if not names:
            raise ValueError(f"{meta} has no rows for split {split!r}")
        self.size = int(size)
        self.split = split
        self.img_ids: List[str] = list(ids)
        self.filenames: List[str] = list(names)
        self.place_filenames: List[Optional[str]] = list(place_files)
        self.labels = np.asarray(ys, dtype=np.int64)
        self.places = np.asarray(places, dtype=np.int64)
        self.groups = 2 * self.labels + self.places

    def __len__(self) -> int:
        return len(self.filenames)

    def _image(self, i: int) -> np.ndarray:
        path = self.root / self.filenames[i]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed in metadata.csv (row img_id={self.img_ids[i]}) is missing; "
                                    "is the dataset fully extracted under root?")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return resize_centre_crop(arr, self.size)

    def __getitem__(self, i: int) -> WaterbirdsItem:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return WaterbirdsItem(i, self._image(i), int(self.labels[i]), int(self.places[i]), int(self.groups[i]),
                              self.filenames[i])

    def __iter__(self) -> Iterator[WaterbirdsItem]:
        return (self[i] for i in range(len(self)))

    def images(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """(n, size, size, 3) uint8 for ``indices`` (all rows by default)."""
        idx = range(len(self)) if indices is None else indices
        return np.stack([self._image(int(i)) for i in idx])

    def group_counts(self) -> Dict[str, int]:
        """Images per group, keyed by :data:`GROUP_NAMES`."""
        counts = np.bincount(self.groups, minlength=4)
        return {name: int(c) for name, c in zip(GROUP_NAMES, counts)}
