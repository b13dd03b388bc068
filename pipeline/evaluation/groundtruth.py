"""Ground truth for `segflow evaluate`: pair images with label files, decode labels to class maps.

Pairing rule. Each file gets a key: its file name without the extension, then without
`pairing.image_suffix` (images) or `pairing.label_suffix` (labels) at the end. An image and a
label with the same key pair, wherever they sit under their two roots, because datasets lay
images and labels out differently (CamVid: `val/x.png` and `valannot/x.png`; Cityscapes:
`leftImg8bit/val/aachen/x_leftImg8bit.png` and `gtFine/val/aachen/x_gtFine_labelIds.png`).
Sub-directories matter only when a key is not unique on one side: then an image pairs with
the label whose directory, relative to the common directory of all labels, equals the image's
directory relative to the common directory of all images (`a/x.png` with `a/x.png`, `b/x.png`
with `b/x.png`). A file whose name lacks the configured suffix, whose key has no partner, or
whose match stays ambiguous is returned as unpaired, never dropped silently.

Label decoding. Every format ends as an (H, W) class map with void as the ignore index:
- "index": pixel values are classes (CamVid 8-bit PNGs, Cityscapes labelIds, 16-bit PNGs);
- "palette": the indices of a P-mode PNG are classes, the colours are not looked at
  (PASCAL VOC; its 255 border is void when ignore_index is 255, the default);
- "rgb": colour-coded PNGs decoded through `pairing.colors`; unknown colours become void.
Then `pairing.remap` (raw value -> class, e.g. Cityscapes labelIds -> trainIds) applies if
given; values it does not map become void. Any value left that is neither a class in [0, K)
nor the ignore index is an error: it means the options do not fit the data.
"""

from __future__ import annotations

import io
from collections import defaultdict

from dataclasses import replace

import numpy as np
from PIL import Image

from segflow.models.labels import LabelSet
from segflow.pipeline.config import LabelPairing
from segflow.errors import ConfigError, LabelError

FORMATS = ("index", "palette", "rgb")
DEFAULT_IGNORE = 255  # used when the pairing names no ignore index (VOC's and Cityscapes' void)
_INDEX_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def pair_images_with_labels(
    image_uris: list[str], label_uris: list[str], pairing: LabelPairing
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """-> (pairs of (image_uri, label_uri) in image order, unpaired images, unpaired labels).

    See the module docstring for the rule; the unpaired lists keep their input order.
    """
    images = _keyed(image_uris, pairing.image_suffix)
    labels = _keyed(label_uris, pairing.label_suffix)
    labels_by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for j, (key, reldir) in enumerate(labels):
        if key is not None:
            labels_by_key[key].append((j, reldir))
    images_by_key: dict[str, list[int]] = defaultdict(list)
    for i, (key, _) in enumerate(images):
        if key is not None:
            images_by_key[key].append(i)

    label_for: dict[int, int] = {}  # image index -> label index
    for key, image_ids in images_by_key.items():
        candidates = labels_by_key.get(key, [])
        if len(image_ids) == 1 and len(candidates) == 1:
            label_for[image_ids[0]] = candidates[0][0]
            continue
        # A key collision: fall back to the relative directory; only one-to-one matches pair.
        label_dirs: dict[str, list[int]] = defaultdict(list)
        for j, reldir in candidates:
            label_dirs[reldir].append(j)
        image_dirs: dict[str, list[int]] = defaultdict(list)
        for i in image_ids:
            image_dirs[images[i][1]].append(i)
        for reldir, same_dir in image_dirs.items():
            if len(same_dir) == 1 and len(label_dirs.get(reldir, [])) == 1:
                label_for[same_dir[0]] = label_dirs[reldir][0]

    pairs = [(image_uris[i], label_uris[label_for[i]]) for i in range(len(image_uris)) if i in label_for]
    used = set(label_for.values())
    unpaired_images = [uri for i, uri in enumerate(image_uris) if i not in label_for]
    unpaired_labels = [uri for j, uri in enumerate(label_uris) if j not in used]
    return pairs, unpaired_images, unpaired_labels


def decode_label(data: bytes, uri: str, pairing: LabelPairing, num_classes: int) -> np.ndarray:
    """PNG bytes -> (H, W) class map: uint8 (int32 if a class or the ignore index exceeds 255).

    Void is `pairing.ignore_index` (255 when None). Raises LabelError naming `uri` when the
    bytes are not an image, the image mode does not suit the format, or a value is neither a
    class nor void; ConfigError when the pairing options themselves are unusable.
    """
    ignore = check_pairing(pairing, num_classes)
    if not data:
        raise LabelError(uri, "label file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        raise LabelError(uri, f"label image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise LabelError(uri, f"not a decodable label image ({exc}); labels must be PNG files") from None

    # Internally int32 with -1 for "void so far", so remapping cannot confuse void with a class.
    if pairing.format == "rgb":
        values = _decode_colours(image, pairing.colors)
    else:
        values = _decode_indices(image, pairing.format, uri)
    if pairing.remap:
        values = _remap(values, pairing.remap)
    values = np.where(values < 0, ignore, values)

    stray = (values >= num_classes) & (values != ignore)
    if stray.any():
        found = np.unique(values[stray])[:8].tolist()
        raise LabelError(uri, f"label values {found} are neither classes 0..{num_classes - 1} nor the ignore index {ignore}; "
                         "set the ignore index if they mark void, or a remap table (e.g. Cityscapes labelIds -> trainIds)")
    dtype = np.uint8 if max(ignore, num_classes - 1) <= 255 else np.int32
    return values.astype(dtype)


def with_label_set_defaults(pairing: LabelPairing, label_set: LabelSet) -> LabelPairing:
    """Fill an unset ignore index from the label set (CamVid: 11), else 255.

    Call this once per job and pass the result's `ignore_index` to `metrics.image_metrics`
    too, so that decoding and scoring agree on which value is void.
    """
    if pairing.ignore_index is not None:
        return pairing
    ignore = label_set.ignore_index if label_set.ignore_index is not None else DEFAULT_IGNORE
    return replace(pairing, ignore_index=ignore)


def check_pairing(pairing: LabelPairing, num_classes: int) -> int:
    """Validate the decode options once; -> the ignore index to use. Raises ConfigError with the fix."""
    if pairing.format not in FORMATS:
        raise ConfigError(f"label format must be one of {', '.join(FORMATS)}, got {pairing.format!r}")
    ignore = DEFAULT_IGNORE if pairing.ignore_index is None else pairing.ignore_index
    if 0 <= ignore < num_classes:
        raise ConfigError(f"ignore index {ignore} is one of the {num_classes} classes; void needs a value >= {num_classes}")
    if pairing.format == "rgb":
        if not pairing.colors:
            raise ConfigError("label format rgb needs a colour table mapping (r, g, b) to class ids")
        seen: dict[tuple[int, int, int], int] = {}
        for colour, cls in pairing.colors:
            colour = tuple(colour)
            if seen.get(colour, cls) != cls:
                raise ConfigError(f"colour table maps {colour} to both {seen[colour]} and {cls}")
            seen[colour] = cls
    if any(src < 0 for src, _ in pairing.remap):
        raise ConfigError(f"remap table keys must be >= 0, got {sorted(s for s, _ in pairing.remap if s < 0)}")
    return ignore


def _decode_indices(image: Image.Image, fmt: str, uri: str) -> np.ndarray:
    modes = ("P", "L") if fmt == "palette" else _INDEX_MODES
    if image.mode not in modes:
        rgb = image.mode in ("RGB", "RGBA")
        hint = "use the rgb label format with a colour table" if rgb else "save the labels as 8-bit PNGs"
        raise LabelError(uri, f"{fmt} labels must be single-channel ({'/'.join(modes)}) PNGs, "
                         f"but this one is {image.mode}; {hint}")
    values = np.asarray(image).astype(np.int32)
    if values.min(initial=0) < 0:
        raise LabelError(uri, f"label holds negative value {int(values.min())}")
    return values


def _decode_colours(image: Image.Image, colours) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(int(r) << 16) | (int(g) << 8) | int(b): int(cls) for (r, g, b), cls in colours}
    keys = np.array(sorted(table), dtype=np.int32)
    classes = np.array([table[k] for k in keys], dtype=np.int32)
    at = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    return np.where(keys[at] == codes, classes[at], -1)


def _remap(values: np.ndarray, remap) -> np.ndarray:
    size = max(max(src for src, _ in remap), int(values.max(initial=0))) + 1
    lut = np.full(size, -1, dtype=np.int32)
    for src, dst in remap:
        lut[src] = dst
    return np.where(values >= 0, lut[np.maximum(values, 0)], -1)


def _keyed(uris: list[str], suffix: str) -> list[tuple[str | None, str]]:
    """-> per uri (key or None when the suffix is missing, directory relative to the common one)."""
    parts = [uri.split("/") for uri in uris]
    common = _common_prefix([p[:-1] for p in parts])
    out = []
    for p in parts:
        name = p[-1]
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        if suffix:
            stem = stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else None
        out.append((stem, "/".join(p[common:-1])))
    return out


def _common_prefix(dirs: list[list[str]]) -> int:
    if not dirs:
        return 0
    n = min(len(d) for d in dirs)
    for i in range(n):
        if any(d[i] != dirs[0][i] for d in dirs):
            return i
    return n
