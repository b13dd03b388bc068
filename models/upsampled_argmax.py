"""The argmax of a bilinear upsampling, exactly, without upsampling every pixel.

A photo run at the working size (pipeline/resize.py) has its logits and the CRF's
probabilities at ~0.2 Mpx, and its masks at the photo's size: 48 Mpx. Upsampling K
classes to every pixel and taking the argmax (models/stripes.py) cost ~95 % of such an
image's time, though almost every pixel lies in a flat region whose label is obvious.

Why a block can be decided from its corners: inside one source cell (the output pixels
between the same two source rows and the same two source columns) every class's
upsampled value is a bilinear function of the pixel's interpolation weights, and those
weights grow monotonically across the cell. The difference of two classes is then
bilinear too, and a bilinear function on a rectangle takes its minimum at a corner. So if
the four corner pixels of a rectangle inside one cell have the same top class, each by a
margin above rounding, every pixel inside has it.

The algorithm:
1. sample rows and columns: every `SAMPLE_STEP`-th one, plus the first and last of each
   source cell, so that no rectangle between neighbouring samples has interior pixels
   in two cells;
2. the exact upsampled values at the sample grid (torch's own arithmetic, as in
   models/stripes.py), their argmax and top-two margin;
3. every rectangle whose four corners agree with a margin takes that label; the others
   (near class boundaries, a few % of the pixels) are computed exactly, pixel by pixel.

The result equals `upsample_rows` followed by argmax bit for bit (tests/test_large_images.py),
at a fraction of the work when the upsampling factor is large.
"""

from __future__ import annotations

import numpy as np
import torch

from segflow.models.stripes import MaskAccumulator, max_and_argmax, row_weights, upsample_rows

SAMPLE_STEP = 8  # output pixels between sample rows (and columns) inside a source cell
MIN_FACTOR = 4  # below this upsampling factor the plain stripes are as fast
SAMPLE_ROWS_PER_BATCH = 64  # sample rows whose values are held at once (K x 64 x samples floats)
CELLS_PER_BATCH = 4096  # sample cells computed exactly at once (K x 64 floats each)
RELATIVE_MARGIN = 1e-5  # a corner's top-two gap must exceed this x max |value|: far above float32 rounding


def upsampled_argmax(x: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, h, w) float32 -> (labels, counts): the argmax over K of the bilinear upsampling, as (height, width)
    uint8, and its pixels per class, (K,) int64.

    Exactly `F.interpolate(x[None], (height, width), mode="bilinear", align_corners=False)[0].argmax(0)`
    (ties to the first class); memory: the labels, the sample grid and a batch of its values.
    """
    x = x.float().contiguous()
    classes, in_h, in_w = x.shape
    if classes < 2:
        return np.zeros((height, width), np.uint8), np.array([height * width] * classes, np.int64)
    if height < MIN_FACTOR * in_h or width < MIN_FACTOR * in_w or height + width <= 256 or min(in_h, in_w) < 2:
        return _by_stripes(x, height, width)
    rows, cols = _Axis(in_h, height), _Axis(in_w, width)
    margin = RELATIVE_MARGIN * max(1.0, float(x.abs().max()))

    # 2. exact values at the sample grid
    # (K, h, samples): every source row at the sample columns; gathered as rows of a transposed copy
    # (a gather along the last axis is ~10x slower)
    at_sample_columns = cols.interpolate(x.transpose(1, 2).contiguous(), cols.samples, dim=1).transpose(1, 2).contiguous()
    sample_labels = np.empty((len(rows.samples), len(cols.samples)), np.uint8)
    sample_clear = np.empty(sample_labels.shape, bool)
    for start in range(0, len(rows.samples), SAMPLE_ROWS_PER_BATCH):
        stop = min(len(rows.samples), start + SAMPLE_ROWS_PER_BATCH)
        values = rows.interpolate(at_sample_columns, rows.samples[start:stop], dim=1)
        top2 = torch.topk(values, 2, dim=0).values  # the margin only: topk's order among ties is unspecified
        sample_labels[start:stop] = max_and_argmax(values)[1]
        sample_clear[start:stop] = ((top2[0] - top2[1]) > margin).numpy()
    del at_sample_columns

    # 3. rectangles decided by their corners (each sample's label fills its spans) ...
    settled = _corners_agree(sample_labels, sample_clear)
    out = np.repeat(np.repeat(sample_labels, rows.spans, axis=0), cols.spans, axis=1)
    area = rows.spans[:, None] * cols.spans[None, :]
    counts = np.bincount(sample_labels.ravel(), weights=area.ravel(), minlength=classes).astype(np.int64)
    # ... and the others computed pixel by pixel
    rows_of, cols_of = np.nonzero(~settled)
    corners = x.permute(1, 2, 0).contiguous()  # (h, w, K): a gather then copies K floats at once
    flat = out.reshape(-1)  # a view: writes land in `out`
    for first in range(0, len(rows_of), CELLS_PER_BATCH):
        a, c = rows_of[first : first + CELLS_PER_BATCH], cols_of[first : first + CELLS_PER_BATCH]
        index, labels = _cells_exactly(corners, rows, cols, a, c)
        counts -= np.bincount(flat[index], minlength=classes)[:classes]
        counts += np.bincount(labels, minlength=classes)[:classes]
        flat[index] = labels
    return out, counts


class _Axis:
    """One axis of the upsampling: torch's source indices and weights, the samples, and their spans."""

    def __init__(self, in_size: int, out_size: int):
        self.i0, self.i1, self.w0, self.w1 = row_weights(in_size, out_size)
        new_cell = np.flatnonzero(np.diff(self.i0)) + 1
        cell_start = np.zeros(out_size, np.int64)
        cell_start[new_cell] = new_cell
        np.maximum.accumulate(cell_start, out=cell_start)
        position = np.arange(out_size)
        inside = (position - cell_start) % SAMPLE_STEP == 0  # each cell's first pixel, then every SAMPLE_STEP-th
        last = np.append(new_cell - 1, out_size - 1)  # each cell's last pixel
        self.samples = np.union1d(position[inside], last)
        # each sample owns the pixels up to the next sample (the last one: itself); never two cells
        self.spans = np.diff(np.append(self.samples, out_size))

    def interpolate(self, x: torch.Tensor, positions: np.ndarray, dim: int, first_source: int = 0) -> torch.Tensor:
        """x interpolated along `dim` at output `positions`: torch's kernel's `a * w0 + (b * w1)`, first product fused.

        `x` may start at source index `first_source` along `dim` (a slab of the source).
        The same arithmetic for rows and columns; tests/test_large_images.py pins it to torch's one-shot call.
        """
        index0 = torch.from_numpy(self.i0[positions] - first_source)
        index1 = torch.from_numpy(self.i1[positions] - first_source)
        shape = [1] * x.dim()
        shape[dim] = len(positions)
        w0 = torch.from_numpy(self.w0[positions]).reshape(shape)
        w1 = torch.from_numpy(self.w1[positions]).reshape(shape)
        a = x.index_select(dim, index0)
        b = x.index_select(dim, index1).mul_(w1)
        return torch.addcmul(b, a, w0.expand_as(a))


class WindowUpsampler:
    """Windows of the bilinear upsampling of (K, h, w) to (height, width), each computed alone.

    `window(y0, y1, x0, x1)` equals `F.interpolate(x[None], (height, width), "bilinear")[0][:, y0:y1, x0:x1]`
    exactly, from the few source rows and columns under it: a sliding-window refinement
    at full resolution then holds one window's probabilities, not a band across the image.
    """

    def __init__(self, x: torch.Tensor, height: int, width: int):
        self.x = x.float().contiguous()
        self.rows, self.cols = _Axis(x.shape[1], height), _Axis(x.shape[2], width)
        self.whole = None
        if height + width <= 256 or min(x.shape[1:]) < 2:  # torch's kernel for tiny outputs rounds otherwise
            self.whole = torch.cat([s for _, s in upsample_rows(self.x, height, width)], 1)

    def window(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[:, y0:y1, x0:x1]
        lo, hi = int(self.rows.i0[y0]), int(self.rows.i1[y1 - 1]) + 1
        slab = self.x[:, lo:hi].transpose(1, 2).contiguous()  # (K, w, r): columns gathered as rows
        across = self.cols.interpolate(slab, np.arange(x0, x1), dim=1).transpose(1, 2).contiguous()  # (K, r, x1 - x0)
        return self.rows.interpolate(across, np.arange(y0, y1), dim=1, first_source=lo)


def _cells_exactly(corners: torch.Tensor, rows: _Axis, cols: _Axis, a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact labels of the pixels owned by sample cells (a, c): (flat pixel indices, labels).

    A sample cell lies inside one source cell, so its pixels share four source pixels; each
    pixel's value is torch's two passes over them (as `_Axis.interpolate`), its own weights.
    Cells are padded to SAMPLE_STEP x SAMPLE_STEP pixels; the padding is dropped at the end.
    """
    steps = np.arange(SAMPLE_STEP)
    y = rows.samples[a][:, None] + steps  # (N, S) output rows, valid below each span
    x = cols.samples[c][:, None] + steps
    y_ok = steps < rows.spans[a][:, None]
    x_ok = steps < cols.spans[c][:, None]
    y, x = np.where(y_ok, y, rows.samples[a][:, None]), np.where(x_ok, x, cols.samples[c][:, None])
    i0, i1 = torch.from_numpy(rows.i0[y[:, 0]]), torch.from_numpy(rows.i1[y[:, 0]])
    j0, j1 = torch.from_numpy(cols.i0[x[:, 0]]), torch.from_numpy(cols.i1[x[:, 0]])
    wx0 = torch.from_numpy(cols.w0[x])[:, :, None]  # (N, S, 1)
    wx1 = torch.from_numpy(cols.w1[x])[:, :, None]
    top = torch.addcmul(corners[i0, j1][:, None] * wx1, corners[i0, j0][:, None].expand(-1, SAMPLE_STEP, -1), wx0)
    bottom = torch.addcmul(corners[i1, j1][:, None] * wx1, corners[i1, j0][:, None].expand(-1, SAMPLE_STEP, -1), wx0)
    wy0 = torch.from_numpy(rows.w0[y])[:, :, None, None]  # (N, S, 1, 1)
    wy1 = torch.from_numpy(rows.w1[y])[:, :, None, None]
    values = torch.addcmul(bottom[:, None] * wy1, top[:, None].expand(-1, SAMPLE_STEP, -1, -1), wy0)  # (N, S, S, K)
    labels = max_and_argmax(values.permute(3, 0, 1, 2).contiguous())[1]
    keep = y_ok[:, :, None] & x_ok[:, None, :]
    index = (y[:, :, None] * len(cols.i0) + x[:, None, :])[keep]
    return index, labels[keep]


def _corners_agree(labels: np.ndarray, clear: np.ndarray) -> np.ndarray:
    """(ny, nx) bool: the rectangle from each sample to the next row's and column's has one label, clearly."""
    below = np.append(np.arange(1, labels.shape[0]), labels.shape[0] - 1)
    right = np.append(np.arange(1, labels.shape[1]), labels.shape[1] - 1)
    same = clear & clear[below] & clear[:, right] & clear[below][:, right]
    return same & (labels == labels[below]) & (labels == labels[:, right]) & (labels == labels[below][:, right])


def _by_stripes(x: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    labels = MaskAccumulator(height, width, x.shape[0])
    for row0, stripe in upsample_rows(x, height, width):
        labels.add_probabilities(row0, stripe)
    return labels.labels, labels.counts
