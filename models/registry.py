"""The model registry: every network segflow can run, behind one contract.

Every registered network is an `nn.Module` with

    lowres_logits(x): (N, 3, H, W) normalised images -> (N, C, h, w) logits, h <= H, w <= W
    forward(x):       (N, 3, H, W) -> (N, C, H, W) logits

where `forward` is exactly `lowres_logits` followed by bilinear upsampling to the input size
(align_corners=False). The engine relies on that to ship small logits between processes and
upsample them beside the CRF. A network whose output is already full resolution (a
CRF-as-RNN head, say) returns it from `lowres_logits` and the upsampling is the identity.

segflow's FCN carries a head from `segflow.models.heads` (architecture key "head"; absent
means the plain `fcn` head). A head trained on a frozen base is stored alone: its
checkpoint's metadata has "base": {"checkpoint": URL or "bundled", "sha256": ...}, and
loading it reads that base, refuses it if its sha256 differs, and joins the weights.

New families register a builder in `ARCHITECTURES` under their `family` name; the
architecture dict stored in a checkpoint is passed back to that builder. Names,
fingerprints and label sets, which the driver needs without torch, live in
`segflow.models.catalog` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segflow.models.catalog import (  # noqa: F401 - re-exported: the registry answers for both
    BACKBONES,
    BUNDLED,
    BUNDLED_CHECKPOINT,
    FCN_MODELS,
    HEAD_MODELS,
    TORCHVISION_MODELS,
    VARIANTS,
    ModelInfo,
    ModelUnavailableError,
    architecture_for,
    available_models,
    base_location,
    check_base,
    describe_model,
    fetch_weights,
    _resolve_bundled,
    _torchvision_weights,
    _weights_unavailable,
)
from segflow.models.checkpoint import CheckpointError, read_checkpoint
from segflow.models.fcn import IMAGENET_MEAN, IMAGENET_STD, build_fcn
from segflow.models.labels import LabelSet


@dataclass
class LoadedModel:
    """A network ready for inference plus what the engine needs to use it."""

    net: nn.Module
    labels: LabelSet
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: dict
    fingerprint: str
    meta: dict


def build_network(architecture: dict, num_classes: int, weights: str | None = None, normalization: dict | None = None) -> nn.Module:
    """Build the network an architecture dict describes (weights from torchvision or fresh).

    `normalization` ({"mean", "std"}, default ImageNet's) is what the network's input was
    normalised with; heads that need the RGB image undo it.
    """
    family = architecture.get("family")
    if family not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture family {family!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[family](architecture, num_classes, weights, normalization or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})


def load_model(
    model: str | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    base: str | None = None,
) -> LoadedModel:
    """Resolve what the user asked for into a ready network.

    - `checkpoint` given: architecture, classes and weights come from the file; a head-only
      checkpoint also reads its base (the one its metadata names, or `base`).
    - `model` a torchvision name with `weights` (DEFAULT or an enum name): torchvision's own
      loader, through the torch hub cache.
    - `model` with `weights` "none"/None: fresh weights from `seed` (architecture tests only;
      such output is not a segmentation).
    - nothing: the bundled CamVid FCN-8s.
    """
    checkpoint = _resolve_bundled(model, checkpoint, weights)
    if checkpoint is not None:
        return _from_checkpoint(checkpoint, storage_options, base)
    info = describe_model(model, None, weights, num_classes, seed)
    if weights and weights.lower() != "none":
        return _from_torchvision_weights(model, info, weights)
    torch.manual_seed(seed)
    net = build_network(info.architecture, info.labels.num_classes).eval()
    return LoadedModel(net, info.labels, IMAGENET_MEAN, IMAGENET_STD, info.architecture, info.fingerprint, info.meta)


def _from_checkpoint(url: str, storage_options: dict | None, base: str | None = None) -> LoadedModel:
    state_dict, meta, sha = read_checkpoint(url, storage_options)
    try:
        labels = LabelSet.from_dict(meta["labels"])
        architecture = meta["architecture"]
        norm = meta.get("normalization", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    except KeyError as exc:
        raise CheckpointError(f"{url}: metadata lacks {exc.args[0]!r}; save it with segflow.models.checkpoint.save_checkpoint") from None
    if "base" in meta:
        state_dict = {**_base_weights(url, meta, base, storage_options), **state_dict}
    elif base is not None:
        raise CheckpointError(f"{url}: a complete checkpoint, not a head-only one; it takes no base ({base})")
    try:
        net = build_network(architecture, labels.num_classes, normalization=norm)
    except ValueError as exc:  # an unknown head or head setting
        raise CheckpointError(f"{url}: {exc}") from None
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{url}: weights do not fit {architecture}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return LoadedModel(net.eval(), labels, tuple(norm["mean"]), tuple(norm["std"]), architecture, sha[:16], meta)


def _base_weights(url: str, meta: dict, base: str | None, storage_options: dict | None) -> dict[str, torch.Tensor]:
    """The weights of the base a head-only checkpoint was trained on, after checking its sha256."""
    base_url = base_location(meta, url, base)
    base_state, base_meta, base_sha = read_checkpoint(base_url, storage_options)
    check_base(url, meta, base_url, base_sha)
    return base_state


def _from_torchvision_weights(name: str, info: ModelInfo, weights: str) -> LoadedModel:
    chosen = _torchvision_weights(name, weights)
    try:
        net = build_network(info.architecture, info.labels.num_classes, chosen.name)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hub failures surface as either
        raise _weights_unavailable(name, chosen, exc) from None
    return LoadedModel(net.eval(), info.labels, IMAGENET_MEAN, IMAGENET_STD, info.architecture, info.fingerprint, info.meta)


class TorchvisionSegmenter(nn.Module):
    """Adapts torchvision's segmentation models to the registry contract (no aux head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def lowres_logits(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.segmentation import LRASPP

        features = self.net.backbone(x)
        if isinstance(self.net, LRASPP):
            return self.net.classifier(features)
        return self.net.classifier(features["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.lowres_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _build_torchvision(architecture: dict, num_classes: int, weights: str | None, normalization: dict) -> nn.Module:
    kwargs = {"weights": weights, "weights_backbone": None, "num_classes": num_classes}
    if weights is None and not architecture["name"].startswith("lraspp"):
        kwargs["aux_loss"] = False  # with weights, torchvision insists on its own aux setting
    import torchvision  # here, not at import: the FCN's actors never need it (models/resnet.py)

    net = torchvision.models.get_model(architecture["name"], **kwargs)
    if weights is not None and hasattr(net, "aux_classifier"):
        net.aux_classifier = None
    return TorchvisionSegmenter(net)


def _build_fcn(architecture: dict, num_classes: int, weights: str | None, normalization: dict) -> nn.Module:
    if weights is not None:
        raise ModelUnavailableError("segflow's FCN has no published weights; use --checkpoint or the bundled model")
    return build_fcn(
        architecture["variant"],
        architecture["backbone"],
        num_classes,
        head=architecture.get("head", "fcn"),
        head_config=architecture.get("head_config"),
        normalization=(tuple(normalization["mean"]), tuple(normalization["std"])),
    )


ARCHITECTURES: dict[str, Callable[[dict, int, str | None, dict], nn.Module]] = {
    "fcn": _build_fcn,
    "torchvision": _build_torchvision,
}


