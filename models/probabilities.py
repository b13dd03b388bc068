"""Low-resolution logits -> full-resolution probabilities -> labels and confidence.

The engine's refinement stage and the release/evaluation tooling must turn logits into
masks exactly the way a network's own `forward` would, so this lives in models/ beside
the networks, and the engine imports it.
"""

from __future__ import annotations

import numpy as np


def probabilities_from_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) low-resolution logits -> (C, H, W) float32 softmax probabilities.

    The upsampling is the registry contract's: bilinear, align_corners=False, exactly
    what the network's own `forward` does. (torch is imported here, in the worker, not
    when the driver imports this module: see models/catalog.py.)
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return torch.softmax(t[0], dim=0).numpy()


def labels_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) probabilities -> (H, W) uint8 argmax and (H, W) float32 max, in one pass.

    Exactly `probs.argmax(0)` (ties go to the first class) and `probs.max(0)`, at ~40% of
    their cost: numpy's argmax along the leading axis is its slow case (4.3 vs 1.8 ms for
    11 x 360 x 480 on one core). NaN inputs and more than 256 classes take numpy's path.
    """
    if probs.shape[0] > 256:
        return probs.argmax(axis=0).astype(np.uint8), probs.max(axis=0)
    best = probs[0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        np.maximum(best, probs[c], out=best)
    if np.isnan(best).any():
        return probs.argmax(axis=0).astype(np.uint8), best
    return labels, best
