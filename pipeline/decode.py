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
