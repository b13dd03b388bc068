"""The refinement stage, on CPU workers: logits -> probabilities -> raw and refined masks -> row.

`refine_item` takes what the model actor yielded for one image and returns the rows the
shard will commit: a mask row, or an error row, plus a metrics row when evaluating.

Refiners are the CPU kinds of the refinement registry (segflow.models.crf.REFINEMENTS),
chosen and configured by the plan; this stage only calls `refine`. Refinements that are
part of a network (DPN, the contextual CRF) are heads in the model registry instead and
arrive here as logits, with a further CPU refiner on top or none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from segflow.pipeline.config import LabelPairing
from segflow.models.probabilities import labels_and_confidence, probabilities_from_logits
from segflow.pipeline.masks import encode_mask
from segflow.pipeline.resize import ImageMasks, masks_at_image_size, needs_image_size_path


class Refiner(Protocol):
    """A CPU refinement kind of segflow.models.crf, configured: probabilities -> labels."""

    def fingerprint(self) -> str: ...

    def refine(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image, (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
        ...


@dataclass(frozen=True)
class RefineContext:
    """What every refine task of a job shares (small; shipped once per task by Ray)."""

    refiner: Refiner | None
    num_classes: int
    flat_palette: tuple[int, ...]
    fingerprints: dict
    evaluation: LabelPairing | None = None
    ignore_index: int | None = None
    storage_options: dict | None = field(default=None, repr=False)
    storage_env: dict | None = field(default=None, repr=False)  # the driver's storage_environment()


def warm_up() -> int:
    """A no-op task that makes a CRF worker process import torch and pydensecrf ahead of work."""
    import torch

    torch.set_num_threads(1)
    return 0


def refine_item(item: dict, ctx: RefineContext, shard_id: str) -> dict:
    """One model-stage item -> {"mask": row} or {"error": row}, plus {"metrics": row} when evaluating."""
    base = {"uri": item["uri"], "key": item["key"], "shard_id": shard_id, "node_id": item.get("node_id"), **ctx.fingerprints}
    if "failure" in item:
        return {"error": {**base, **item["failure"], "attempts": 1}}
    if ctx.evaluation is not None:  # labels are read here
        from segflow.pipeline.storage import use_storage_environment

        use_storage_environment(ctx.storage_env)
    import torch

    torch.set_num_threads(1)  # one CRF task per core: intra-op threads would oversubscribe
    try:
        return _refine(item, ctx, base)
    except Exception as exc:
        from segflow.errors import ImageError, StorageError

        if isinstance(exc, (StorageError, ImportError)):
            raise  # an outage or a missing module says nothing about this image: the shard fails (engine.py)
        fault = isinstance(exc, ImageError)  # a bad label is the image's; a failing refiner is not
        stage = exc.stage if fault else "refine"
        reason = exc.reason if fault else f"{type(exc).__name__}: {exc}"
        return {"error": {**base, "stage": stage, "reason": reason, "attempts": 1, "image_fault": fault}}


def _refine(item: dict, ctx: RefineContext, base: dict) -> dict:
    rgb = item["rgb"]
    t0 = time.perf_counter()
    if needs_image_size_path(item):  # resized to the working size, or tiled: masks built stripe by stripe
        masks = masks_at_image_size(item, ctx.refiner, ctx.num_classes)
    else:
        probs = probabilities_from_logits(item["logits"], *rgb.shape[:2])
        raw, confidence = labels_and_confidence(probs)
        if "refined" in item:  # a device kind refined it in the model actor, right after the network
            refined = item["refined"]
        else:
            refined = ctx.refiner.refine(rgb, probs) if ctx.refiner is not None else None
        masks = ImageMasks.of(raw, refined, confidence, ctx.num_classes)
    t1 = time.perf_counter()
    raw, refined = masks.raw, masks.final if masks.refined else None
    height, width = raw.shape
    palette = list(ctx.flat_palette)
    row = {
        **base,
        "height": height,
        "width": width,
        "mask": encode_mask(masks.final, palette),
        "raw_mask": encode_mask(raw, palette) if refined is not None else None,
        "pixel_counts": masks.counts,
        "raw_pixel_counts": masks.raw_counts,
        "crf_changed_fraction": masks.changed_fraction,
        "mean_confidence": masks.mean_confidence,
        "min_confidence": masks.min_confidence,
        "seconds_read": item.get("seconds_read"),
        "seconds_decode": item.get("seconds_decode"),
        "seconds_infer": item.get("seconds_infer"),
        "seconds_refine": t1 - t0 + (item.get("seconds_device_refine") or 0.0),
    }
    row["seconds_encode"] = time.perf_counter() - t1
    out = {"mask": row}
    if ctx.evaluation is not None:
        from segflow.errors import LabelError

        try:
            out["metrics"] = _metrics_row(item, ctx, base, raw, refined)
        except LabelError as exc:  # the mask stands; only this image's metrics are missing, and say why
            reason = exc.reason if exc.uri == base["uri"] else f"label {exc.uri}: {exc.reason}"
            out["error"] = {**base, "stage": exc.stage, "reason": reason, "attempts": 1, "image_fault": True}
    return out


def _metrics_row(item: dict, ctx: RefineContext, base: dict, raw: np.ndarray, refined: np.ndarray | None) -> dict:
    from segflow.pipeline.evaluation.groundtruth import decode_label
    from segflow.pipeline.evaluation.metrics import image_metrics
    from segflow.pipeline.storage import read_bytes

    from segflow.errors import LabelError
    from segflow.pipeline.storage import redact

    image_uri, label_uri = base["uri"], item.get("label_uri")
    if label_uri is None:
        raise LabelError(image_uri, f"no label file under LABELS pairs with image {redact(image_uri)} (expected a file named like "
                         f"its stem + {ctx.evaluation.label_suffix!r}); its mask is kept, it is not scored")
    label = decode_label(read_bytes(label_uri, ctx.storage_options), label_uri, ctx.evaluation, ctx.num_classes)
    if label.shape != raw.shape:
        (lh, lw), (ih, iw) = label.shape, raw.shape
        raise LabelError(image_uri, f"label {redact(label_uri)} is {lw}x{lh} but image {redact(image_uri)} is {iw}x{ih}; "
                         "its mask is kept, it is not scored (pair each image with a label of its own size)")
    metrics = image_metrics(
        label,
        raw,
        refined,
        num_classes=ctx.num_classes,
        ignore_index=ctx.ignore_index,
        tolerance=ctx.evaluation.boundary_tolerance,
        trimap_width=ctx.evaluation.trimap_width,
        uri=label_uri,
    )
    return {"uri": base["uri"], "label_uri": label_uri, "shard_id": base["shard_id"], "job_fingerprint": base.get("job_fingerprint"), **metrics}
