"""Confusion matrices and the scores derived from them.

Every dataset-level score is computed from a summed confusion matrix, never from a mean of
per-image scores: per-image means over-weight small images and classes that barely appear.
Rows are ground truth, columns are predictions.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) ground truth and prediction -> (K, K) int64 counts, ignoring void and out-of-range labels."""
    if label.shape != pred.shape:
        raise ValueError(f"label shape {label.shape} differs from prediction shape {pred.shape}")
    label = label.ravel().astype(np.int64)
    pred = pred.ravel().astype(np.int64)
    keep = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        keep &= label != ignore_index
    return np.bincount(num_classes * label[keep] + pred[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """(K,) IoU per class; NaN where a class is absent from both ground truth and prediction."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the defined per-class IoUs (classes absent from both sides are skipped)."""
    iou = per_class_iou(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
