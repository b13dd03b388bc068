"""Boundary pixels, tolerance by disk dilation, boundary F-score counts, and the trimap band.

Definitions every boundary score in segflow uses (numpy only, no scipy):

- **Labelled pixel**: a pixel whose ground truth is a real class (not void / ignore). The
  caller passes this as the `(H, W) bool` mask `valid`.
- **Boundary pixel** of a label map M: a labelled pixel p that has at least one labelled
  4-neighbour q (up, down, left, right) with M[q] != M[p]. The boundary of class c is the
  boundary pixels with M[p] == c, i.e. the inner edge of the class-c region, so a change of
  class between two pixels makes both of them boundary pixels (one for each class).
  Void never creates a boundary: a class next to void, or a void hole inside a class, has no
  boundary there, because we cannot know where the true edge lies. The prediction is judged
  on the same labelled pixels (the ground truth's void is removed from it too), so a predicted
  edge that runs inside void is neither rewarded nor punished. The image border is not a
  boundary either.
- **Within tolerance d** (pixels): at Euclidean distance <= d from some pixel of the other
  set, i.e. inside that set dilated by the disk {(dy, dx): dy² + dx² <= d²}. d = 0 means the
  same pixel; d = 1 the pixel and its 4-neighbours; d = 2 a 13-pixel disk (diagonal
  neighbours at distance √2 are within 2 but not within 1).

The boundary F-score follows Csurka et al. 2013 ("What is a good evaluation measure for
semantic segmentation?", BMVC): per class, precision = predicted boundary pixels within d of a
ground-truth boundary pixel of that class / predicted boundary pixels; recall = ground-truth
boundary pixels within d of a predicted one / ground-truth boundary pixels. We return the
four counts rather than the ratios so that a dataset's score is computed from summed counts.
"""

from __future__ import annotations

from math import isqrt

import numpy as np

# Rows of the (4, K) array that `boundary_counts` returns.
PRED, PRED_MATCHED, GT, GT_MATCHED = range(4)
COUNT_NAMES = ("pred", "pred_matched", "gt", "gt_matched")


def boundary_map(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) int labels and (H, W) bool labelled mask -> (H, W) bool boundary pixels.

    A pixel is on the boundary when it is labelled and a labelled 4-neighbour has another
    label (see the module docstring for why void and the image border do not count).
    """
    if labels.shape != valid.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and valid mask {valid.shape} must be the same (H, W) shape")
    out = np.zeros(labels.shape, dtype=bool)
    across = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]  # (H, W-1) left|right pairs
    out[:, 1:] |= across
    out[:, :-1] |= across
    down = (labels[1:, :] != labels[:-1, :]) & valid[1:, :] & valid[:-1, :]  # (H-1, W) upper|lower pairs
    out[1:, :] |= down
    out[:-1, :] |= down
    return out


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: True within Euclidean distance `radius` pixels of a True pixel.

    Works on the bounding box of the True pixels (grown by `radius`), so sparse masks such as
    one class's boundary cost little on a large image. The disk is decomposed into one
    horizontal run per row offset dy (half-width isqrt(r² - dy²)); each run is a sliding-window
    OR done with a prefix sum, so the cost is O((2r + 1) · area) whatever the radius.
    """
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0 pixels, got {radius}")
    mask = np.asarray(mask, dtype=bool)
    if radius == 0 or not mask.any():
        return mask.copy()
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, height)
    c0, c1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, width)
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = _dilate_dense(mask[r0:r1, c0:c1], radius)
    return out


def _dilate_dense(mask: np.ndarray, radius: int) -> np.ndarray:
    height, width = mask.shape
    prefix = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, out=prefix[:, 1:])
    x = np.arange(width)
    runs: dict[int, np.ndarray] = {}
    out = np.zeros_like(mask)
    for dy in range(-min(radius, height - 1), min(radius, height - 1) + 1):
        half = isqrt(radius * radius - dy * dy)
        if half not in runs:
            lo, hi = np.clip(x - half, 0, width), np.clip(x + half + 1, 0, width)
            runs[half] = (prefix[:, hi] - prefix[:, lo]) > 0  # any True in [x - half, x + half]
        run = runs[half]
        # out[y] is reached from a source in row y + dy.
        if dy >= 0:
            out[: height - dy] |= run[dy:]
        else:
            out[-dy:] |= run[: height + dy]
    return out


def boundary_counts(label: np.ndarray, pred: np.ndarray, valid: np.ndarray, num_classes: int, tolerance: int) -> np.ndarray:
    """(H, W) ground truth, prediction and labelled mask -> (4, K) int64 boundary counts.

    Rows, indexed by PRED, PRED_MATCHED, GT, GT_MATCHED: predicted boundary pixels of each
    class, those within `tolerance` px of a ground-truth boundary pixel of the same class,
    ground-truth boundary pixels, and those within `tolerance` px of a predicted one.
    Sum these over images, then call `metrics.boundary_f1` on the sums.
    """
    if tolerance < 0:
        raise ValueError(f"boundary tolerance must be >= 0 pixels, got {tolerance}")
    counts = np.zeros((4, num_classes), dtype=np.int64)
    gt_edge = boundary_map(label, valid)
    pred_edge = boundary_map(pred, valid)
    gt_classes = label[gt_edge].astype(np.int64)
    pred_classes = pred[pred_edge].astype(np.int64)
    counts[GT] = np.bincount(gt_classes, minlength=num_classes)[:num_classes]
    counts[PRED] = np.bincount(pred_classes, minlength=num_classes)[:num_classes]
    for c in np.flatnonzero((counts[GT] > 0) & (counts[PRED] > 0)):
        gt_c = gt_edge & (label == c)
        pred_c = pred_edge & (pred == c)
        counts[PRED_MATCHED, c] = np.count_nonzero(pred_c & dilate_disk(gt_c, tolerance))
        counts[GT_MATCHED, c] = np.count_nonzero(gt_c & dilate_disk(pred_c, tolerance))
    return counts


def trimap_band(label: np.ndarray, valid: np.ndarray, width: int) -> np.ndarray:
    """(H, W) ground truth and labelled mask -> (H, W) bool band around ground-truth boundaries.

    The band is every labelled pixel within `width` px (Euclidean) of a ground-truth boundary
    pixel, as in DeepLab's trimap experiment that showed where the CRF helps: the boundary
    pixels on both sides of an edge are included, so across one edge the band is 2·width + 2
    pixels wide. width = 0 keeps just the boundary pixels.
    """
    if width < 0:
        raise ValueError(f"trimap width must be >= 0 pixels, got {width}")
    return dilate_disk(boundary_map(label, valid), width) & valid
