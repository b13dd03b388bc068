"""Images larger than the working size: run small, bring the masks back at the image's size.

Two halves, one per stage:

- in the model actor, `decode_for_network` decodes a large JPEG at reduced size (DCT
  scaling) and resizes it to the working size (models/working_size.py); the item then
  carries `image_size`, the true (height, width);
- in the refinement, `masks_at_image_size` turns the network's logits into masks at
  `image_size`: the raw mask is the argmax of the logits upsampled bilinearly; the dense
  CRF runs at the working size and its probabilities Q are upsampled the same way, then
  argmax. Both argmaxes come from models/upsampled_argmax.py, which computes the
  upsampled values only near class boundaries and is exact. The confidence statistics
  are the working size's (the full-size ones would need every class at every pixel).
  Labels are stretched by nearest neighbour only for refinement kinds that give no
  probabilities (a device kind). With `--tiles` at full resolution the logits are
  upsampled a stripe of rows at a time (models/stripes.py) and the refinement runs window
  by window over the same tiles, with Q averaged where windows overlap (`_windowed`).

Peak memory per image is then the working-size arrays, the sample grid of
upsampled_argmax (or one stripe, or one band of tiles), the decoded pixels and the
full-size masks, never K x H x W floats.
Images at or below the working size (and within one tile) never come here:
`needs_image_size_path` is false for them and they take the code path they always took.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segflow.models.working_size import working_shape
from segflow.pipeline.decode import decode_image, decode_reduced


def decode_for_network(data: bytes, uri: str, max_pixels: int, long_side: int | None) -> tuple[np.ndarray, dict]:
    """-> (pixels the network runs on, extra item fields): `{"image_size": (H, W)}` when resized, else {}."""
    if long_side is None:
        return decode_image(data, uri, max_pixels), {}
    pixels, (height, width) = decode_reduced(data, uri, max_pixels, long_side)
    shape = working_shape(height, width, long_side)
    if shape is None:
        return pixels, {}
    from PIL import Image

    # PIL's bilinear filter widens with the reduction (antialiased), unlike cv2's INTER_LINEAR
    small = Image.fromarray(pixels).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.array(small, dtype=np.uint8), {"image_size": (height, width)}


def needs_image_size_path(item: dict) -> bool:
    """Whether an item's masks come from this module: resized, or tiled with a refinement by windows."""
    if "image_size" in item:
        return True
    tiles = item.get("tiles")
    return tiles is not None and max(item["rgb"].shape[:2]) > tiles[0]


@dataclass
class ImageMasks:
    """The masks and the statistics `refine.py` writes in a row, computed stripe by stripe."""

    final: np.ndarray
    raw: np.ndarray
    refined: bool
    counts: list[int]
    raw_counts: list[int]
    changed_fraction: float | None
    mean_confidence: float
    min_confidence: float

    @classmethod
    def of(cls, raw: np.ndarray, refined: np.ndarray | None, confidence: np.ndarray, num_classes: int) -> "ImageMasks":
        """The statistics of full-size masks, computed exactly as rows always had them."""
        from segflow.models.stripes import class_counts

        final = refined if refined is not None else raw
        return cls(
            final,
            raw,
            refined is not None,
            class_counts(final, num_classes).tolist(),
            class_counts(raw, num_classes).tolist(),
            float((refined != raw).mean()) if refined is not None else None,
            float(confidence.mean()),
            float(confidence.min()),
        )


def masks_at_image_size(item: dict, refiner, num_classes: int) -> ImageMasks:
    """One item of the model stage (working-size or tiled logits) -> masks at the image's own size."""
    if "image_size" not in item:  # tiles at full resolution
        return _tiled_masks(item, refiner, num_classes)
    import torch

    from segflow.models.probabilities import labels_and_confidence, probabilities_from_logits
    from segflow.models.upsampled_argmax import upsampled_argmax

    rgb = item["rgb"]
    height, width = item["image_size"]
    raw, raw_counts = upsampled_argmax(torch.from_numpy(np.ascontiguousarray(item["logits"], dtype=np.float32)), height, width)
    # The confidence statistics are the working size's: at 48 Mpx, the top softmax probability of
    # every full-size pixel needs all K classes upsampled there, the cost `upsampled_argmax` avoids.
    probs = probabilities_from_logits(item["logits"], *rgb.shape[:2])
    confidence = labels_and_confidence(probs)[1]
    final, counts = None, None
    if "refined" in item:  # a device kind: labels at the network's size, no probabilities
        final = _nearest(item["refined"], height, width)
    elif refiner is not None:
        q_of = getattr(refiner, "refine_probabilities", None)
        if q_of is None:
            final = _nearest(refiner.refine(rgb, probs), height, width)
        else:
            q = torch.from_numpy(np.ascontiguousarray(q_of(rgb, probs), dtype=np.float32))
            del probs
            final, counts = upsampled_argmax(q, height, width)
    return _with_statistics(raw, final, float(confidence.mean()), float(confidence.min()), num_classes, raw_counts, counts)


def _tiled_masks(item: dict, refiner, num_classes: int) -> ImageMasks:
    """Tiles at full resolution: logits upsampled stripe by stripe, the refinement window by window."""
    import torch

    from segflow.models.stripes import MaskAccumulator, upsample_rows

    rgb = item["rgb"]
    height, width = rgb.shape[:2]
    logits = torch.from_numpy(np.ascontiguousarray(item["logits"], dtype=np.float32))
    raw = MaskAccumulator(height, width, num_classes)
    for row0, stripe in upsample_rows(logits, height, width):
        raw.add_logits(row0, stripe)
    final = None
    if "refined" in item:
        final = _nearest(item["refined"], height, width)
    elif refiner is not None:
        final = _windowed(rgb, logits, refiner, item["tiles"], num_classes)
    return _with_statistics(raw.labels, final, raw.mean_confidence, raw.min_confidence, num_classes, raw.counts)


def _with_statistics(
    raw: np.ndarray, final: np.ndarray | None, mean_confidence: float, min_confidence: float, num_classes: int,
    raw_counts: np.ndarray, final_counts: np.ndarray | None = None,
) -> ImageMasks:
    """The row's statistics; pixel counts already known are used as they are (a count of 48 Mpx costs 0.1 s)."""
    from segflow.models.stripes import class_counts

    raw_counts = raw_counts.tolist()
    if final is None:
        return ImageMasks(raw, raw, False, raw_counts, raw_counts, None, mean_confidence, min_confidence)
    height = raw.shape[0]
    changed = sum(int(np.count_nonzero(final[r : r + 1024] != raw[r : r + 1024])) for r in range(0, height, 1024))
    counts = (final_counts if final_counts is not None else class_counts(final, num_classes)).tolist()
    return ImageMasks(final, raw, True, counts, raw_counts, changed / final.size, mean_confidence, min_confidence)


def _windowed(rgb: np.ndarray, logits, refiner, tiles: tuple[int, int], num_classes: int) -> np.ndarray:
    """The refinement on each tile of a full-resolution image, Q averaged where tiles overlap.

    Each window's probabilities are computed alone, exactly (`WindowUpsampler`). Rows are
    finished band by band: once the next row of tiles starts below a row, no later tile
    touches it, so its Q is divided by its count, reduced to labels and dropped.
    Memory: K x tile x W floats for the sum of Q (the rows tiles still overlap), plus one window.
    """
    import torch

    from segflow.models.sliding import tile_origins
    from segflow.models.upsampled_argmax import WindowUpsampler

    height, width = rgb.shape[:2]
    tile, stride = tiles
    labels = np.empty((height, width), np.uint8)
    q_of = getattr(refiner, "refine_probabilities", None)
    upsampler = WindowUpsampler(logits, height, width)
    rows = tile_origins(height, tile, stride)
    band = max(y1 - y0 for y0, y1 in rows)
    total = torch.zeros((num_classes, band, width))  # Q summed over rows [start, start + band)
    count = torch.zeros((1, band, width))
    start = 0
    for index, (y0, y1) in enumerate(rows):
        for x0, x1 in tile_origins(width, tile, stride):
            window_rgb = rgb[y0:y1, x0:x1]
            window_probs = torch.softmax(upsampler.window(y0, y1, x0, x1), dim=0).numpy()
            if q_of is not None:
                q = torch.from_numpy(np.asarray(q_of(window_rgb, window_probs), dtype=np.float32))
            else:  # a kind without probabilities: its labels, one-hot, are averaged instead
                q = torch.nn.functional.one_hot(torch.from_numpy(refiner.refine(window_rgb, window_probs).astype(np.int64)), num_classes).permute(2, 0, 1).float()
            total[:, y0 - start : y1 - start, x0:x1] += q
            count[:, y0 - start : y1 - start, x0:x1] += 1
        done = rows[index + 1][0] if index + 1 < len(rows) else height
        if done > start:
            finished = done - start
            labels[start:done] = (total[:, :finished] / count[:, :finished]).argmax(0).numpy().astype(np.uint8)
            # the rows still open move to the top (a copy of only those), the rest start again from zero
            for summed in (total, count):
                still_open = summed[:, finished:].clone()
                summed[:, : still_open.shape[1]] = still_open
                summed[:, still_open.shape[1] :] = 0
            start = done
    return labels


def _nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels brought to (height, width) by nearest neighbour: only for kinds that give no probabilities."""
    if labels.shape == (height, width):
        return labels
    from PIL import Image

    return np.array(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST), dtype=np.uint8)
