"""The working resolution: the long side, in pixels, at which the network and the refinement run.

A 45-megapixel photo run at full resolution costs the network and the dense CRF ~200x the
work of a CamVid frame and several GB of class-sized float arrays, for no better mask: a
network sees objects at the scales it was trained on. mmsegmentation's test pipelines
resize to a working scale and bring the result back to the image's size; segflow does
the same (pipeline/resize.py) for images whose long side exceeds the working size.
Images at or below it take exactly the code path they always took.

Where the default comes from, first match wins:

1. the checkpoint's metadata key `inference.working_size` (its training scale: the long
   side of its training images; `segflow train` data and torchvision's models are small);
2. `FALLBACK_WORKING_SIZE` = 512, the common training scale: the bundled CamVid FCN was
   trained on 480x360 frames, torchvision's COCO/VOC models at 520, mmseg's ADE20K and
   VOC configs at a 512 short side. A network is only accurate on objects at the scale
   it learnt them at, so running larger costs accuracy rather than adding it: on CamVid
   val upscaled 4x (bench/large_quality.py, bundled model, 5 images) the CRF masks'
   mIoU was 63.5 at the original size; 63.2 at working size 512, 53.7 at 768 and 44.8 at
   1024 (1024 and 2048, mmseg's usual long sides, suit models trained on Cityscapes'
   2048x1024 frames, which should record theirs under key 1). It also keeps the network
   and the CRF at ~0.2 Mpx per image whatever the camera. Full-resolution detail is
   `--tiles` or an explicit `--working-size`.

This module is import-light (no torch): the driver needs it to compute fingerprints.
"""

from __future__ import annotations

FALLBACK_WORKING_SIZE = 512
FULL = "full"  # --working-size full: the network and the refinement run on every pixel (the old behaviour)
MIN_WORKING_SIZE = 32  # below a network's output stride x 4 the logits are a handful of cells


def checkpoint_working_size(meta: dict | None) -> int | None:
    """The training scale a checkpoint records (`{"inference": {"working_size": 480}}`), or None."""
    value = ((meta or {}).get("inference") or {}).get("working_size")
    return int(value) if value is not None else None


def default_working_size(meta: dict | None) -> int:
    """The working size used when none is asked for: the checkpoint's, else the documented fallback."""
    return checkpoint_working_size(meta) or FALLBACK_WORKING_SIZE


def resolve_working_size(requested: int | str | None, meta: dict | None, tiles: tuple[int, int] | None = None) -> int | None:
    """The long side to run at, or None for full resolution.

    `requested` None means the default; with `tiles` and nothing requested the network
    slides over the full-resolution image, since tiles are asked for when full-resolution
    detail matters.
    """
    if requested == FULL:
        return None
    if requested is None:
        return None if tiles is not None else default_working_size(meta)
    return int(requested)


def fingerprint_entries(requested: int | str | None, meta: dict | None, tiles: tuple[int, int] | None) -> dict:
    """What the working size and the tiles add to the model fingerprint: nothing at their defaults.

    huggingface datasets' rule, "defaults removed": a job that leaves both at their
    defaults keeps the fingerprint it always had, so outputs written before stay up to date.
    """
    entries = {}
    resolved = resolve_working_size(requested, meta, tiles)
    if tiles is not None or resolved != default_working_size(meta):
        entries["working_size"] = FULL if resolved is None else resolved
    if tiles is not None:
        entries["tiles"] = list(tiles)
    return entries


def working_shape(height: int, width: int, long_side: int | None) -> tuple[int, int] | None:
    """(h, w) of an image brought to `long_side`, or None when it is at or below it (no resizing)."""
    if long_side is None or max(height, width) <= long_side:
        return None
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
