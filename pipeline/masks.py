"""Masks as lossless palette PNGs: small in Parquet, and they open in any image viewer."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_mask(mask: np.ndarray, flat_palette: list[int]) -> bytes:
    """(H, W) uint8 class ids -> PNG bytes in palette ("P") mode, coloured by `flat_palette`."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(flat_palette)
    buffer = io.BytesIO()
    # Level 1 is ~3x faster than the default and masks still compress ~20x: they are flat.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_mask(png: bytes) -> np.ndarray:
    """PNG bytes from `encode_mask` -> (H, W) uint8 class ids (the palette indices)."""
    image = Image.open(io.BytesIO(png))
    if image.mode != "P" and image.mode != "L":
        raise ValueError(f"not a class-index mask PNG (mode {image.mode})")
    return np.array(image, dtype=np.uint8)
