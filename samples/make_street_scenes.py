"""Render the sample street scenes shipped in samples/ (self-made, no third-party imagery).

    python samples/make_street_scenes.py

Draws sky, facades with windows, a road in perspective with lane marks, pavements,
trees, poles and cars, then adds blur and sensor noise. They are not photographs: they
exist so the README's first command has offline street-like input to segment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 480, 360


def render(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(img)
    horizon = int(HEIGHT * rng.uniform(0.42, 0.5))
    for y in range(horizon):  # sky: blue-grey gradient
        t = y / horizon
        draw.line([(0, y), (WIDTH, y)], fill=(int(150 + 60 * t), int(170 + 50 * t), int(200 + 30 * t)))
    x = 0
    while x < WIDTH:  # facades
        w = int(rng.integers(60, 140))
        top = int(rng.integers(40, horizon - 20))
        base = tuple(int(v) for v in rng.integers(90, 190, 3))
        draw.rectangle([x, top, x + w, horizon + 30], fill=base)
        for wy in range(top + 10, horizon + 10, 22):
            for wx in range(x + 8, x + w - 12, 20):
                draw.rectangle([wx, wy, wx + 10, wy + 12], fill=(40, 50, 60))
        x += w
    vanish = WIDTH // 2 + int(rng.integers(-40, 40))
    draw.polygon([(vanish - 15, horizon + 30), (vanish + 15, horizon + 30), (WIDTH + 120, HEIGHT), (-120, HEIGHT)], fill=(92, 88, 96))
    draw.polygon([(0, horizon + 30), (vanish - 15, horizon + 30), (-120, HEIGHT), (0, HEIGHT)], fill=(150, 140, 130))
    draw.polygon([(WIDTH, horizon + 30), (vanish + 15, horizon + 30), (WIDTH + 120, HEIGHT), (WIDTH, HEIGHT)], fill=(150, 140, 130))
    for i in range(6):  # lane marks
        t0, t1 = i / 6, (i + 0.5) / 6
        y0, y1 = horizon + 30 + t0 * (HEIGHT - horizon - 30), horizon + 30 + t1 * (HEIGHT - horizon - 30)
        draw.line([(vanish, y0), (vanish, y1)], fill=(230, 230, 220), width=max(1, int(1 + 5 * t1)))
    for _ in range(int(rng.integers(2, 4))):  # trees
        tx = int(rng.choice([rng.integers(10, vanish - 80), rng.integers(vanish + 80, WIDTH - 10)]))
        ty = horizon + int(rng.integers(20, 60))
        draw.rectangle([tx - 4, ty - 40, tx + 4, ty + 10], fill=(80, 60, 40))
        draw.ellipse([tx - 35, ty - 110, tx + 35, ty - 30], fill=(60, int(rng.integers(100, 140)), 50))
    for _ in range(2):  # poles
        px = int(rng.integers(20, WIDTH - 20))
        draw.rectangle([px - 2, horizon - 80, px + 2, horizon + 60], fill=(70, 70, 70))
    for _ in range(int(rng.integers(1, 4))):  # cars
        cy = int(rng.integers(horizon + 50, HEIGHT - 40))
        scale = (cy - horizon) / (HEIGHT - horizon)
        cw, ch = int(140 * scale), int(60 * scale)
        cx = int(rng.integers(0, WIDTH - cw))
        colour = tuple(int(v) for v in rng.integers(20, 220, 3))
        draw.rounded_rectangle([cx, cy - ch, cx + cw, cy], radius=max(2, ch // 5), fill=colour)
        draw.rectangle([cx + cw // 5, cy - ch - ch // 2, cx + 4 * cw // 5, cy - ch], fill=tuple(max(0, c - 40) for c in colour))
        for wx in (cx + cw // 6, cx + 5 * cw // 6):
            r = max(3, ch // 4)
            draw.ellipse([wx - r, cy - r, wx + r, cy + r], fill=(20, 20, 20))
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 4, (HEIGHT, WIDTH, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main() -> None:
    out = Path(__file__).parent / "street"
    out.mkdir(exist_ok=True)
    for seed in range(4):
        render(seed).save(out / f"street_{seed + 1:02d}.jpg", quality=88)


if __name__ == "__main__":
    main()
