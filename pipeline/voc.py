"""The review queue as a PASCAL VOC segmentation dataset, for annotation tools (`segflow review --export voc`).

    VOC/
      JPEGImages/<id>.jpg            the image, EXIF orientation applied (the masks' orientation)
      SegmentationClass/<id>.png     the mask as a palette PNG: index = class id, colour = the label set's
      labelmap.txt                   `name:r,g,b::` per class, in class order (CVAT's and Datumaro's format)
      ImageSets/Segmentation/default.txt   the ids, in queue order
      colors.json                    colour -> class id, for `segflow evaluate --label-format rgb --colors`

CVAT imports this as "Segmentation mask 1.1" (zip the folder's contents), so the masks arrive
as pre-annotations to correct. `<id>` is the image's path relative to the queued images'
common folder, without extension, so a label keeps its image's file stem: corrected labels
pair with the original images in `segflow evaluate IMAGES VOC/SegmentationClass OUT
--label-format palette` (palette PNGs, as written here) and `segflow train`. Tools that
export colour-coded RGB masks instead (CVAT does) come back with `--label-format rgb --colors
"$(cat VOC/colors.json)"`; their unlabelled black background then reads as void.
"""

from __future__ import annotations

import io
import json
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from segflow.errors import InputError
from segflow.models.labels import LabelSet
from segflow.pipeline.decode import decode_image
from segflow.pipeline.evaluation.gallery import read_mask_rows
from segflow.pipeline.masks import decode_mask, encode_mask
from segflow.pipeline.storage import commit_file, redact

EXIF_ORIENTATION = 0x0112
BACKGROUND = "background"  # CVAT's name for unlabelled pixels, colour (0, 0, 0)


def export_voc(queue: pa.Table, output: str, dest: str, labels: LabelSet, storage_options: dict | None = None) -> list[str]:
    """Write the queued images and their masks under `dest` in the layout above; -> the item ids, in queue order.

    Raises InputError when two classes share a colour (an annotation tool could not tell them
    apart) or a queued image has no mask row or cannot be read.
    """
    options = storage_options or {}
    check_palette(labels)
    uris = queue.column("uri").to_pylist()
    ids = item_ids(uris)
    masks = read_mask_rows(output, set(uris), options)
    base = dest.rstrip("/")
    for uri, item in zip(uris, ids):
        if uri not in masks:
            raise InputError(f"{redact(uri)}: no row in {redact(output)}/masks; rerun `segflow review` on the current output")
        mask = decode_mask(masks[uri]["mask"])
        jpeg, size = _jpeg(uri, options)
        if size != mask.shape[::-1]:
            raise InputError(f"{redact(uri)}: the image is {size[0]}x{size[1]} but its mask {mask.shape[1]}x{mask.shape[0]}; "
                             "it changed since it was segmented: rerun `segflow segment` first")
        commit_file(f"{base}/JPEGImages/{item}.jpg", jpeg, storage_options=options)
        commit_file(f"{base}/SegmentationClass/{item}.png", encode_mask(mask, labels.flat_palette()), storage_options=options)
    commit_file(f"{base}/labelmap.txt", labelmap(labels).encode(), storage_options=options)
    commit_file(f"{base}/ImageSets/Segmentation/default.txt", "".join(f"{i}\n" for i in ids).encode(), storage_options=options)
    colours = {",".join(map(str, rgb)): c for c, rgb in enumerate(labels.palette)}
    commit_file(f"{base}/colors.json", json.dumps(colours, indent=1).encode(), storage_options=options)
    return ids


def labelmap(labels: LabelSet) -> str:
    """labelmap.txt: one `name:r,g,b::` line per class in class order, after CVAT's header line.

    Datumaro (CVAT's importer) reads masks by colour and always keeps a black label for
    unlabelled pixels; when no class is black, a `background` line says so explicitly.
    """
    lines = ["# label:color_rgb:parts:actions"]
    if (0, 0, 0) not in [tuple(c) for c in labels.palette]:
        lines.append(f"{BACKGROUND}:0,0,0::")
    lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in zip(labels.classes, labels.palette)]
    return "\n".join(lines) + "\n"


def check_palette(labels: LabelSet) -> None:
    seen: dict[tuple, str] = {}
    for name, colour in zip(labels.classes, labels.palette):
        if tuple(colour) in seen:
            raise InputError(f"label set {labels.name!r}: classes {seen[tuple(colour)]!r} and {name!r} share the colour "
                             f"{tuple(colour)}; an annotation tool reading masks by colour could not tell them apart")
        seen[tuple(colour)] = name


def item_ids(uris: list[str]) -> list[str]:
    """Each uri's path relative to the uris' common folder, without extension (`seq1/0001`).

    Keeps file stems (what `segflow evaluate` pairs labels by) and keeps apart images of the
    same name in different folders; two files differing only in extension get `-2`, `-3`.
    """
    paths = [fsspec.core.split_protocol(u)[1] for u in uris]
    try:
        common = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    ids, taken = [], set()
    for p in paths:
        item = posixpath.splitext(posixpath.relpath(p, common) if common else p.lstrip("/"))[0]
        unique, n = item, 1
        while unique in taken:  # x.png and x.jpg side by side: the second becomes x-2
            n += 1
            unique = f"{item}-{n}"
        taken.add(unique)
        ids.append(unique)
    return ids


def _jpeg(uri: str, options: dict) -> tuple[bytes, tuple[int, int]]:
    """The image as JPEG bytes with its orientation applied, and its (width, height).

    A JPEG with no EXIF rotation is copied as is (no second compression); anything else is
    decoded the way segflow decodes it for the model and saved at quality 95.
    """
    try:
        with fsspec.open(uri, "rb", **options) as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{redact(uri)}: cannot read the image ({exc}); is it still there?") from None
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return data, image.size
    rgb = decode_image(data, uri, max_pixels=np.iinfo(np.int64).max)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), (rgb.shape[1], rgb.shape[0])
