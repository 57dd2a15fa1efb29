"""Segmentation scores from confusion matrices: mIoU / pixAcc / mAcc with an ignore index and the PASCAL
Context-59 "no background" convention, and a paired bootstrap over images."""
from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["ConfusionMatrix", "class_iou", "miou_from_matrices", "bootstrap_miou"]


class ConfusionMatrix:
    """Dataset-level confusion matrix for semantic segmentation (rows: ground truth, columns: prediction).

    Args:
        num_classes: K predicted classes (0..K-1).
        ignore_index: label value never scored (255 as in mmsegmentation).
        no_background: the PASCAL Context-59 convention: raw label 0 (background) is ignored and raw label l >= 1 is
            class l - 1 (mmsegmentation's ``reduce_zero_label``).

    Attributes:
        matrix: (K, K) int64 pixel counts.

    ``summary()`` gives pixAcc = sum(diag) / labelled pixels, per-class IoU = diag / (row + column - diag) and mIoU
    = the mean IoU over classes whose union is non-empty (classes neither present nor predicted are skipped, as
    mmsegmentation's nanmean does), plus mAcc (mean per-class recall over classes present).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, no_background: bool = False):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.no_background = bool(no_background)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reduce(self, label: np.ndarray) -> np.ndarray:
        """Raw labels (H, W) -> class indices (H, W) int64, ignored pixels set to ``ignore_index``."""
        lab = np.asarray(label).astype(np.int64)
        if self.no_background:
            lab = np.where((lab == 0) | (lab == self.ignore_index), self.ignore_index, lab - 1)
        return lab

    def update(self, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
        """Add one image.

        Args:
            pred: (H, W) class indices.
            label: (H, W) raw labels.

        Returns:
            The image's own (K, K) int64 confusion matrix.
        """
        pred, lab = np.asarray(pred).astype(np.int64), self.reduce(label)
        if pred.shape != lab.shape:
            raise ValueError(f"prediction {pred.shape} and label {lab.shape} differ in size")
        valid = lab != self.ignore_index
        bad = lab[valid & ((lab < 0) | (lab >= self.num_classes))]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside 0..{self.num_classes - 1} (after the no-background "
                             f"shift: {self.no_background}); set ignore_index or num_classes accordingly")
        if pred[valid].size and (pred[valid].min() < 0 or pred[valid].max() >= self.num_classes):
            raise ValueError(f"predictions must be class indices in 0..{self.num_classes - 1}")
        K = self.num_classes
        image = np.bincount(lab[valid] * K + pred[valid], minlength=K * K).reshape(K, K)
        self.matrix += image
        return image

    def summary(self) -> Dict[str, object]:
        """``{"miou", "pixacc", "macc", "iou": per-class list (None where the union is empty), "pixels"}``."""
        m = self.matrix.astype(np.float64)
        diag, gt = np.diag(m), m.sum(axis=1)
        iou = class_iou(m)
        acc = np.where(gt > 0, diag / np.maximum(gt, 1), np.nan)
        total = m.sum()
        return {"miou": float(miou_from_matrices(m)),
                "pixacc": float(diag.sum() / total) if total else float("nan"),
                "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
                "iou": [None if np.isnan(v) else float(v) for v in iou], "pixels": int(total)}


def class_iou(m: np.ndarray) -> np.ndarray:
    """Per-class IoU of confusion matrices (..., K, K), shape (..., K); NaN where the union is empty."""
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(axis=-1) + m.sum(axis=-2) - diag
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, diag / np.where(union > 0, union, 1), np.nan)


def miou_from_matrices(m: np.ndarray) -> np.ndarray:
    """mIoU of confusion matrices (..., K, K): the mean IoU over classes with a non-empty union; shape (...)."""
    iou = class_iou(np.asarray(m, dtype=np.float64))
    valid = ~np.isnan(iou)
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(-1), np.where(valid, iou, 0).sum(-1) / np.maximum(valid.sum(-1), 1), np.nan)


def bootstrap_miou(per_image: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """mIoU of bootstrap resamples of the images.

    The same ``seed`` draws the same resamples, so two methods' arrays are paired (compare them elementwise for a
    paired bootstrap).

    Args:
        per_image: (N, K, K) each image's confusion matrix (:func:`.evaluation.evaluate` with ``per_image=True``).
        n_boot: resamples.
        seed: their seed.

    Returns:
        (n_boot,) float64.
    """
    per_image = np.asarray(per_image)
    N, K = per_image.shape[0], per_image.shape[-1]
    idx = np.random.default_rng(seed).integers(0, N, size=(n_boot, N))
    weights = np.stack([np.bincount(row, minlength=N) for row in idx]).astype(np.float64)   # (n_boot, N)
    return miou_from_matrices((weights @ per_image.reshape(N, K * K).astype(np.float64)).reshape(n_boot, K, K))
