"""ImageNet-Segmentation (Guillaumin et al., 4,276 images with binary masks) from a user-supplied
``gtsegs_ijcv.mat``: the file TextSpan and the second-order-neuron papers evaluate on (docs/methods.md §2).

The file is MATLAB v7.3, i.e. HDF5: ``value/img`` and ``value/gt`` are (N, 1) arrays of object references;
each image is stored (3, W, H) uint8 and each mask (W, H), both transposed by MATLAB's column-major layout.
Reading it needs ``h5py`` (``pip install h5py``); nothing is downloaded.

Images and masks get the same geometry: resize the short side to ``size`` (bicubic for images, nearest for
masks), then centre-crop ``size`` x ``size``. ``legacy=True`` reproduces the reference code's misalignment
(masks resized straight to ``size`` x ``size`` without the crop the images get), for comparison only.

Example::

    images, masks = load_imagenet_segmentation("gtsegs_ijcv.mat", n=100)   # (100, 224, 224, 3) uint8, bool
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image

__all__ = ["ImageNetSegmentation", "load_imagenet_segmentation", "resize_centre_crop"]


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading gtsegs_ijcv.mat (MATLAB v7.3 = HDF5) needs h5py: pip install h5py") from err
    return h5py


def resize_centre_crop(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize the short side to ``size`` then centre-crop to ``size`` x ``size`` (H, W[, C])."""
    h, w = arr.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(arr.astype(np.uint8) if arr.dtype == bool else arr)
    out = np.asarray(pil.resize((nw, nh), Image.NEAREST if nearest else Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[top:top + size, left:left + size]


class ImageNetSegmentation:
    """Lazy reader: ``ds[i]`` -> (image (size, size, 3) uint8, mask (size, size) bool).

    Args:
        path: ``gtsegs_ijcv.mat``.
        size: output side (224 for scenes-rn / RN50).
        legacy: resize masks without the centre crop (the reference code's misalignment).
    """

    def __init__(self, path: str, size: int = 224, legacy: bool = False):
        h5py = _h5py()
        self.file = h5py.File(path, "r")
        try:
            self.img_refs, self.gt_refs = self.file["value/img"], self.file["value/gt"]
        except KeyError as err:
            self.file.close()
            raise ValueError(f"{path} has no value/img and value/gt datasets; expected ImageNet-Segmentation's "
                             "gtsegs_ijcv.mat (MATLAB v7.3)") from err
        self.size, self.legacy = int(size), bool(legacy)

    def __len__(self) -> int:
        return len(self.img_refs)

    def raw(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """The stored image (H, W, 3) uint8 (a grey one, stored (W, H), repeated over 3 channels) and mask (H, W)
        bool, untransformed."""
        img = np.array(self.file[self.img_refs[i, 0]])
        gt = np.array(self.file[self.gt_refs[i, 0]]).transpose(1, 0)
        img = img.T if img.ndim == 2 else img.transpose(2, 1, 0)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        return img.astype(np.uint8), gt > 0

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        img, gt = self.raw(i)
        image = resize_centre_crop(img, self.size)
        if self.legacy:
            mask = np.asarray(Image.fromarray(gt.astype(np.uint8)).resize((self.size, self.size), Image.NEAREST))
        else:
            mask = resize_centre_crop(gt.astype(np.uint8), self.size, nearest=True)
        return image, mask > 0

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        self.file.close()


def load_imagenet_segmentation(path: str, n: Optional[int] = None, size: int = 224, legacy: bool = False,
                               progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (all by default) images (N, size, size, 3) uint8 and masks (N, size, size) bool
    (``progress``: a tqdm bar; see :class:`ImageNetSegmentation` for the geometry)."""
    from tqdm.auto import tqdm
    ds = ImageNetSegmentation(path, size=size, legacy=legacy)
    try:
        count = len(ds) if n is None else min(n, len(ds))
        pairs = [ds[i] for i in tqdm(range(count), desc="ImageNet-Segmentation", unit="image", disable=not progress)]
    finally:
        ds.close()
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
