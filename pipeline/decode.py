"""Image bytes -> correctly oriented (H, W, 3) uint8 RGB, or an ImageDecodeError that says why.

Every odd input a real collection holds is normalised here, once: EXIF orientation,
grayscale, palette, alpha, CMYK and 16-bit images. The pixel limit is checked from the
header, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segflow.errors import ImageDecodeError

# segflow enforces its own, configurable limit before decoding; PIL's global one would
# warn or raise with a message that does not name the file.
Image.MAX_IMAGE_PIXELS = None

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """Decode `data` (the bytes of `uri`) into a writable, C-contiguous (H, W, 3) uint8 array."""
    return _load(_open(data, uri, max_pixels), uri, data)


def decode_reduced(data: bytes, uri: str, max_pixels: int, long_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Like `decode_image`, but a JPEG larger than `long_side` may come out smaller, never below it.

    -> (upright pixels, (height, width) of the whole image after EXIF orientation). JPEG's
    DCT scaling (Pillow's `draft`) decodes 1/2, 1/4 or 1/8 of each side directly, so a
    45-megapixel photo meant for a 512-pixel working size never exists in memory at full
    size. The pixel limit applies to the true size. Other formats, and images whose long
    side is at most `long_side`, decode whole, exactly as `decode_image` does.
    """
    image = _open(data, uri, max_pixels)
    width, height = image.size  # as stored; EXIF orientation 5-8 swaps the axes
    try:
        swapped = image.getexif().get(ORIENTATION_TAG) in _ORIENTATION_SWAPS_AXES
    except Exception:  # unreadable EXIF: exif_transpose in _load ignores it too
        swapped = False
    if image.format == "JPEG" and max(width, height) > long_side:
        scale = long_side / max(width, height)
        image.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))  # keeps each side >= this
    return _load(image, uri, data), ((width, height) if swapped else (height, width))


ORIENTATION_TAG = 0x0112
_ORIENTATION_SWAPS_AXES = {5, 6, 7, 8}  # transposed or rotated by 90 degrees


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """The image's header, checked against the pixel limit; nothing decoded yet."""
    if not data:
        raise ImageDecodeError(uri, "empty file (0 bytes); re-export or remove it")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(uri, f"not an image: no known format in its first bytes {data[:8]!r} ({len(data)} bytes)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            uri,
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(decompression-bomb guard); raise --max-pixels if the image is genuine",
        )
    return image


def _load(image: Image.Image, uri: str, data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(uri, f"truncated or corrupt {image.format or 'image'} data ({len(data)} bytes): {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8; 16-bit is scaled (not clipped), alpha composited on white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        grey = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255 + 0.5
        return np.ascontiguousarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)
