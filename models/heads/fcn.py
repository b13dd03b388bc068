"""The plain FCN head: the decoder's fused logits are the prediction.

It has no parameters, so a network with this head has exactly the state_dict keys of
segflow's FCN before heads existed, and the bundled checkpoint loads unchanged; its
forward returns the decoder's tensor itself, so masks stay byte-identical.
"""

from __future__ import annotations

import torch

from segflow.models.heads.base import Head, HeadInputs, full_resolution_cross_entropy


class FCNHead(Head):
    """Identity on the FCN logits; weighted cross-entropy at full resolution, trained jointly."""

    name = "fcn"
    needs = ("logits",)
    training_mode = "joint"
    starts_from_base = False

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        return inputs.logits

    def loss(self, inputs: HeadInputs, targets: torch.Tensor, weight, ignore_index: int) -> dict[str, torch.Tensor]:
        return {"ce": full_resolution_cross_entropy(inputs.logits, targets, weight, ignore_index)}
