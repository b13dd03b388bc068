"""The refinement stage, on CPU workers: logits -> probabilities -> raw and refined masks -> row.

`refine_item` takes what the model actor yielded for one image and returns the rows the
shard will commit: a mask row, or an error row, plus a metrics row when evaluating.

Refiners are pluggable (`REFINERS`): the dense CRF here is one; refinements that are
part of a network (CRF-as-RNN, DPN) live in the model registry instead and arrive here as
full-resolution logits, with `crf=None` or a further CPU refiner on top.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pipeline.config import CRFParams, LabelPairing
from pipeline.crf import refine_with_crf
from pipeline.masks import encode_mask


class Refiner(Protocol):
    """A CPU refinement of probabilities into labels."""

    def fingerprint(self) -> str: ...

    def refine(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image, (C, H, W) float32 probabilities -> (H, W) uint8 labels."""
        ...


@dataclass(frozen=True)
class DenseCRFRefiner:
    """Krähenbühl & Koltun's fully connected CRF (pydensecrf2)."""

    params: CRFParams

    def fingerprint(self) -> str:
        return self.params.fingerprint()

    def refine(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return refine_with_crf(rgb, probs, self.params)


REFINERS = {"densecrf": DenseCRFRefiner}


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


def probabilities_from_logits(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) low-resolution logits -> (C, H, W) float32 softmax probabilities.

    The upsampling is the registry contract's: bilinear, align_corners=False, exactly
    what the network's own `forward` does. (torch is imported here, in the worker, not
    when the driver imports this module: see models/catalog.py.)
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return torch.softmax(t[0], dim=0).numpy()


def labels_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) probabilities -> (H, W) uint8 argmax and (H, W) float32 max, in one pass.

    Exactly `probs.argmax(0)` (ties go to the first class) and `probs.max(0)`, at ~40% of
    their cost: numpy's argmax along the leading axis is its slow case (4.3 vs 1.8 ms for
    11 x 360 x 480 on one core). NaN inputs and more than 256 classes take numpy's path.
    """
    if probs.shape[0] > 256:
        return probs.argmax(axis=0).astype(np.uint8), probs.max(axis=0)
    best = probs[0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        np.maximum(best, probs[c], out=best)
    if np.isnan(best).any():
        return probs.argmax(axis=0).astype(np.uint8), best
    return labels, best


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
        from pipeline.storage import use_storage_environment

        use_storage_environment(ctx.storage_env)
    import torch

    torch.set_num_threads(1)  # one CRF task per core: intra-op threads would oversubscribe
    try:
        return _refine(item, ctx, base)
    except Exception as exc:
        from pipeline.errors import ImageError, StorageError

        if isinstance(exc, StorageError):
            raise  # an outage says nothing about this image: the shard fails and is retried whole
        stage = exc.stage if isinstance(exc, ImageError) else "refine"
        reason = exc.reason if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
        return {"error": {**base, "stage": stage, "reason": reason, "attempts": 1}}


def _refine(item: dict, ctx: RefineContext, base: dict) -> dict:
    rgb = item["rgb"]
    height, width = rgb.shape[:2]
    t0 = time.perf_counter()
    probs = probabilities_from_logits(item["logits"], height, width)
    raw, confidence = labels_and_confidence(probs)
    refined = ctx.refiner.refine(rgb, probs) if ctx.refiner is not None else None
    t1 = time.perf_counter()
    final = refined if refined is not None else raw
    palette = list(ctx.flat_palette)
    row = {
        **base,
        "height": height,
        "width": width,
        "mask": encode_mask(final, palette),
        "raw_mask": encode_mask(raw, palette) if refined is not None else None,
        "pixel_counts": np.bincount(final.ravel(), minlength=ctx.num_classes).tolist(),
        "raw_pixel_counts": np.bincount(raw.ravel(), minlength=ctx.num_classes).tolist(),
        "crf_changed_fraction": float((refined != raw).mean()) if refined is not None else None,
        "mean_confidence": float(confidence.mean()),
        "min_confidence": float(confidence.min()),
        "seconds_read": item.get("seconds_read"),
        "seconds_decode": item.get("seconds_decode"),
        "seconds_infer": item.get("seconds_infer"),
        "seconds_refine": t1 - t0,
    }
    row["seconds_encode"] = time.perf_counter() - t1
    out = {"mask": row}
    if ctx.evaluation is not None:
        out["metrics"] = _metrics_row(item, ctx, base, raw, refined)
    return out


def _metrics_row(item: dict, ctx: RefineContext, base: dict, raw: np.ndarray, refined: np.ndarray | None) -> dict:
    from pipeline.groundtruth import decode_label
    from pipeline.metrics import image_metrics
    from pipeline.storage import read_bytes

    label_uri = item["label_uri"]
    label = decode_label(read_bytes(label_uri, ctx.storage_options), label_uri, ctx.evaluation, ctx.num_classes)
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
