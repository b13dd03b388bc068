"""What segflow can run, described without building anything: names, fingerprints, labels.

The driver plans a job from this module alone, so it never imports torch: that import
costs ~3 CPU-seconds, and at startup on a small machine every CPU-second spent in the
driver delays the first commit. Networks are built (and torch imported) in the model
actors, by `segflow.models.registry`, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from segflow.models.checkpoint import CheckpointError, read_checkpoint_meta
from segflow.models.heads import DEFAULT_HEAD, HEADS
from segflow.models.labels import VOC, LabelSet

TORCHVISION_MODELS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")  # segflow's FCN (models/fcn.py)
VARIANTS = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}  # FCN variant -> output stride
FCN_MODELS = tuple(f"{v}_{b}" for v in VARIANTS for b in BACKBONES)
BUNDLED_CHECKPOINT = Path(__file__).parent / "bundled" / "camvid_fcn8s_resnet18.safetensors"
BUNDLED = "bundled"
# Heads on the bundled FCN-8s: selectable by name once `segflow train --head NAME` has
# written their head-only checkpoint beside the bundled model (see `head_checkpoint_path`).
HEAD_MODELS = tuple(f"fcn8s_resnet18_{head}" for head in HEADS if head != DEFAULT_HEAD)


class ModelUnavailableError(RuntimeError):
    """Weights that cannot be obtained (offline, unknown name); the message lists alternatives."""


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to know about a model without building it."""

    fingerprint: str
    labels: LabelSet
    architecture: dict
    meta: dict


def describe_model(
    model: str | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
) -> ModelInfo:
    """Fingerprint, label set and metadata of what `load_model` would load, without building it.

    A checkpoint says what it is (architecture, classes): `model` or `num_classes` given
    beside it must agree, or the call fails with one line (they were silently ignored).
    """
    explicit = checkpoint
    checkpoint = _resolve_bundled(model, checkpoint, weights)
    if checkpoint is not None:
        meta, sha = read_checkpoint_meta(checkpoint, storage_options)
        if explicit is not None:
            _refuse_contradictions(explicit, meta, model, num_classes)
        if "base" in meta:  # a head-only checkpoint: refuse a wrong base now, in the driver
            base_url = base_location(meta, checkpoint)
            check_base(checkpoint, meta, base_url, read_checkpoint_meta(base_url, storage_options)[1])
        # The head file's own hash suffices as fingerprint: its metadata pins the base's sha256.
        return ModelInfo(sha[:16], LabelSet.from_dict(meta["labels"]), meta["architecture"], meta)
    architecture = architecture_for(model)
    if weights and weights.lower() != "none":
        chosen = _torchvision_weights(model, weights)
        labels = _labels_for(chosen.meta["categories"])
        return ModelInfo(_digest({"architecture": architecture, "weights": chosen.url}), labels, architecture, {"weights": chosen.name})
    labels = VOC if num_classes in (None, VOC.num_classes) else _numbered_labels(num_classes)
    fingerprint = _digest({"architecture": architecture, "classes": labels.num_classes, "seed": seed})
    return ModelInfo(fingerprint, labels, architecture, {"weights": f"random(seed={seed})"})


def _refuse_contradictions(checkpoint: str, meta: dict, model: str | None, num_classes: int | None) -> None:
    """--model / --num-classes beside --checkpoint: allowed only when they say what the checkpoint says."""
    classes = len(meta["labels"]["classes"]) if isinstance(meta.get("labels"), dict) and "classes" in meta["labels"] else None
    if num_classes is not None and classes is not None and num_classes != classes:
        raise ModelUnavailableError(f"--num-classes {num_classes} contradicts --checkpoint {_redact(checkpoint)}, which has "
                                    f"{classes} classes; drop --num-classes (a checkpoint brings its own label set)")
    if model is None:
        return
    try:
        named = architecture_for(model)
    except ModelUnavailableError:
        named = None
    if model == BUNDLED or named != {k: v for k, v in meta.get("architecture", {}).items() if k in (named or {})}:
        raise ModelUnavailableError(f"--model {model} contradicts --checkpoint {_redact(checkpoint)}, a "
                                    f"{_describe_architecture(meta.get('architecture'))} checkpoint; drop --model "
                                    "(a checkpoint brings its own architecture)")


def _describe_architecture(architecture) -> str:
    if not isinstance(architecture, dict):
        return "differently built"
    if "variant" in architecture and "backbone" in architecture:
        return "_".join(str(architecture[k]) for k in ("variant", "backbone", "head") if architecture.get(k))
    return str(architecture.get("name") or architecture)


def _redact(url: str) -> str:
    from segflow.storage import redact

    return redact(url)


def available_models() -> list[str]:
    return [BUNDLED, *FCN_MODELS, *HEAD_MODELS, *TORCHVISION_MODELS]


def architecture_for(name: str, head: str | None = None) -> dict:
    """The architecture dict of a registry name ("fcn8s_resnet18", "fcn8s_resnet18_dpn", ...).

    An FCN name may end in a head's name ("_dpn"), or the head may be given apart; the
    default `fcn` head is left out of the dict, so architectures (and fingerprints) from
    before heads existed are unchanged.
    """
    if name in TORCHVISION_MODELS:
        if head not in (None, DEFAULT_HEAD):
            raise ModelUnavailableError(f"{name}: heads attach to segflow's FCN only; use an fcn8s_/fcn16s_/fcn32s_ model")
        return {"family": "torchvision", "name": name}
    variant, _, rest = name.partition("_")
    named_head = next((h for h in HEADS if rest.endswith(f"_{h}") and rest[: -len(h) - 1] in BACKBONES), None)
    backbone = rest[: -len(named_head) - 1] if named_head else rest
    if head and named_head and head != named_head:
        raise ModelUnavailableError(f"{name} names head {named_head!r} but head {head!r} was asked for")
    head = head or named_head or DEFAULT_HEAD
    if variant in VARIANTS and backbone in BACKBONES:
        if head not in HEADS:
            raise ModelUnavailableError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        return {"family": "fcn", "variant": variant, "backbone": backbone} | ({} if head == DEFAULT_HEAD else {"head": head})
    raise ModelUnavailableError(f"unknown model {name!r}; available: {', '.join(available_models())}")


def head_checkpoint_path(name: str) -> Path:
    """Where the trained head-only checkpoint of a HEAD_MODELS name lives (beside the bundled model)."""
    return BUNDLED_CHECKPOINT.parent / f"camvid_{name}.safetensors"


def base_location(meta: dict, head_url: str, base: str | None = None) -> str:
    """The base checkpoint a head-only checkpoint names, unless `base` overrides it.

    "bundled" means one of the checkpoints bundled with this install: the one whose sha256
    the head was trained on. A head trained on an earlier bundled model keeps working when
    a newer default ships beside it (its base stays bundled under another name); without a
    match it is the default, which `check_base` then refuses in one line.
    """
    location = base or meta["base"]["checkpoint"]
    if location != BUNDLED:
        return location
    return str(bundled_checkpoint_with_sha256(meta["base"].get("sha256", "")) or BUNDLED_CHECKPOINT)


def bundled_checkpoint_with_sha256(sha256: str) -> Path | None:
    """The complete (not head-only) bundled checkpoint with this sha256, the default model first; None if none."""
    import hashlib

    others = sorted(p for p in BUNDLED_CHECKPOINT.parent.glob("*.safetensors") if p != BUNDLED_CHECKPOINT)
    for path in (BUNDLED_CHECKPOINT, *others):
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return path
    return None


def check_base(head_url: str, meta: dict, base_url: str, base_sha: str) -> None:
    """Refuse a base checkpoint whose sha256 is not the one the head was trained on."""
    expected = meta["base"]["sha256"]
    if base_sha != expected:
        raise CheckpointError(
            f"{_redact(head_url)}: this head was trained on base checkpoint sha256 {expected[:16]}, but {_redact(base_url)} is "
            f"{base_sha[:16]}; give the base it was trained on, or retrain the head on this one (segflow train --head ... --base {_redact(base_url)})"
        )


def fetch_weights(model: str | None, weights: str | None) -> None:
    """Bring torchvision weights into the torch hub cache now (a no-op when cached or not asked for).

    Model actors load them again from the cache; fetching first in the driver turns an
    offline machine's failure into one clear error before any work starts.
    """
    if model not in TORCHVISION_MODELS or not weights or weights.lower() == "none":
        return
    import torch

    chosen = _torchvision_weights(model, weights)
    _check_cached_hash(model, chosen.url)  # a file already cached was never checked: check it now
    try:
        # check_hash: a download is verified against the sha256 prefix in its published file name
        torch.hub.load_state_dict_from_url(chosen.url, progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise _weights_unavailable(model, chosen, exc) from None


def _check_cached_hash(model: str, url: str) -> None:
    """Refuse a cached weights file whose sha256 does not start with the prefix in its name.

    torch.hub checks the hash only while downloading (and only when asked); a file cached
    earlier unchecked, truncated, or replaced would otherwise load as if it were the
    published weights.
    """
    import os
    from urllib.parse import urlparse

    from torch.hub import HASH_REGEX, get_dir

    name = os.path.basename(urlparse(url).path)
    match = HASH_REGEX.search(name)
    cached = os.path.join(get_dir(), "checkpoints", name)
    if match is None or not os.path.exists(cached):
        return
    digest = hashlib.sha256()
    with open(cached, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ModelUnavailableError(
            f"{cached}: the cached {model} weights do not match the sha256 prefix {match.group(1)} of their published name "
            "(a partial or altered file); delete it and run again to download them afresh"
        )


def _weights_unavailable(model: str, chosen, exc: Exception) -> ModelUnavailableError:
    """The one-line error for torchvision weights that are neither cached nor downloadable."""
    import torch

    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelUnavailableError(
        f"{model} weights {chosen.name} are not in the torch hub cache ({torch.hub.get_dir()}) and "
        f"could not be downloaded ({reason}). Alternatives: the bundled model (omit --model), "
        f"--checkpoint URL, or --weights none for an untrained network"
    )


def _resolve_bundled(model: str | None, checkpoint: str | None, weights: str | None = None) -> str | None:
    """The checkpoint a name stands for: the bundled model, a trained head on it, or `checkpoint`.

    A head model asked for with `--weights none` is built untrained (architecture tests), as
    any FCN name is; without it, it needs its trained checkpoint.
    """
    if checkpoint is None and model in (None, BUNDLED):
        if not BUNDLED_CHECKPOINT.exists():
            raise ModelUnavailableError(f"the bundled model {BUNDLED_CHECKPOINT} is missing from this install")
        return str(BUNDLED_CHECKPOINT)
    if checkpoint is None and model in HEAD_MODELS and not (weights and weights.lower() == "none"):
        path = head_checkpoint_path(model)
        if not path.exists():
            head = model.rpartition("_")[2]
            raise ModelUnavailableError(
                f"{model} has no trained checkpoint yet ({path}); train one with `segflow train --head {head} "
                f"--output {path} ...`, pass --checkpoint, or use --weights none for an untrained network"
            )
        return str(path)
    return checkpoint


def _torchvision_weights(name: str, weights: str):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise ModelUnavailableError(f"{name}: unknown weights {weights!r}; choose DEFAULT, none, or one of: {names}") from None


def _labels_for(categories: list[str]) -> LabelSet:
    return VOC if categories == list(VOC.classes) else _numbered_labels(len(categories))


def _numbered_labels(n: int) -> LabelSet:
    from segflow.models.labels import _voc_palette

    return LabelSet(name=f"classes{n}", classes=tuple(f"class{i}" for i in range(n)), palette=_voc_palette(n))


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
