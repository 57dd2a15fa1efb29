"""PASCAL Context-59 (Mottaghi et al. 2014) from a user-supplied copy in the official / mmseg layout.

Expected files (``root`` is the ``VOC2010`` folder, or any folder holding ``VOCdevkit/VOC2010``)::

    VOCdevkit/VOC2010/JPEGImages/2008_000008.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/2008_000008.png     labels 0 = background, 1..59 classes
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt         one image id per line (5,105 for val)

``SegmentationClassContext`` is what mmsegmentation's ``tools/dataset_converters/pascal_context.py`` writes from
``trainval_merged.json``; label 255, if present, is ignored like background. The Context-59 protocol scores the
59 classes with background ignored (:data:`NO_BACKGROUND`): pass ``no_background=True`` to the evaluator.
Nothing is downloaded.

Example::

    ds = PascalContext59("data/VOCdevkit/VOC2010", split="val")
    image, label = ds[0]            # PIL RGB image, (H, W) uint8 array with values in {0..59, 255}
    ds.class_names[label.max() - 1]
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image

from ..runs import texts_fingerprint

__all__ = ["PascalContext59", "CONTEXT59_CLASSES", "NO_BACKGROUND", "find_voc2010"]

CONTEXT59_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
NO_BACKGROUND = True    # label 0 is background and is ignored; label l (1..59) is class l - 1

_LAYOUT = ("VOCdevkit/VOC2010/JPEGImages/<id>.jpg, VOCdevkit/VOC2010/SegmentationClassContext/<id>.png "
           "(labels 0 = background, 1..59 classes) and VOCdevkit/VOC2010/ImageSets/SegmentationContext/<split>.txt")


def find_voc2010(root: Union[str, Path]) -> Path:
    """The ``VOC2010`` folder under ``root`` (``root`` itself, ``root/VOC2010`` or ``root/VOCdevkit/VOC2010``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"PASCAL Context root {root} is not a folder; expected the layout {_LAYOUT}")
    for cand in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (cand / "JPEGImages").is_dir() or (cand / "SegmentationClassContext").is_dir():
            return cand
    raise FileNotFoundError(f"no VOC2010 folder (with JPEGImages/ and SegmentationClassContext/) under {root}; "
                            f"expected the layout {_LAYOUT}. Pass the folder that holds VOCdevkit, or VOC2010 itself")


class PascalContext59:
    """``ds[i]`` -> (PIL RGB image, label (H, W) uint8 with 0 = background, 1..59 classes, 255 = unlabelled).

    Args:
        root: the ``VOC2010`` folder or a folder above it (see :func:`find_voc2010`).
        split: name of the id list in ``ImageSets/SegmentationContext`` ("val": 5,105 images; "train").

    Attributes:
        class_names: the 59 class names; label ``l`` >= 1 is ``class_names[l - 1]``.
        no_background: True (the Context-59 protocol ignores label 0).
        ids: image ids in file order.
    """

    class_names: Tuple[str, ...] = CONTEXT59_CLASSES
    no_background: bool = NO_BACKGROUND

    def __init__(self, root: Union[str, Path], split: str = "val"):
        self.voc = find_voc2010(root)
        self.split = split
        listing = self.voc / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"missing split file {listing}; expected the layout {_LAYOUT}")
        self.ids: List[str] = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
        if not self.ids:
            raise ValueError(f"split file {listing} lists no image ids; expected one id (e.g. 2008_000008) per line")
        for sub in ("JPEGImages", "SegmentationClassContext"):
            if not (self.voc / sub).is_dir():
                raise FileNotFoundError(f"missing folder {self.voc / sub}; expected the layout {_LAYOUT}")
        first = self.ids[0]
        for path in (self._image_path(first), self._label_path(first)):
            if not path.is_file():
                raise FileNotFoundError(f"{path} (the first id of {listing}) is missing; expected the layout {_LAYOUT}")

    def identity(self) -> dict:
        """What selects these images and labels (JSON-able), for run keys: a resumed evaluation refuses another
        copy, split or id list.

        Returns:
            ``{"type", "voc": the resolved VOC2010 folder, "split", "ids": sha256 of the id list}``.
        """
        return {"type": "PascalContext59", "voc": str(self.voc.resolve()), "split": self.split,
                "ids": texts_fingerprint(self.ids)}

    def _image_path(self, i: str) -> Path:
        return self.voc / "JPEGImages" / f"{i}.jpg"

    def _label_path(self, i: str) -> Path:
        return self.voc / "SegmentationClassContext" / f"{i}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[Image.Image, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        i = self.ids[index]
        img_path, lab_path = self._image_path(i), self._label_path(i)
        for path in (img_path, lab_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (listed in {self.split}.txt); "
                                        f"expected the layout {_LAYOUT}")
        image = Image.open(img_path).convert("RGB")
        with Image.open(lab_path) as lab:
            if lab.mode not in ("L", "P"):
                raise ValueError(f"{lab_path} has mode {lab.mode}; expected a single-channel label PNG (mode L or P) "
                                 "with values 0..59, as mmsegmentation's converter writes")
            label = np.array(lab, dtype=np.uint8)
        if label.shape != (image.height, image.width):
            raise ValueError(f"{lab_path} is {label.shape[1]}x{label.shape[0]} but {img_path} is "
                             f"{image.width}x{image.height}; the label must match its image")
        bad = label[(label > len(self.class_names)) & (label != 255)]
        if bad.size:
            raise ValueError(f"{lab_path} holds label {int(bad[0])}; Context-59 labels are 0..59 (255 ignored). "
                             "Is this the 459-class full annotation? Convert it with mmsegmentation's script")
        return image, label

    def __iter__(self):
        return (self[i] for i in range(len(self)))
