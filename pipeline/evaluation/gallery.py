"""The report's gallery: for a few images, the photo and its ground truth, raw and CRF masks overlaid.

Only the rows of the images shown are read: OUTPUT/masks/ is scanned file by file on its
`uri` column alone, and a file's mask columns are read only if it holds a wanted uri, so the
cost is a handful of shard files however large the run. Images and labels are read from
their own URIs. A panel that cannot be built carries the reason instead of failing the report.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image

from segflow.models.labels import LabelSet
from segflow.pipeline.config import LabelPairing
from segflow.errors import SegflowError
from segflow.pipeline.evaluation.groundtruth import decode_label
from segflow.pipeline.storage import filesystem_for, read_bytes

OVERLAY_ALPHA = 0.55  # mask colour weight: enough to read the class, enough photo to see the edge
VOID_DIM = 0.35  # void pixels show the photo darkened, so "not scored" reads as absence of colour


@dataclass
class Panel:
    """One picture of a gallery row: a JPEG data URI, or the reason there is none."""

    title: str
    data_uri: str | None = None
    note: str | None = None


@dataclass
class GalleryRow:
    uri: str
    label_uri: str | None
    raw_miou: float | None
    crf_miou: float | None
    panels: list[Panel] = field(default_factory=list)


def read_mask_rows(output_url: str, uris: set[str], storage_options: dict | None = None) -> dict[str, dict]:
    """-> {uri: {"mask": PNG bytes, "raw_mask": PNG bytes or None}} for the wanted uris found in OUTPUT/masks/."""
    fs, root = filesystem_for(output_url, storage_options)
    path = f"{root.rstrip('/')}/masks"
    found: dict[str, dict] = {}
    if not uris or not fs.isdir(path):
        return found
    wanted = sorted(uris)
    for fragment in ds.dataset(path, filesystem=fs, format="parquet").get_fragments():
        if len(found) == len(uris):
            break
        names = fragment.physical_schema.names
        here = fragment.to_table(columns=["uri"]).column("uri")
        if not pc.any(pc.is_in(here, value_set=pa.array(wanted, pa.string()))).as_py():
            continue
        columns = ["uri", "mask"] + (["raw_mask"] if "raw_mask" in names else [])
        table = fragment.to_table(columns=columns, filter=pc.field("uri").isin(wanted))
        for row in table.to_pylist():
            found.setdefault(row["uri"], {"mask": row["mask"], "raw_mask": row.get("raw_mask")})
    return found


def build_gallery(
    output_url: str,
    images: list[dict],
    label_set: LabelSet,
    pairing: LabelPairing | None = None,
    storage_options: dict | None = None,
    thumb_width: int = 320,
) -> list[GalleryRow]:
    """Rows of summary["worst_images"] / ["best_images"] -> gallery rows of four panels each:
    image | ground truth | raw | CRF, masks overlaid on the image in the label set's palette."""
    options = storage_options or {}
    pairing = pairing or LabelPairing(labels="", ignore_index=label_set.ignore_index)
    masks = read_mask_rows(output_url, {r["uri"] for r in images}, options)
    palette = np.array(label_set.palette, dtype=np.float32)
    out = []
    for r in images:
        row = GalleryRow(r["uri"], r.get("label_uri"), r.get("raw_miou"), r.get("crf_miou"))
        photo, why = read_rgb(r["uri"], options)
        photo_small = None
        if photo is not None:
            size = thumb_size(photo.shape[1::-1], thumb_width)
            photo_small = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))
        row.panels.append(image_panel("image", photo_small, why))

        label, why = _read_label(r.get("label_uri"), pairing, label_set.num_classes, options)
        row.panels.append(image_panel("ground truth", overlay(photo_small, label, palette, thumb_width), why))

        stored = masks.get(r["uri"])
        if stored is None:
            row.panels += [Panel("raw", note="no row in masks/"), Panel("CRF", note="no row in masks/")]
        elif stored.get("raw_mask") is None:  # the CRF did not run: `mask` is the raw mask
            row.panels += [_mask_panel("raw", stored["mask"], photo_small, palette, thumb_width), Panel("CRF", note="CRF off")]
        else:
            row.panels += [_mask_panel("raw", stored["raw_mask"], photo_small, palette, thumb_width),
                           _mask_panel("CRF", stored["mask"], photo_small, palette, thumb_width)]
        out.append(row)
    return out


def read_rgb(uri: str, options: dict) -> tuple[np.ndarray | None, str | None]:
    try:  # storage.read_bytes: retried, and its errors redact the URL
        return np.asarray(Image.open(io.BytesIO(read_bytes(uri, options))).convert("RGB")), None
    except (OSError, ValueError, Image.DecompressionBombError, SegflowError) as exc:
        return None, f"image unreadable: {exc}"


def _read_label(uri: str | None, pairing: LabelPairing, num_classes: int, options: dict) -> tuple[np.ndarray | None, str | None]:
    if not uri:
        return None, "no label uri in metrics"
    try:
        return decode_label(read_bytes(uri, options), uri, pairing, num_classes), None
    except (OSError, SegflowError) as exc:
        return None, f"label unreadable: {exc}"


def _mask_panel(title: str, png: bytes, photo: np.ndarray | None, palette: np.ndarray, width: int) -> Panel:
    try:
        classes = np.asarray(Image.open(io.BytesIO(png)))
    except (OSError, ValueError) as exc:
        return Panel(title, note=f"mask unreadable: {exc}")
    return image_panel(title, overlay(photo, classes, palette, width), None)


def overlay(photo: np.ndarray | None, classes: np.ndarray | None, palette: np.ndarray, width: int) -> np.ndarray | None:
    """(h, w, 3) uint8 thumbnail and (H, W) class map -> (h, w, 3) uint8 with the classes' colours blended in.

    The class map is resized (nearest) to the thumbnail. Values outside the palette (void)
    leave the photo darkened. Without a photo the colours are drawn on mid grey, `width` px wide.
    """
    if classes is None:
        return None
    size = (photo.shape[1], photo.shape[0]) if photo is not None else thumb_size(classes.shape[::-1], width)
    small = np.asarray(Image.fromarray(classes.astype(np.int32)).resize(size, Image.NEAREST))
    base = photo.astype(np.float32) if photo is not None else np.full((size[1], size[0], 3), 128, np.float32)
    known = (small >= 0) & (small < len(palette))
    colours = palette[np.where(known, small, 0)]
    blended = np.where(known[..., None], base * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA, base * VOID_DIM)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def image_panel(title: str, rgb: np.ndarray | None, why: str | None) -> Panel:
    if rgb is None:
        return Panel(title, note=why or "not available")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return Panel(title, data_uri="data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))


def thumb_size(size: tuple[int, int], width: int) -> tuple[int, int]:
    w, h = size
    return width, max(1, round(h * width / w))
