"""Sliding-window inference: the network over overlapping tiles, their logits averaged.

mmsegmentation's `slide_inference` (mmseg/models/segmentors/encoder_decoder.py) lays a grid
of `tile` x `tile` crops `stride` apart, shifts the last crop of each row and column back
so it ends at the image's edge, runs the network on each crop, and divides the summed
logits by how many crops covered each pixel. Peak memory of the network is then that of
one tile, whatever the image's size.

segflow does the same with one difference: it sums each crop's *low-resolution* logits
(1/s of the crop, s the network's output stride) into a canvas of the image's
low-resolution size, instead of upsampling every crop to full resolution first. The
canvas is s^2 times smaller than mmseg's (K x H x W floats would be 2.1 GB at 48 Mpx);
the engine then upsamples it stripe by stripe like any network's logits
(models/stripes.py). For that, crop origins are moved down to a multiple of s (a crop is
then up to s - 1 pixels taller or wider than `tile`). Bilinear upsampling is linear, so
away from crop borders this equals mmseg's average of upsampled crops.
A tile covering the whole image is the plain forward.
"""

from __future__ import annotations

import math

import torch


def tile_origins(size: int, tile: int, stride: int, step: int = 1) -> list[tuple[int, int]]:
    """(start, end) of each crop along one axis: mmseg's grid, starts moved down to multiples of `step`."""
    count = max(size - tile + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + tile, size)
        start = max(end - tile, 0)
        start -= start % step
        if not spans or spans[-1] != (start, end):
            spans.append((start, end))
    return spans


def slide_logits(lowres_logits, x: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """(N, 3, H, W) images -> (N, K, h, w) logits averaged over overlapping tiles.

    `lowres_logits` is the network's (N, 3, H', W') -> (N, K, ceil(H'/s), ceil(W'/s)) function,
    given crops of `x` as they are (the engine passes uint8 pixels and normalises each crop,
    so the whole image never exists as floats).
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return lowres_logits(x)
    first = lowres_logits(x[..., : min(tile, height), : min(tile, width)])
    step = max(1, round(min(tile, height) / first.shape[-2]))  # the network's output stride
    canvas = first.new_zeros((*first.shape[:2], math.ceil(height / step), math.ceil(width / step)), dtype=torch.float32)
    count = first.new_zeros((1, 1, *canvas.shape[-2:]), dtype=torch.float32)
    for y0, y1 in tile_origins(height, tile, stride, step):
        for x0, x1 in tile_origins(width, tile, stride, step):
            out = first if (y0, x0, y1, x1) == (0, 0, min(tile, height), min(tile, width)) else lowres_logits(x[..., y0:y1, x0:x1])
            r, c = y0 // step, x0 // step
            h, w = min(out.shape[-2], canvas.shape[-2] - r), min(out.shape[-1], canvas.shape[-1] - c)
            canvas[..., r : r + h, c : c + w] += out[..., :h, :w].float()
            count[..., r : r + h, c : c + w] += 1
    return canvas / count
