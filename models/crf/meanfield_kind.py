"""The `meanfield` refinement kind: the torch mean-field CRF layer, in the model actor.

It runs on the batch the network has just produced, on the network's device (a GPU when
there is one), so no probabilities cross Ray's object store and the CRF keeps up with the
model instead of starving it. Its inputs are what the engine gives the dense kind: the
network's logits upsampled bilinearly to the image's size, softmax, and pydensecrf's unary
-log(clip(p)); with the `lattice` backend it is the same CRF as `dense` (models/crf/meanfield.py
documents the correspondence and its >= 99 % pixel agreement).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from segflow.fingerprint import digest
from segflow.models.crf.meanfield_params import MeanFieldParams


class MeanFieldRefinement:
    name = "meanfield"
    version = 1
    runs_on = "device"
    params_type = MeanFieldParams
    summary = "CRF-as-RNN mean-field layer in torch (lattice: fully connected; window: ConvCRF), in the model actor on its device"

    def __init__(self, params: MeanFieldParams):
        self.params = params

    def fingerprint(self) -> str:
        return digest({"refinement": f"{self.name}@{self.version}", **asdict(self.params)})

    def refine_batch(self, logits, pixels) -> np.ndarray:
        """(N, K, h, w) float logits and (N, H, W, 3) uint8 pixels, on one device -> (N, H, W) uint8 labels."""
        import torch
        import torch.nn.functional as F

        from segflow.models.crf.meanfield import MeanFieldCRF

        size = pixels.shape[1:3]
        full = logits if tuple(logits.shape[-2:]) == tuple(size) else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = torch.softmax(full, dim=1)
        layer = MeanFieldCRF(full.shape[1], self.params).to(full.device)
        rgb = pixels.permute(0, 3, 1, 2).float()
        return layer.refine(probs, rgb, probabilities=True).to(torch.uint8).cpu().numpy()

    def refine(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """One image on the CPU: (H, W, 3) uint8, (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
        return self.refine_probabilities(rgb, probs).argmax(axis=0).astype(np.uint8)

    def refine_probabilities(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """One image: (H, W, 3) uint8, (C, H, W) float32 probabilities -> (C, H, W) float32 mean-field Q.

        The engine upsamples Q bilinearly when it refined at a working size smaller than the image.
        """
        import torch

        from segflow.models.crf.meanfield import MeanFieldCRF, unary_logits_from_probabilities

        layer = MeanFieldCRF(probs.shape[0], self.params)
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            scores = layer(unary_logits_from_probabilities(torch.from_numpy(probs)[None]), image)
        return torch.softmax(scores, dim=1)[0].numpy()
