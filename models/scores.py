"""Confusion matrices and IoU: the score kernels that training, release and evaluation share.

They live in models/ because training selects checkpoints with them and the engine's
evaluation sums them; models/ never imports the engine, so the kernel sits below both.
Rows are ground truth, columns are predictions. A class absent from both sides has no
score (NaN), never 0 or 1.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) ground truth and prediction -> (K, K) int64 counts, ignoring void and out-of-range labels.

    Predictions must lie in [0, K): one that does not would be counted in the wrong cell.
    """
    if label.shape != pred.shape:
        raise ValueError(f"label shape {label.shape} differs from prediction shape {pred.shape}")
    label = label.ravel().astype(np.int64)
    pred = pred.ravel().astype(np.int64)
    keep = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        keep &= label != ignore_index
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        bad = pred.max() if pred.max() >= num_classes else pred.min()
        raise ValueError(f"prediction holds class {bad}, outside [0, {num_classes}); was the mask made with another label set?")
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


def pixel_accuracy(confusion: np.ndarray) -> float:
    """Correct labelled pixels / labelled pixels; NaN when nothing is labelled."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(K,) recall per class: correct pixels of class c / ground-truth pixels of c; NaN without any."""
    gt = confusion.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gt > 0, np.diag(confusion) / gt, np.nan)


def mean_class_accuracy(confusion: np.ndarray) -> float:
    """Mean of `per_class_accuracy` over the classes that occur in the ground truth."""
    acc = per_class_accuracy(confusion)
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")


def frequency_weighted_iou(confusion: np.ndarray) -> float:
    """Σ_c (ground-truth share of c) · IoU_c, as in Long et al.'s FCN paper."""
    total = confusion.sum()
    if not total:
        return float("nan")
    freq = confusion.sum(1) / total
    iou = per_class_iou(confusion)
    seen = freq > 0  # a class with ground truth always has a defined IoU
    return float((freq[seen] * iou[seen]).sum())
