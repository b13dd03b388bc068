"""segflow's classic FCN (Long, Shelhamer and Darrell): FCN-32s, FCN-16s and FCN-8s, plus a head.

A ResNet or MobileNet backbone yields features at strides 8, 16 and 32. Each gets a 1x1 score
head; the coarse scores are upsampled 2x by a learned transposed convolution (initialised
to bilinear interpolation, as in the paper) and summed with the finer ones. The fused map
is returned at the finest fused stride (32, 16 or 8) by `lowres_logits`, and `forward`
upsamples it bilinearly to exactly the input size.

Why the last upsampling is a fixed bilinear one rather than a learned 8x deconvolution:
it lets the engine ship the small stride-8 logits between processes and upsample them
where the CRF runs, getting masks identical to a full-resolution forward.

The network is backbone (`features`) -> decoder (the score layers and 2x deconvolutions,
top-level attributes so that checkpoints written before heads existed keep their keys)
-> head (`head`, from `segflow.models.heads`). The default `fcn` head is the identity on
the decoder's logits and has no parameters; other heads add keys under "head.". A head
trained on a frozen base (`freeze_base`) is saved alone (`head_state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segflow.models.catalog import BACKBONES, VARIANTS  # noqa: E402,F401 - the names live where the driver can read them without torch
from segflow.models.heads import DEFAULT_HEAD, head_class
from segflow.models.heads.base import HeadInputs
from segflow.models.resnet import LAYOUTS, StridedFeatures, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_fcn(
    variant: str,
    backbone: str,
    num_classes: int,
    backbone_weights: str | None = None,
    head: str = DEFAULT_HEAD,
    head_config: dict | None = None,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> "FCN":
    """Build FCN-`variant` ("fcn8s", "fcn16s", "fcn32s") on `backbone` with fresh score layers and `head`.

    `backbone_weights` is a torchvision weights name for the backbone (e.g. "DEFAULT" for
    ImageNet); it downloads through the torch hub cache, so it is None offline.
    `normalization` (mean, std on the 0..1 scale) lets heads that need the RGB image
    recover it from the normalised input.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown FCN variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return FCN(_strided_features(backbone, backbone_weights), num_classes, VARIANTS[variant], head, head_config, normalization)


class FCN(nn.Module):
    """Fully convolutional network with skip connections and a head; any input size in, same size out."""

    def __init__(
        self,
        features: nn.Module,
        num_classes: int,
        output_stride: int,
        head: str = DEFAULT_HEAD,
        head_config: dict | None = None,
        normalization: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD),
    ):
        super().__init__()
        self.features = features
        self.output_stride = output_stride
        self.mean, self.std = (tuple(float(v) for v in normalization[0]), tuple(float(v) for v in normalization[1]))
        self.base_frozen = False
        channels = _probe_channels(features)
        self.score32 = nn.Conv2d(channels["s32"], num_classes, 1)
        if output_stride <= 16:
            self.score16 = nn.Conv2d(channels["s16"], num_classes, 1)
            self.up32 = _bilinear_deconv(num_classes)
        if output_stride <= 8:
            self.score8 = nn.Conv2d(channels["s8"], num_classes, 1)
            self.up16 = _bilinear_deconv(num_classes)
        cls = head_class(head)
        self.head = cls(num_classes, channels, output_stride, cls.config_from_dict(head_config))

    def decode(self, x: torch.Tensor) -> HeadInputs:
        """Backbone and decoder: (N, 3, H, W) normalised images -> the head's inputs.

        On a frozen base no autograd graph is kept for them: only the head learns.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.base_frozen):
            feats = self.features(x)
            score = self.score32(feats["s32"])
            if self.output_stride <= 16:
                score = _crop_to(self.up32(score), feats["s16"]) + self.score16(feats["s16"])
            if self.output_stride <= 8:
                score = _crop_to(self.up16(score), feats["s8"]) + self.score8(feats["s8"])
        return HeadInputs(x, feats, score, self.output_stride, self.mean, self.std)

    def lowres_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, ~H/s, ~W/s) logits, s = `head.output_stride()`.

        With the `fcn` head this is the decoder's fused stride-`output_stride` logits.
        """
        return self.head(self.decode(x))

    def loss(self, x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> dict[str, torch.Tensor]:
        """The head's named loss terms for a batch, prefixed "head." (mmseg's add_prefix)."""
        return {f"head.{k}": v for k, v in self.head.loss(self.decode(x), targets, weight, ignore_index).items()}

    def freeze_base(self) -> "FCN":
        """Stop the backbone and decoder learning: no gradients, and BatchNorm statistics stay in eval mode."""
        self.base_frozen = True
        for name, p in self.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "FCN":
        super().train(mode)
        if self.base_frozen:
            for name, child in self.named_children():
                if name != "head":
                    child.eval()
        return self

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The head's own weights, keyed as in the full state_dict ("head.*"): a head-only checkpoint."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("head.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H, W) logits."""
        return F.interpolate(self.lowres_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _strided_features(backbone: str, weights: str | None) -> nn.Module:
    """A module returning {"s8", "s16", "s32"} feature maps of a classifier.

    ResNets without ImageNet weights (every network the engine loads from a checkpoint) are
    segflow's copy of torchvision's (models/resnet.py: no torchvision import in the actors).
    """
    if backbone in LAYOUTS:
        if weights is None:
            net = resnet(backbone)
        else:
            from torchvision import models as tvm

            net = getattr(tvm, backbone)(weights=weights)
        return StridedFeatures(net, {"layer2": "s8", "layer3": "s16", "layer4": "s32"})
    if backbone == "mobilenet_v3_large":
        from torchvision import models as tvm

        net = tvm.mobilenet_v3_large(weights=weights).features
        # Blocks 4, 7 and 13 downsample to strides 8, 16 and 32, so the stage outputs are
        # the blocks just before the next downsampling, and the last block.
        return StridedFeatures(net, {"6": "s8", "12": "s16", "16": "s32"})
    raise ValueError(f"unknown FCN backbone {backbone!r}; choose one of {list(BACKBONES)}")


def _probe_channels(features: nn.Module) -> dict[str, int]:
    """Channel count of each stage, read off a tiny forward pass (works for any backbone)."""
    was_training = features.training
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, 3, 64, 64))
    features.train(was_training)
    return {name: t.shape[1] for name, t in out.items()}


def _bilinear_deconv(channels: int) -> nn.ConvTranspose2d:
    """A 2x learned upsampling, initialised to bilinear interpolation per channel."""
    deconv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1, bias=False)
    factor = 2
    center = factor - 0.5
    og = torch.arange(4, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    kernel = filt1d[:, None] * filt1d[None, :]
    with torch.no_grad():
        deconv.weight.zero_()
        for c in range(channels):
            deconv.weight[c, c] = kernel
    return deconv


def _crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop an upsampled map to a skip feature's size (odd sizes round up on the way down)."""
    return x[..., : like.shape[-2], : like.shape[-1]]
