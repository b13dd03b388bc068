"""The CRF-as-RNN head (Zheng et al., ICCV 2015): the FCN and a mean-field CRF layer, trained jointly.

    unary  = the FCN's fused logits, upsampled bilinearly to the working resolution
    output = MeanFieldCRF(unary, rgb): `iterations` mean-field updates of a fully connected
             CRF (models/crf/meanfield.py), whose kernel weights and K x K compatibility learn

Training is joint, as in the paper: every weight, backbone included, learns from the
cross-entropy of the CRF's output, starting from a trained FCN (the bundled model by
default). Added to the paper: an auxiliary cross-entropy on the unaries themselves
(weight `aux_weight`), which keeps the FCN a good classifier on its own while the CRF
learns to smooth it, and stops the CRF's compatibility from absorbing what the unaries
should say. The checkpoint is complete, since the base changes.

What differs from the paper, and why: CRF-RNN runs the fully connected CRF at full
resolution. On segflow's 2-core CPU that costs tens of seconds per CamVid image per
training step (the lattice backend), so the defaults run it at stride 4 (90x120 cells for
a 480x360 image; bandwidths in pixels are divided by the stride) with the "window"
backend, ConvCRF's truncation to an 11x11-cell window (44 px at full resolution); the
engine upsamples the stride-4 result bilinearly. `stride=1, backend="lattice"` is the
paper's model, for a GPU, and then `lowres_logits` returns full-resolution logits, for
which the engine's upsampling is the identity. The default kernel settings are the
bundled model's tuned dense-CRF parameters. Cost per 480x360 image with the defaults,
on this project's idle 2-core CPU (bench/structured_card.py, CamVid val): 0.21 CPU-seconds with
the FCN-8s (0.13 alone); a joint training epoch (367 images, 176x224 crops) ~35 s on 2 threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segflow.models.crf.meanfield import MeanFieldCRF, MeanFieldParams
from segflow.models.heads.base import Head, HeadInputs, full_resolution_cross_entropy


@dataclass(frozen=True)
class CRFRNNConfig:
    """iterations: mean-field updates; stride: working resolution; aux_weight: weight of the
    unaries' own cross-entropy; backend: "lattice" (fully connected) or "window" (neighbours
    within window_size cells); the kernel bandwidths are in full-resolution pixels and 0..255
    colour levels."""

    iterations: int = 5
    stride: int = 4
    aux_weight: float = 0.4
    backend: str = "window"
    window_size: int = 11
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0  # the bundled model's (v2) tuned dense-CRF values (MODEL_CARD.md)
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 5.0

    def __post_init__(self):
        if self.stride < 1 or self.aux_weight < 0:
            raise ValueError(f"CRF-RNN stride must be >= 1 and aux_weight >= 0, got {self}")


class CRFRNNHead(Head):
    """FCN unaries refined by a trainable mean-field CRF; joint training with an auxiliary unary loss."""

    name = "crfrnn"
    needs = ("logits", "rgb")
    training_mode = "joint"
    config_type = CRFRNNConfig

    def __init__(self, num_classes: int, channels: dict[str, int], base_stride: int, config: CRFRNNConfig | None = None):
        super().__init__(num_classes, channels, base_stride, config or CRFRNNConfig())
        cfg = self.config
        self.crf = MeanFieldCRF(
            num_classes,
            MeanFieldParams(
                iterations=cfg.iterations,
                gaussian_sxy=cfg.gaussian_sxy / cfg.stride,
                gaussian_compat=cfg.gaussian_compat,
                bilateral_sxy=cfg.bilateral_sxy / cfg.stride,
                bilateral_srgb=cfg.bilateral_srgb,
                bilateral_compat=cfg.bilateral_compat,
                backend=cfg.backend,
                window_size=cfg.window_size,
                downsample=1,  # the head already works at 1/stride
            ),
        )

    def output_stride(self) -> int:
        return self.config.stride

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        """(N, K, ceil(H/stride), ceil(W/stride)) mean-field scores (logits)."""
        size = tuple(math.ceil(s / self.config.stride) for s in inputs.image.shape[-2:])
        unary = F.interpolate(inputs.logits, size=size, mode="bilinear", align_corners=False)
        rgb = inputs.rgb if self.config.stride == 1 else F.interpolate(inputs.rgb, size=size, mode="area")
        return self.crf(unary, rgb.clamp(0, 255))

    def loss(self, inputs: HeadInputs, targets: torch.Tensor, weight, ignore_index: int) -> dict[str, torch.Tensor]:
        return {
            "ce": full_resolution_cross_entropy(self(inputs), targets, weight, ignore_index),
            "unary": self.config.aux_weight * full_resolution_cross_entropy(inputs.logits, targets, weight, ignore_index),
        }
