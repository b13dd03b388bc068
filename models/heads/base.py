"""The head contract: what a head receives, returns, trains with and how.

mmseg's encoder-decoder asks each head for its own loss (`decode_head.loss(...)`) and
never computes one itself; segflow's `FCN` does the same: it runs the backbone and the
skip decoder once, packs their outputs into `HeadInputs`, and hands them to its head,
both for prediction (`head(inputs)`) and for training (`head.loss(inputs, targets)`).

    predict:  FCN.lowres_logits(x) -> FCN.decode(x) -> head(HeadInputs) -> logits
    train:    FCN.loss(x, targets) -> FCN.decode(x) -> head.loss(HeadInputs, targets) -> {name: loss}

A head that needs the RGB image gets it from the normalised input (`HeadInputs.rgb`),
so the engine's single call `net.lowres_logits(x)` stays the one interface.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

TRAINING_MODES = ("joint", "staged", "piecewise")
INPUTS = ("features", "logits", "rgb")


@dataclass(frozen=True)
class HeadInputs:
    """What the backbone and the decoder computed for one batch.

    image:    (N, 3, H, W) normalised images, as the engine passes them
    features: {"s8", "s16", "s32"} backbone feature maps, (N, C_s, ~H/s, ~W/s)
    logits:   (N, K, ~H/stride, ~W/stride) the decoder's fused FCN logits (the unaries)
    stride:   the decoder's output stride (32, 16 or 8)
    mean, std: the normalisation, per channel on the 0..1 scale
    """

    image: torch.Tensor
    features: dict[str, torch.Tensor]
    logits: torch.Tensor
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def rgb(self) -> torch.Tensor:
        """(N, 3, H, W) float RGB on the 0..255 scale, undoing the normalisation."""
        mean = torch.tensor(self.mean, dtype=self.image.dtype, device=self.image.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=self.image.dtype, device=self.image.device).view(1, 3, 1, 1)
        return (self.image * std + mean) * 255


class Head(nn.Module):
    """Base of every head. Subclasses set the class attributes and implement forward/loss.

    name:           its registry name
    needs:          the HeadInputs it reads, a subset of ("features", "logits", "rgb")
    training_mode:  "joint" (backbone, decoder and head learn together), "staged" (the
                    base is trained first and frozen while the head learns) or "piecewise"
                    (frozen base; each potential learns from its own local likelihood, no
                    inference in backprop)
    starts_from_base: whether `segflow train` starts from a trained base checkpoint by
                    default (the FCN head trains from scratch, as segflow train always has)
    config_type:    a frozen dataclass of the head's hyper-parameters (None: none); stored
                    in the checkpoint's architecture as "head_config"
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    training_mode: ClassVar[str]
    starts_from_base: ClassVar[bool] = True
    config_type: ClassVar[type | None] = None

    def __init__(self, num_classes: int, channels: dict[str, int], base_stride: int, config=None):
        """`channels`: the backbone's {"s8", "s16", "s32"} channel counts; `base_stride`:
        the decoder's output stride; `config`: an instance of `config_type` (or None)."""
        super().__init__()
        self.num_classes = num_classes
        self.base_stride = base_stride
        self.config = config

    @property
    def freezes_base(self) -> bool:
        """Staged and piecewise heads learn on a frozen base, and can be saved alone."""
        return self.training_mode in ("staged", "piecewise")

    def output_stride(self) -> int:
        """Stride of `forward`'s output relative to the input image."""
        return self.base_stride

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        """HeadInputs -> (N, K, ~H/output_stride, ~W/output_stride) logits."""
        raise NotImplementedError

    def loss(self, inputs: HeadInputs, targets: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> dict[str, torch.Tensor]:
        """Named loss terms for (N, H, W) int64 targets; the trainer sums them."""
        raise NotImplementedError

    @classmethod
    def config_from_dict(cls, d: dict | None):
        """The head's config from an architecture's "head_config" (refusing unknown keys)."""
        if cls.config_type is None:
            if d:
                raise ValueError(f"head {cls.name!r} takes no configuration, got {sorted(d)}")
            return None
        known = {f.name for f in dataclasses.fields(cls.config_type)}
        unknown = set(d or {}) - known
        if unknown:
            raise ValueError(f"head {cls.name!r}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls.config_type(**(d or {}))


def full_resolution_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of low-resolution logits upsampled bilinearly to the targets' size.

    The same upsampling the engine applies at inference, so training sees what it predicts.
    """
    full = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(full, targets, weight=weight, ignore_index=ignore_index)
