"""A trainable, batched mean-field CRF layer in torch (CRF-as-RNN), on the CPU or a GPU.

The dense CRF of models/crf/dense.py (pydensecrf2) runs on one CPU core, image by image, and
cannot be trained. `MeanFieldCRF` runs the same mean-field inference as torch operations,
on a batch, on whatever device its inputs are on, with gradients to its unaries and to its
own parameters (Zheng et al. 2015, CRF-as-RNN; Schwing & Urtasun 2015). Each iteration:

    Q        = softmax(scores)                                  (scores = unaries at first)
    m_g, m_b = gaussian(Q), bilateral(Q)                        message passing, normalised
    m[l']    = w_g[l'] * m_g[l'] + w_b[l'] * m_b[l']            per-class kernel weights
    pairwise = mu @ m          (mu: K x K, pairwise[l] = sum_l' mu[l, l'] m[l'])
    scores   = unaries - pairwise

Correspondence with pydensecrf2 (models/crf/dense.py), exact up to float rounding and the
lattice's own approximation:
- unaries: pydensecrf's unary energy is U = -log(p) (`unary_from_softmax`, which clips p to
  >= 1e-5). Our `unary_logits` are any z with softmax(z) = p; z = -U, or the network's
  logits, which differ from -U by a per-pixel constant that softmax ignores. To feed exactly
  what pydensecrf sees from probabilities, use `unary_logits_from_probabilities`.
- parameters: `sxy` in pixels, `srgb` in colour levels of a 0..255 image, `compat` the
  kernel weight, with densecrf's meaning: kernel exp(-|dp|^2/2sxy^2 [- |dI|^2/2srgb^2]),
  NORMALIZE_SYMMETRIC normalisation, the pixel itself included.
- compatibility: densecrf's `PottsCompatibility(w)` computes -w * (kernel Q), i.e.
  mu = -I with the weight w carried by the kernel. We start from exactly that: weights w_g =
  gaussian_compat and w_b = bilateral_compat for every class, mu = -I. (The textbook Potts
  mu = 1 - I gives the same Q: the two differ by a per-pixel constant.) Training may make mu
  any K x K matrix, asymmetric included, and the weights class-specific.
- output: pydensecrf returns Q = softmax of the final scores; we return the scores
  (logits), so that a loss can take them as it takes a network's logits.

Backends (`MeanFieldParams.backend`):
- "lattice": the fully connected kernels through a permutohedral lattice built as densecrf
  builds it (models/crf/permutohedral.py): probabilities within 1e-4 of pydensecrf2's on
  small images, the same argmax on 100.00% of the pixels of 8 CamVid val images.
- "window": ConvCRF's truncated kernels (models/crf/window.py): exact inside a k x k window,
  optionally at 1/s resolution; a different, local model with the same parameter meanings
  (94.5% of pixels as pydensecrf2 on those 8 images at 11 x 11, 1/4; see
  bench/meanfield_speed.py).

Each forward builds the backend's structures (lattices, window weights) from `rgb`, without
gradients: they depend on the image only, and the bandwidths are fixed buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from segflow.errors import ConfigError
from segflow.models.crf.meanfield_params import BACKENDS, MeanFieldParams  # noqa: F401  (re-exported)
from segflow.models.crf.permutohedral import LatticeMessages
from segflow.models.crf.window import WindowMessages

PYDENSECRF_PROBABILITY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default `clip`


class MeanFieldCRF(nn.Module):
    """Mean-field inference in a fully connected (or windowed) CRF, as a trainable layer.

    Buffers (kept, not trained): gaussian_sxy, bilateral_sxy, bilateral_srgb.
    Parameters (trained): gaussian_weight (K,), bilateral_weight (K,), compatibility (K, K).
    """

    def __init__(self, num_classes: int, params: MeanFieldParams = MeanFieldParams()):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"MeanFieldCRF num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.params = params
        self.register_buffer("gaussian_sxy", torch.tensor(float(params.gaussian_sxy)))
        self.register_buffer("bilateral_sxy", torch.tensor(float(params.bilateral_sxy)))
        self.register_buffer("bilateral_srgb", torch.tensor(float(params.bilateral_srgb)))
        self.gaussian_weight = nn.Parameter(torch.full((num_classes,), float(params.gaussian_compat)))
        self.bilateral_weight = nn.Parameter(torch.full((num_classes,), float(params.bilateral_compat)))
        self.compatibility = nn.Parameter(-torch.eye(num_classes))

    def forward(self, unary_logits: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) unary logits and (N, 3, H, W) float image in 0..255 -> (N, K, H, W) scores.

        The scores are logits: softmax(scores) is the final mean-field Q.
        """
        if unary_logits.dim() != 4 or unary_logits.shape[1] != self.num_classes:
            raise ValueError(f"unary_logits must be (N, {self.num_classes}, H, W), got {tuple(unary_logits.shape)}")
        if rgb.shape != (unary_logits.shape[0], 3, *unary_logits.shape[-2:]):
            raise ValueError(f"rgb must be (N, 3, H, W) = {(unary_logits.shape[0], 3, *unary_logits.shape[-2:])}, got {tuple(rgb.shape)}")
        messages = self._messages(rgb)
        dtype = unary_logits.dtype
        w_g, w_b = self.gaussian_weight.to(dtype), self.bilateral_weight.to(dtype)
        mu = self.compatibility.to(dtype)
        flat_unary = unary_logits.flatten(2)  # (N, K, H*W): the compatibility is a matmul
        scores = unary_logits
        for _ in range(self.params.iterations):
            weighted = messages(torch.softmax(scores, dim=1), w_g, w_b)
            scores = (flat_unary - torch.matmul(mu, weighted.flatten(2))).view_as(unary_logits)
        return scores

    @torch.no_grad()
    def refine(self, scores: torch.Tensor, rgb: torch.Tensor, probabilities: bool = False) -> torch.Tensor:
        """(N, K, H, W) logits, or probabilities with `probabilities=True` -> (N, H, W) int64 labels.

        Probabilities are turned into unaries as pydensecrf does (log, clipped at 1e-5).
        """
        unary = unary_logits_from_probabilities(scores) if probabilities else scores
        return self(unary, rgb).argmax(dim=1)

    def _messages(self, rgb: torch.Tensor):
        p = self.params
        if p.backend == "lattice":
            return LatticeMessages(rgb, self.gaussian_sxy.item(), self.bilateral_sxy.item(), self.bilateral_srgb.item())
        return WindowMessages(rgb, self.gaussian_sxy.item(), self.bilateral_sxy.item(), self.bilateral_srgb.item(), p.window_size, p.downsample)


def unary_logits_from_probabilities(probs: torch.Tensor, clip: float = PYDENSECRF_PROBABILITY_CLIP) -> torch.Tensor:
    """(N, K, H, W) probabilities -> log(clip(p, clip, 1)): minus pydensecrf's unary energy."""
    return torch.log(probs.clamp(clip, 1.0))
