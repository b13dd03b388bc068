"""The Deep Parsing Network head (Liu, Li, Luo, Loy and Tang, ICCV 2015) on segflow's FCN.

DPN approximates one mean-field update of an MRF with feed-forward layers:

    unary:      p = softmax(FCN logits), upsampled to the working resolution
    triple penalty (the paper's b12, a local convolution):
                T(j, v) = sum_{z in W(j)} a(j, z) p(z, v) / sum_{z in W(j)} a(j, z),
                a(j, z) = exp(-|I_j - I_z|^2 / (2 sigma^2))
                a window W(j) around each pixel, weighted by how alike pixels j and z look
    mixture of label contexts (b13, b14):
                S_m(i, u) = sum_{offset o, label v} mu_m(o, u, v) T(i + o, v)  (a convolution with
                K x M output maps), S(i, u) = min_m S_m(i, u)  (min pooling over the M components)
    combination (b15):
                q(i, u) = exp(log p(i, u) - S(i, u)) / sum_u' exp(log p(i, u') - S(i, u'))

`forward` returns log q, which are logits (softmax(log q) = q).

What changed from the paper, and why:
- working resolution: DPN ran these layers on its full 512x512 label map with a 50x50
  window. Here they run at stride 4 (90x120 for a 480x360 image) with an 11x11 window,
  about 44 px at full resolution, close to the paper's 50 px: at stride 1 the window
  alone costs 2,500 multiply-adds per pixel and class and holds ~2 GB of unfolded
  probabilities per CamVid image, which 2 CPU cores cannot afford. The head's output is
  therefore at stride 4 (`output_stride`); the engine upsamples it bilinearly like the
  FCN's stride-8 logits.
- the pair weight a(j, z) uses colour only, inside a box window, and is normalised over
  the window so T stays a probability map; the colour bandwidth sigma (0..255 scale) is
  learned (through its logarithm). DPN's d(j, z) also mixed in spatial distance.
- the context filters are initialised to a Potts model (`potts_init`, 6): each component's
  penalty of class u is -6 T(i, u), so an untrained head is one mean-field step of a CRF
  with DPN's appearance kernel, and staged training starts above the base model and learns
  the label contexts from there (as CRF-as-RNN initialises its compatibility to Potts).
  Measured on every 4th CamVid val image with the bundled v2 FCN, untrained: 62.09 mIoU at
  0 (the FCN itself), 62.97 at 3, 63.00 at 6, 63.17 at 6 with sigma 15 (the default). The
  first head, trained from near-zero filters on v1, gained 0.32 mIoU in 8 epochs.
- training is staged (the paper's incremental scheme, first two stages): the FCN is the
  trained and frozen unary; the MRF layers learn with the cross-entropy of q.

Cost per 480x360 image on this project's idle 2-core CPU (bench/structured_card.py, CamVid
val): 0.29 CPU-seconds with the FCN-8s (0.13 alone); a staged training epoch (367 images,
176x224 crops) ~14 s on 2 threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segflow.models.heads.base import Head, HeadInputs, full_resolution_cross_entropy


@dataclass(frozen=True)
class DPNConfig:
    """stride: working resolution (input pixels per label-map cell); window: triple-penalty
    window side in working cells (odd); components: M, label-context mixture components;
    context_kernel: side of the label-context filters (odd); sigma: initial colour bandwidth."""

    stride: int = 4
    window: int = 11
    components: int = 5
    context_kernel: int = 9
    sigma: float = 15.0
    potts_init: float = 6.0  # initial label context: a penalty of -potts_init * T(i, u) on a pixel's own class

    def __post_init__(self):
        if self.window % 2 == 0 or self.context_kernel % 2 == 0:
            raise ValueError(f"DPN window ({self.window}) and context kernel ({self.context_kernel}) must be odd")
        if self.stride < 1 or self.components < 1 or self.sigma <= 0 or self.potts_init < 0:
            raise ValueError(f"DPN stride, components and sigma must be positive, got {self}")


class DPNHead(Head):
    """Triple penalty + mixture of label contexts + combination, on the FCN's probabilities."""

    name = "dpn"
    needs = ("logits", "rgb")
    training_mode = "staged"
    config_type = DPNConfig

    def __init__(self, num_classes: int, channels: dict[str, int], base_stride: int, config: DPNConfig | None = None):
        super().__init__(num_classes, channels, base_stride, config or DPNConfig())
        cfg = self.config
        self.log_sigma = nn.Parameter(torch.tensor(math.log(cfg.sigma)))
        self.context = nn.Conv2d(num_classes, num_classes * cfg.components, cfg.context_kernel, padding=cfg.context_kernel // 2)
        with torch.no_grad():
            self.context.weight.normal_(0.0, 1e-3)  # small noise: the components start apart
            self.context.bias.zero_()
            # Potts: every component rewards the pixel's own class by potts_init times its
            # appearance-smoothed probability, i.e. one mean-field step of a CRF with an
            # appearance kernel, which training then generalises to label contexts.
            centre = cfg.context_kernel // 2
            for u in range(num_classes):
                self.context.weight[u * cfg.components : (u + 1) * cfg.components, u, centre, centre] -= cfg.potts_init

    def output_stride(self) -> int:
        return self.config.stride

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        """(N, K, ceil(H/stride), ceil(W/stride)) log-probabilities q."""
        h, w = (math.ceil(s / self.config.stride) for s in inputs.image.shape[-2:])
        log_p = F.log_softmax(F.interpolate(inputs.logits, size=(h, w), mode="bilinear", align_corners=False), dim=1)
        rgb = F.interpolate(inputs.rgb, size=(h, w), mode="area")
        smoothed = triple_penalty(log_p.exp(), rgb, self.config.window, self.log_sigma.exp())
        n, k = log_p.shape[:2]
        penalty = self.context(smoothed).view(n, k, self.config.components, h, w).amin(dim=2)
        return F.log_softmax(log_p - penalty, dim=1)

    def loss(self, inputs: HeadInputs, targets: torch.Tensor, weight, ignore_index: int) -> dict[str, torch.Tensor]:
        return {"ce": full_resolution_cross_entropy(self(inputs), targets, weight, ignore_index)}


def triple_penalty(probs: torch.Tensor, rgb: torch.Tensor, window: int, sigma: torch.Tensor | float) -> torch.Tensor:
    """DPN's local convolution: appearance-weighted window average of label probabilities.

    probs (N, K, h, w), rgb (N, 3, h, w) on the 0..255 scale, an odd `window`, and the colour
    bandwidth `sigma` -> (N, K, h, w) with T(j, v) = sum_z a(j, z) p(z, v) / sum_z a(j, z)
    over the window positions z inside the image, a(j, z) = exp(-|I_j - I_z|^2 / (2 sigma^2)).
    Each pixel's filter is its own (it depends on its colour), hence unfold, not conv2d.
    """
    n, k, h, w = probs.shape
    r = window // 2
    cells = h * w
    neighbours = F.unfold(rgb, window, padding=r).view(n, 3, window * window, cells)
    dist2 = (neighbours - rgb.reshape(n, 3, 1, cells)).pow(2).sum(1)  # (N, window^2, h*w)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=probs.dtype, device=probs.device), window, padding=r)  # zero padding is outside
    affinity = torch.exp(-dist2 / (2 * sigma**2)) * inside
    neighbour_probs = F.unfold(probs, window, padding=r).view(n, k, window * window, cells)
    total = torch.einsum("nkwl,nwl->nkl", neighbour_probs, affinity)
    return (total / affinity.sum(1, keepdim=True)).view(n, k, h, w)
