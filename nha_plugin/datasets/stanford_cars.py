"""Stanford Cars (Krause et al., 2013) from a folder you downloaded, with optional refined colour labels.

Nothing is downloaded. Two layouts are recognised under ``root`` (or ``root/stanford_cars``, as torchvision
stores it, or ``root/car_data/car_data``, as a Kaggle mirror unpacks):

``devkit`` (the original release)::

    cars_train/00001.jpg ...                 cars_test/00001.jpg ...
    devkit/cars_meta.mat                     class_names: 1 x 196 cell, e.g. "AM General Hummer SUV 2000"
    devkit/cars_train_annos.mat              annotations: struct with bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                                             class (1-based index into class_names), fname
    cars_test_annos_withlabels.mat           (test split; in root or devkit/)

``folders`` (torchvision ImageFolder / Kaggle mirrors)::

    train/<class name>/<file>.jpg            test/<class name>/<file>.jpg

The model year is the last token of the class name ("... SUV 2000" -> 2000); a class name without a
four-digit year is an error. Reading ``.mat`` files needs scipy (``pip install 'nha-plugin[apps]'``).

Refined colour labels: a UTF-8 CSV with a header row holding at least the columns

    image     the image's path relative to the dataset folder ("cars_train/00001.jpg",
              "train/AM General Hummer SUV 2000/00163.jpg") or its bare file name ("00001.jpg")
    colour    the colour label ("yellow"); the US spelling ``color`` is accepted

Other columns are kept per image (``StanfordCars.column(i, name)``), e.g. a 0/1 ``convertible`` column that
says where another concept is present. Images missing from the CSV get colour ``None``.

Example::

    cars = StanfordCars("~/data/stanford_cars", split="train", colours="~/data/cars_colours.csv")
    image, class_name, year, colour = cars[0]
    cars.by_year()          # {1991: [indices], ..., 2012: [...]}
"""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["StanfordCars", "CarRecord", "read_colour_labels", "model_year", "LAYOUTS", "IMAGE_SUFFIXES"]

LAYOUTS = ("auto", "devkit", "folders")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_COLUMN = "image"
COLOUR_COLUMNS = ("colour", "color")


@dataclass
class CarRecord:
    """One image: its file, class name, model year, colour label (None when unlabelled), devkit box
    (x1, y1, x2, y2, inclusive) or None, and the colour CSV's other columns for it (empty when unlabelled)."""

    path: Path
    class_name: str
    year: int
    colour: Optional[str] = None
    bbox: Optional[Tuple[int, int, int, int]] = None
    extra: Dict[str, str] = field(default_factory=dict)


def model_year(class_name: str) -> int:
    """The model year at the end of a Stanford Cars class name ("AM General Hummer SUV 2000" -> 2000)."""
    last = class_name.strip().split()[-1] if class_name.strip() else ""
    if not (len(last) == 4 and last.isdigit() and 1900 <= int(last) <= 2100):
        raise ValueError(f"class name {class_name!r} does not end in a model year (expected e.g. "
                         "'AM General Hummer SUV 2000')")
    return int(last)


def read_colour_labels(path: Union[str, Path]) -> Tuple[Dict[str, Dict[str, str]], str]:
    """Rows of the colour CSV keyed by their ``image`` value; returns (rows, name of the colour column)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"colour labels {path} not found; give a CSV with columns image,colour")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        colour_col = next((c for c in COLOUR_COLUMNS if c in header), None)
        if IMAGE_COLUMN not in header or colour_col is None:
            raise ValueError(f"colour labels {path}: expected a header with columns 'image' and 'colour' "
                             f"(image file name or relative path, colour label); got columns {header}")
        rows: Dict[str, Dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            key = row[IMAGE_COLUMN].replace("\\", "/")
            if not key:
                raise ValueError(f"colour labels {path}, line {line}: empty 'image' value")
            if key in rows:
                raise ValueError(f"colour labels {path}, line {line}: image {key!r} listed twice")
            rows[key] = row
    return rows, colour_col


def _load_mat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading the Stanford Cars devkit (.mat files) needs scipy: "
                          "pip install 'nha-plugin[apps]' (or pip install scipy)") from e
    return loadmat(str(path), squeeze_me=True)


def _find_dataset_dir(root: Path) -> Path:
    for cand in (root, root / "stanford_cars", root / "car_data" / "car_data", root / "car_data"):
        if (cand / "devkit").is_dir() or (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    raise FileNotFoundError(f"no Stanford Cars layout under {root}: expected devkit/ with cars_train/ (original "
                            "release) or train/<class name>/ folders (torchvision/Kaggle mirrors)")


class StanfordCars:
    """Stanford Cars images with class names, model years and optional colour labels.

    Args:
        root: the dataset folder (see the module docstring for the layouts).
        split: ``"train"`` or ``"test"``.
        colours: optional refined colour labels CSV (columns ``image``, ``colour``).
        layout: ``"auto"`` | ``"devkit"`` | ``"folders"``.
        crop: crop each image to its devkit bounding box (devkit layout only).

    Items are ``(PIL image (RGB), class name, year, colour)``.
    """

    def __init__(self, root: Union[str, Path], split: str = "train", colours: Union[str, Path, None] = None,
                 layout: str = "auto", crop: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        self.root = _find_dataset_dir(Path(root).expanduser())
        self.split, self.crop = split, bool(crop)
        if layout == "auto":
            layout = "devkit" if (self.root / "devkit").is_dir() else "folders"
        self.layout = layout
        self.records: List[CarRecord] = self._devkit() if layout == "devkit" else self._folders()
        if not self.records:
            raise FileNotFoundError(f"no {split} images found in {self.root} ({layout} layout)")
        self.colour_column: Optional[str] = None
        self.csv_columns: List[str] = []
        if colours is not None:
            self._attach_colours(colours)

    # ---- layouts ----------------------------------------------------------------------------------------
    def _devkit(self) -> List[CarRecord]:
        devkit = self.root / "devkit"
        meta_path = devkit / "cars_meta.mat"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: the devkit layout needs devkit/cars_meta.mat")
        names = [str(n) for n in np.atleast_1d(_load_mat(meta_path)["class_names"])]
        if self.split == "train":
            candidates = [devkit / "cars_train_annos.mat"]
        else:
            candidates = [self.root / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat"]
        annos_path = next((p for p in candidates if p.is_file()), None)
        if annos_path is None:
            raise FileNotFoundError(f"no {self.split} annotations: looked for {', '.join(map(str, candidates))}")
        annos = np.atleast_1d(_load_mat(annos_path)["annotations"])
        if "class" not in (annos.dtype.names or ()):
            raise ValueError(f"{annos_path} has no class labels (fields {annos.dtype.names}); for the test split "
                             "use cars_test_annos_withlabels.mat")
        image_dir = self.root / f"cars_{self.split}"
        years = {n: model_year(n) for n in names}
        records = []
        for a in annos:
            cls = int(a["class"])
            if not 1 <= cls <= len(names):
                raise ValueError(f"{annos_path}: class {cls} outside 1..{len(names)} (cars_meta.mat has {len(names)})")
            name = names[cls - 1]
            box = tuple(int(a[f]) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            records.append(CarRecord(path=image_dir / str(a["fname"]), class_name=name, year=years[name], bbox=box))
        return records

    def _folders(self) -> List[CarRecord]:
        split_dir = self.root / self.split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} not found: the folder layout needs {self.split}/<class name>/*.jpg")
        records = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            year = model_year(class_dir.name)
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    records.append(CarRecord(path=f, class_name=class_dir.name, year=year))
        return records

    # ---- colours ----------------------------------------------------------------------------------------
    def _attach_colours(self, colours: Union[str, Path]) -> None:
        rows, self.colour_column = read_colour_labels(colours)
        self.csv_columns = list(next(iter(rows.values())).keys()) if rows else []
        same_name = Counter(r.path.name for r in self.records)
        for r in self.records:
            rel = r.path.relative_to(self.root).as_posix()
            key = rel if rel in rows else (r.path.name if r.path.name in rows else None)
            if key == r.path.name and same_name[key] > 1:
                raise ValueError(f"colour labels: the bare file name {key!r} matches {same_name[key]} {self.split} "
                                 f"images; give relative paths such as {rel!r} in the 'image' column")
            if key is not None:
                row = rows[key]
                r.colour = row[self.colour_column] or None
                r.extra = {k: v for k, v in row.items() if k not in (IMAGE_COLUMN, self.colour_column)}

    def column(self, i: int, name: str) -> Optional[bool]:
        """A 0/1 column of the colour CSV for image ``i`` as a bool (1/true/yes -> True, 0/false/no -> False;
        None when the image is not in the CSV or the cell is empty)."""
        if self.colour_column is None:
            raise ValueError("no colour CSV was given; pass colours=PATH")
        if name not in self.csv_columns or name in (IMAGE_COLUMN, self.colour_column):
            extra = [c for c in self.csv_columns if c not in (IMAGE_COLUMN, self.colour_column)]
            raise KeyError(f"column {name!r} is not an extra column of the colour CSV; it has {extra}")
        r = self.records[i]
        value = r.extra.get(name, "").lower()
        if value == "":
            return None
        if value in ("1", "true", "yes", "y"):
            return True
        if value in ("0", "false", "no", "n"):
            return False
        raise ValueError(f"column {name!r} of image {r.path.name!r} is {value!r}; expected 0/1, true/false or yes/no")

    # ---- access -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB (cropped to its box when ``crop`` is set)."""
        r = self.records[i]
        if not r.path.is_file():
            raise FileNotFoundError(f"image {r.path} listed by the annotations is missing")
        with Image.open(r.path) as im:
            im = im.convert("RGB")
        if self.crop and r.bbox is not None:
            x1, y1, x2, y2 = r.bbox
            im = im.crop((x1, y1, x2 + 1, y2 + 1))          # devkit boxes are inclusive
        return im

    def __getitem__(self, i: int) -> Tuple[Image.Image, str, int, Optional[str]]:
        r = self.records[i]
        return self.image(i), r.class_name, r.year, r.colour

    @property
    def years(self) -> List[int]:
        return [r.year for r in self.records]

    def fingerprint(self, indices: Optional[Sequence[int]] = None) -> str:
        """sha256 hex of what identifies the images ``indices`` (default all), in order: each one's path relative
        to the dataset folder, file size, class name, box, colour label and extra CSV columns. File sizes stand in
        for the pixels, which would take minutes to hash; a moved dataset keeps its fingerprint.

        Raises:
            FileNotFoundError: an image is missing.
        """
        rows = []
        for i in range(len(self)) if indices is None else indices:
            r = self.records[int(i)]
            try:
                size = r.path.stat().st_size
            except FileNotFoundError as e:
                raise FileNotFoundError(f"image {r.path} listed by the annotations is missing") from e
            rows.append([r.path.relative_to(self.root).as_posix(), size, r.class_name, r.bbox, r.colour,
                         sorted(r.extra.items())])
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def by_year(self) -> Dict[int, List[int]]:
        """Model year -> indices of its images, years ascending."""
        out: Dict[int, List[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(r.year, []).append(i)
        return dict(sorted(out.items()))
