"""Test-time augmentation: average a network's logits over mirrored and rescaled copies.

Averaging happens in logit space, at the image's own resolution, before any refinement:
each augmented copy's logits are brought back (upsampled bilinearly to the input size,
exactly as a network's own `forward` does, then un-mirrored) and the mean is returned.

    none         the network alone (the engine then ships its low-resolution logits)
    flip         the image and its horizontal mirror: 2 forward passes
    flip-scales  the image and its mirror at 0.75, 1 and 1.25 of its size: 6 passes

The scales follow mmseg's usual multi-scale test set-up around the training scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "flip-scales")
SCALES = {"none": (1.0,), "flip": (1.0,), "flip-scales": (0.75, 1.0, 1.25)}


def tta_logits(lowres_logits, x: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, K, H, W) logits averaged over `mode`'s copies.

    `lowres_logits` is the network's (N, 3, h, w) -> (N, K, h/s, w/s) function.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}")
    size = x.shape[-2:]
    total, count = None, 0
    for scale in SCALES[mode]:
        xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if mode != "none" else (False,):
            inp = xs.flip(-1) if mirrored else xs
            out = F.interpolate(lowres_logits(inp), size=size, mode="bilinear", align_corners=False)
            out = out.flip(-1) if mirrored else out
            total = out.float() if total is None else total + out.float()
            count += 1
    return total / count
