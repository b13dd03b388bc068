"""Bilinear upsampling to a large size in horizontal stripes, bit-identical to the one-shot call.

`F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)` on a (K, h, w)
array materialises K x H x W floats: 2.1 GB for 11 classes at 48 Mpx. Every output row
only depends on two input rows, so the result can be produced a stripe of rows at a time
and reduced (argmax, confidence, counts) before the next stripe.

Exactness: torch's CPU kernel computes each output as `a * w0 + (b * w1)` with the
first product fused (one rounding, FMA) and the source coordinate as `scale * (y + 0.5)
- 0.5`, also fused. `upsample_rows` lets torch do the horizontal pass itself (a pass whose
row weights are exactly 1 and 0 returns the horizontally interpolated rows unchanged) and
reproduces the vertical pass with those roundings (`torch.addcmul` fuses its product the
same way; an unfused `a * w0 + b * w1` differs in the last bit on ~1 value in 5). tests/test_large_images.py checks
equality with the one-shot call on several sizes, so a torch whose kernel rounds
differently fails there rather than changing masks silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

STRIPE_ELEMENTS = 4_000_000  # floats per stripe (16 MB): K x rows x W


def row_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) source rows i0, i1 and weights l0, l1 for each output row."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)  # fused multiply-add: one rounding
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    l0 = (np.float32(1) - l1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, l0, l1


def stripe_rows(channels: int, width: int, elements: int = STRIPE_ELEMENTS) -> int:
    """Output rows per stripe so a stripe of `channels` x rows x `width` floats stays near `elements`."""
    return max(1, elements // max(1, channels * width))


def upsample_rows(
    x: torch.Tensor, height: int, width: int, rows: int | None = None, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(K, h, w) float32 -> (row0, (K, r, W) stripe) pairs covering output rows [start, stop) in order.

    The concatenated stripes equal `F.interpolate(x[None], (height, width), "bilinear")[0][:, start:stop]` exactly.
    """
    x = x.float().contiguous()
    channels, in_h, _ = x.shape
    rows = rows or stripe_rows(channels, width)
    stop = height if stop is None else stop
    if height + width <= 256 or in_h < 2:
        # torch takes another kernel for tiny outputs (and any slab of one row looks channels-last to it)
        full = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        for r0 in range(start, stop, rows):
            yield r0, full[:, r0 : min(stop, r0 + rows)]
        return
    i0, i1, l0, l1 = row_weights(in_h, height)
    for r0 in range(start, stop, rows):
        r1 = min(stop, r0 + rows)
        lo = int(i0[r0])
        hi = max(int(i1[r1 - 1]) + 1, lo + 2)  # >= 2 rows: see above
        if hi > in_h:
            lo, hi = in_h - 2, in_h
        slab = x[:, lo:hi]
        # height unchanged: row weights exactly 1 and 0, so these are torch's own horizontal values
        horizontal = F.interpolate(slab[None], size=(hi - lo, width), mode="bilinear", align_corners=False)[0]
        a = horizontal[:, torch.from_numpy(i0[r0:r1] - lo)]
        b = horizontal[:, torch.from_numpy(i1[r0:r1] - lo)]
        w0 = torch.from_numpy(l0[r0:r1])[None, :, None]
        w1 = torch.from_numpy(l1[r0:r1])[None, :, None]
        b.mul_(w1)
        yield r0, torch.addcmul(b, a, w0.expand_as(a))  # a * w0 + b * w1 with the first product fused, as torch's kernel


class MaskAccumulator:
    """Labels, per-class counts and confidence statistics gathered stripe by stripe.

    `add_logits` takes logits (the top softmax probability is computed from them without a
    K x rows x W softmax), `add_probabilities` takes probabilities; both take the argmax
    with ties going to the first class, as `probs.argmax(0)` does.
    """

    def __init__(self, height: int, width: int, num_classes: int):
        self.labels = np.empty((height, width), np.uint8)
        self.counts = np.zeros(num_classes, np.int64)
        self.num_classes = num_classes
        self._confidence_sum = 0.0
        self._confidence_min = np.inf

    def add_logits(self, row0: int, logits: torch.Tensor) -> None:
        top, labels = max_and_argmax(logits)
        # top softmax probability = 1 / sum_k exp(l_k - max), one class at a time (no K x rows x W temporary)
        total = torch.zeros_like(top)
        for c in range(logits.shape[0]):
            total += torch.exp(logits[c] - top)
        self._store(row0, labels, total.reciprocal_())

    def add_probabilities(self, row0: int, probs: torch.Tensor, confidence: bool = False) -> None:
        top, labels = max_and_argmax(probs)
        self._store(row0, labels, top if confidence else None)

    def _store(self, row0: int, labels: np.ndarray, confidence: torch.Tensor | None) -> None:
        out = self.labels[row0 : row0 + labels.shape[0]]
        out[...] = labels
        self.counts += class_counts(out, self.num_classes)
        if confidence is not None:
            self._confidence_sum += float(confidence.sum(dtype=torch.float64))
            self._confidence_min = min(self._confidence_min, float(confidence.min()))

    @property
    def mean_confidence(self) -> float:
        return self._confidence_sum / self.labels.size

    @property
    def min_confidence(self) -> float:
        return float(self._confidence_min)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class of a uint8 mask, (num_classes,) int64.

    torch's bincount reads the uint8 labels as they are; numpy's first converts them to
    int64 (8 bytes a pixel): 0.1 against 1.1 s at 48 Mpx on one core here.
    """
    counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)).reshape(-1), minlength=num_classes)
    return counts[:num_classes].numpy().astype(np.int64)


def max_and_argmax(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(K, r, W) -> max over K and its argmax as uint8, ties to the first class (as numpy's argmax).

    One class at a time, like segflow.models.probabilities.labels_and_confidence: torch's
    and numpy's reductions over the leading axis are their slow case (~5x here).
    """
    best = x[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, x.shape[0]):
        better = x[c] > best
        labels.masked_fill_(better, c)
        torch.maximum(best, x[c], out=best)
    return best, labels.numpy()
