"""The fully connected CRF of Krähenbühl and Koltun, through pydensecrf2.

This module is a thin, exact wrapper: given the same probabilities, image and parameters,
`refine_with_crf` returns what calling pydensecrf2 by hand returns. It only makes the
inputs acceptable to the C++ code, which needs C-contiguous float32 unaries and a
writable C-contiguous uint8 RGB image (a PIL-backed array is read-only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from segflow.errors import ConfigError
from segflow.fingerprint import digest


@dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF (Krähenbühl & Koltun) parameters, as pydensecrf2 names them.

    Defaults follow DeepLab's usage with pydensecrf: a smoothness (Gaussian) kernel of
    3 px and weight 3, and an appearance (bilateral) kernel of 80 px / 13 intensity levels
    with weight 10, run for 5 mean-field iterations.
    """

    iterations: int = 5
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0

    def __post_init__(self):
        if self.iterations < 1:
            raise ConfigError(f"CRF iterations must be >= 1, got {self.iterations}; use --no-crf to skip the CRF")
        for f in fields(self):
            if f.name != "iterations" and getattr(self, f.name) <= 0:
                raise ConfigError(f"CRF parameter {f.name} must be > 0, got {getattr(self, f.name)}")

    def fingerprint(self) -> str:
        return digest({"crf": "densecrf", **asdict(self)})

    @classmethod
    def from_dict(cls, d: dict) -> "CRFParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown CRF parameters {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def refine_with_crf(rgb: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """(H, W, 3) uint8 image and (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
    return crf_probabilities(rgb, probs, params).argmax(axis=0).astype(np.uint8)


def crf_probabilities(rgb: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """(H, W, 3) uint8 image and (C, H, W) float32 probabilities -> (C, H, W) float32 mean-field Q.

    The engine upsamples Q when the CRF ran at a working size smaller than the image
    (pipeline/resize.py), so labels never get stretched by nearest neighbour.
    """
    import pydensecrf.densecrf as dcrf  # here, not at import: the driver only needs CRFParams
    from pydensecrf.utils import unary_from_softmax

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
    return q.reshape(num_classes, height, width)


class DenseCRF:
    """The `dense` refinement kind: pydensecrf2 on a CPU worker, one image at a time.

    Its fingerprint is the one segflow has always written (`CRFParams.fingerprint`, whose
    payload names it "densecrf"), so outputs made before refinement became a registry stay
    up to date.
    """

    name = "dense"
    version = 1
    runs_on = "cpu"
    params_type = CRFParams
    summary = "Krähenbühl & Koltun's fully connected CRF through pydensecrf2, on CPU workers (Chen et al.'s CNN + dense CRF)"

    def __init__(self, params: CRFParams):
        self.params = params

    def fingerprint(self) -> str:
        return self.params.fingerprint()

    def refine(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image, (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
        return refine_with_crf(rgb, probs, self.params)

    def refine_probabilities(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image, (C, H, W) float32 probabilities -> (C, H, W) float32 Q, for upsampling."""
        return crf_probabilities(rgb, probs, self.params)
