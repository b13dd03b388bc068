"""A small image collection with every format, mode and kind of breakage segflow must handle.

`make_collection(root)` writes it and returns what each file should become:
{"good": {path: (height, width) after EXIF rotation}, "bad": {path: expected error stage}}.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_PIXEL_LIMIT = 200_000  # tests run with max_pixels=this; the "bomb" exceeds it


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """A street-like picture: sky gradient, grey road, a few coloured blocks."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = np.linspace(180, 240, h // 2, dtype=np.uint8)[:, None, None]
    img[h // 2 :] = (90, 90, 95)
    for _ in range(3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w - 8)
        img[y : y + h // 4, x : x + w // 6] = rng.integers(0, 255, 3)
    return np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)


def make_collection(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    good: dict[Path, tuple[int, int]] = {}
    bad: dict[Path, str] = {}

    def save(rel: str, image: Image.Image, size_hw: tuple[int, int], **kw) -> None:
        path = root / rel
        image.save(path, **kw)
        good[path] = size_hw

    save("a_rgb.jpg", Image.fromarray(_scene(48, 64, 1)), (48, 64), quality=90)
    save("b_rgb.png", Image.fromarray(_scene(48, 64, 2)), (48, 64))
    save("c_odd.webp", Image.fromarray(_scene(37, 53, 3)), (37, 53), lossless=True)
    save("d_rgb.bmp", Image.fromarray(_scene(48, 64, 4)), (48, 64))
    save("nested/e_rgb.tiff", Image.fromarray(_scene(40, 56, 5)), (40, 56))
    save("nested/f_grey.png", Image.fromarray(_scene(48, 64, 6)).convert("L"), (48, 64))
    save("nested/g_rgba.png", Image.fromarray(_scene(48, 64, 7)).convert("RGBA"), (48, 64))
    save("nested/h_palette.png", Image.fromarray(_scene(48, 64, 8)).convert("P"), (48, 64))
    sixteen = (_scene(48, 64, 9)[..., 0].astype(np.uint16) * 257)
    save("nested/deeper/i_16bit.png", Image.fromarray(sixteen), (48, 64))
    # EXIF orientation 6 (rotate 90 CW to display): stored 48x64, shown 64x48 (h x w = 64 x 48)
    rotated = Image.fromarray(_scene(48, 64, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6
    save("nested/deeper/j_exif_rotated.JPG", rotated, (64, 48), exif=exif.tobytes())

    (root / "x_empty.png").write_bytes(b"")
    bad[root / "x_empty.png"] = "decode"
    buf = io.BytesIO()
    Image.fromarray(_scene(96, 128, 11)).save(buf, format="JPEG", quality=95)
    (root / "x_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    bad[root / "x_truncated.jpg"] = "decode"
    (root / "x_not_an_image.png").write_text("this is a text file with an image extension\n")
    bad[root / "x_not_an_image.png"] = "decode"
    Image.new("1", (1000, 1000)).save(root / "x_bomb.png")  # 1 Mpx > BOMB_PIXEL_LIMIT, a few hundred bytes
    bad[root / "x_bomb.png"] = "decode"
    (root / "notes.txt").write_text("not listed: wrong extension\n")
    return {"good": good, "bad": bad}


def write_scene(path: Path, seed: int, size_hw: tuple[int, int] = (48, 64)) -> Path:
    """One plain street-like picture, in the format its suffix names (.bmp keeps a fixed size per shape)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_scene(*size_hw, seed)).save(path)
    return path


def write_scenes(root: Path, count: int, suffix: str = ".png", first_seed: int = 100) -> list[Path]:
    """`count` plain 48x64 pictures named img_00.png, img_01.png, ... (sorted = shard order)."""
    return [write_scene(root / f"img_{i:02d}{suffix}", first_seed + i) for i in range(count)]
