"""The mean-field CRF's settings, apart from the layer so that reading them costs no torch import.

The driver validates and fingerprints a job's refinement before any model actor starts,
and it never imports torch (about 3 CPU-seconds at start-up on a small machine).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from segflow.errors import ConfigError
from segflow.models.crf.dense import CRFParams

BACKENDS = ("lattice", "window")


@dataclass(frozen=True)
class MeanFieldParams:
    """Mean-field CRF settings: pydensecrf2's names and units, plus the backend.

    The kernel defaults are `CRFParams`' (DeepLab's). The default backend is "lattice"
    because it is the model the pipeline already runs: the same numbers give the same masks
    as pydensecrf2 (>= 99% of CamVid pixels), whereas "window" with an 80 px bilateral
    bandwidth truncates it to window_size * downsample pixels, a different CRF. Choose
    "window" for speed on a GPU, where its few dense passes beat the lattice's gathers,
    knowing that it changes the masks.
    """

    # The kernels' defaults are the dense CRF's, written once there.
    iterations: int = CRFParams.iterations
    gaussian_sxy: float = CRFParams.gaussian_sxy
    gaussian_compat: float = CRFParams.gaussian_compat
    bilateral_sxy: float = CRFParams.bilateral_sxy
    bilateral_srgb: float = CRFParams.bilateral_srgb
    bilateral_compat: float = CRFParams.bilateral_compat
    backend: str = "lattice"
    window_size: int = 11  # "window" only: neighbours within window_size // 2 (pooled) pixels
    downsample: int = 4  # "window" only: messages computed at 1/downsample resolution

    def __post_init__(self):
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"mean-field iterations must be an int >= 1, got {self.iterations!r}; set iterations=5 (pydensecrf's usual)")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"mean-field {name} is a bandwidth and must be > 0, got {getattr(self, name)!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"mean-field {name} is a kernel weight and must be >= 0, got {getattr(self, name)!r}; 0 switches the kernel off")
        if self.backend not in BACKENDS:
            raise ConfigError(f"mean-field backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1 or self.window_size % 2 == 0:
            raise ConfigError(f"mean-field window_size must be an odd int >= 1 (centred on the pixel), got {self.window_size!r}; try 11")
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ConfigError(f"mean-field downsample must be an int >= 1, got {self.downsample!r}; 1 keeps full resolution")

    @classmethod
    def from_crf_params(cls, crf, **overrides) -> "MeanFieldParams":
        """The same CRF as a `CRFParams` (models/crf/dense.py), plus backend settings."""
        shared = {f.name: getattr(crf, f.name) for f in fields(crf)}
        return cls(**{**shared, **overrides})
