"""The fully connected CRF of Krähenbühl and Koltun, through pydensecrf2.

This module is a thin, exact wrapper: given the same probabilities, image and parameters,
`refine_with_crf` returns what calling pydensecrf2 by hand returns. It only makes the
inputs acceptable to the C++ code, which needs C-contiguous float32 unaries and a
writable C-contiguous uint8 RGB image (a PIL-backed array is read-only).
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from pipeline.config import CRFParams


def refine_with_crf(rgb: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """(H, W, 3) uint8 image and (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
    num_classes, height, width = probs.shape
    if rgb.shape[:2] != (height, width):
        raise ValueError(f"image is {rgb.shape[:2]} but probabilities are {(height, width)}")
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(rgb, dtype=np.uint8, requirements=["C", "W"]),
        compat=params.bilateral_compat,
    )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return q.argmax(axis=0).reshape(height, width).astype(np.uint8)
