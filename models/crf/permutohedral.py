"""The permutohedral lattice (Adams, Baek & Davis 2010) in pure torch, as densecrf builds it.

A fully connected Gaussian filter over P points with d-dimensional features,

    out_i = sum_j exp(-|f_i - f_j|^2 / 2) * in_j        (self included, j = i adds in_i)

costs O(P^2). The lattice approximates it in O(P * d^2): each point is *splatted* onto the
d+1 vertices of the enclosing simplex of a lattice in d+1 dimensions (barycentric
weights), the vertices are *blurred* with a [1/2, 1, 1/2] kernel along each of the d+1
lattice axes in turn, and each point *slices* its value back from the same vertices.

Why mimic Krähenbühl's densecrf (permutohedral.cpp) step by step rather than the paper: the
point is that `MeanFieldCRF(backend="lattice")` means what pydensecrf2 means. So we keep
its feature scaling (`sqrt(2/3) * (d+1) / sqrt((i+1)(i+2))` on axis i), its rounding to the
nearest 0-coloured vertex (round half to even, as its SSE build does), its tie-breaking when
ranking coordinates, its blur order (axis 0 first), its magic slice factor
`alpha = 1 / (1 + 2^-d)` and its "missing neighbour reads zero". Where it differs from the
exact Gaussian (the lattice kernel is only roughly Gaussian, and the point's own weight is
whatever the lattice gives it, not exactly 1) we differ the same way.

The structure (which vertex, which weight) is built from the features without gradients.
`filter` is linear in its input: splat and slice are sparse products whose gradient is the
product with the transpose (which the other one is), the blur is gathers and adds, so
gradients reach the values (class probabilities) but not the features.

Hashing: densecrf finds vertices in a hash table; here each key is packed into one int64 and
the keys are sorted, which gives the distinct vertices, each point's vertex rows and the
splat matrix's layout in one sort, and on a GPU too.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, replace

import torch

# Packed vertex keys must fit an int64 with room for the neighbour offsets (+-d on an axis).
_MAX_KEY_BITS = 62


@dataclass
class PermutohedralLattice:
    """A lattice built for P points; `filter` maps (P, C) values to (P, C) filtered values.

    Vertex rows are 1..M; row 0 is the always-zero "missing" vertex that densecrf's blur
    reads where a neighbour does not exist. The splat and slice are stored as the index
    parts of two sparse matrices (CSR), transposes of each other:

    offsets:        (P, d+1) int64 vertex rows of each point's simplex corners, ascending.
    weights:        (P, d+1) float32 their barycentric weights (each row sums to 1).
    splat_pointers: (M+2,) int64 CSR row pointers of the (M+1, P) splat matrix.
    splat_points:   (P*(d+1),) int64 points splatting onto each vertex, vertex by vertex.
    splat_weights:  (P*(d+1),) float32 their weights.
    neighbours:     (d+1, 2, M+1) int64 rows of the two neighbours of every vertex along
                    each lattice axis (0 where densecrf's hash lookup finds none).
    """

    offsets: torch.Tensor
    weights: torch.Tensor
    splat_pointers: torch.Tensor
    splat_points: torch.Tensor
    splat_weights: torch.Tensor
    neighbours: torch.Tensor
    num_vertices: int
    point_scale: torch.Tensor | None = None  # (P,) a factor on each point, in and out; None: 1
    _matrices: dict = field(default_factory=dict, repr=False, compare=False)  # (dtype, device) -> CSR pair

    @classmethod
    @torch.no_grad()
    def from_features(cls, features: torch.Tensor, groups: torch.Tensor | None = None) -> "PermutohedralLattice":
        """(P, d) features (already divided by their bandwidths) -> the lattice.

        `groups` (P,) int64 keeps points of different groups (images of a batch) on
        disjoint vertices, so one lattice filters a whole batch without mixing images.
        """
        f = features.detach().to(torch.float32)
        num_points, d = f.shape
        device = f.device
        elevated = _elevate(f)
        down = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=device)
        # Nearest 0-coloured lattice point: coordinates that are multiples of d+1.
        v = torch.round(elevated * down)
        rem0 = v * (d + 1)
        total = v.sum(dim=1, keepdim=True)
        rank = _rank(elevated - rem0) + total
        wrap = (rank < 0).float() * (d + 1) - (rank >= d + 1).float() * (d + 1)
        rank = rank + wrap
        rem0 = rem0 + wrap
        rank = rank.long()

        # Barycentric coordinates (p.10 of Adams et al.), computed as densecrf does.
        delta = (elevated - rem0) * down
        bary = torch.zeros(num_points, d + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, d - rank, delta)
        bary.scatter_add_(1, d - rank + 1, -delta)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        weights = bary[:, : d + 1].contiguous()

        # Vertex keys: the remainder-r corner of the simplex is rem0 + canonical[r, rank]
        # (first d coordinates; the last one is implied). Keys are hashed as densecrf
        # hashes them, only by sorting packed integer codes instead of a hash table.
        keys = _VertexKeys(rem0.long()[:, :d], rank, groups)
        vertex_codes, inverse, by_vertex = keys.vertices()
        num_vertices = vertex_codes.shape[0]
        counts = torch.bincount(inverse + 1, minlength=num_vertices + 1)
        splat_pointers = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        splat_points = by_vertex // (d + 1)  # stable order: points ascending within a vertex
        splat_weights = weights.reshape(-1)[by_vertex]
        # CSR wants each point's vertices ascending. Vertex rows follow key order, led by key
        # coordinate 0, which is rem0[0] + r for corners r <= d - rank[0] and rem0[0] + r -
        # (d+1) after: sorted, the corners are a rotation of 0..d, starting at d - rank[0] + 1.
        start = (d + 1 - rank[:, :1]) % (d + 1)
        rotation = (torch.arange(d + 1, device=device) + start) % (d + 1)
        offsets = torch.gather((inverse + 1).reshape(num_points, d + 1), 1, rotation)
        weights = torch.gather(weights, 1, rotation)

        # Blur neighbours along axis j: every key coordinate -1 except +d on axis j (for
        # j = d, the implied last coordinate, all -1), and the mirror image (+1, -d).
        neighbours = torch.zeros(d + 1, 2, num_vertices + 1, dtype=torch.long, device=device)
        for j in range(d + 1):
            shift = torch.full((d,), -1, dtype=torch.long, device=device)
            if j < d:
                shift[j] = d
            neighbours[j, 0, 1:] = keys.find(vertex_codes, shift) + 1
            neighbours[j, 1, 1:] = keys.find(vertex_codes, -shift) + 1
        return cls(offsets, weights, splat_pointers, splat_points, splat_weights, neighbours, num_vertices)

    @property
    def dim(self) -> int:
        return self.offsets.shape[1] - 1

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(P, C) values -> (P, C) lattice-filtered values (splat, blur, slice), differentiable.

        With `point_scale` s set (see `symmetric_normalized`) this is s * L(s * values).
        Splat and slice are one sparse product each (CSR, d+1 entries per point), with
        densecrf's slice factor alpha and s folded into their entries: 6-7x faster on a CPU
        than index_add and gathers of the same sums, and cuSPARSE on a GPU.
        """
        splat, slice_ = self._sparse(values.dtype, values.device)
        lattice = _SparseProduct.apply(splat, slice_, values.contiguous())  # (M+1, C)
        for j in range(self.dim + 1):  # row 0 stays zero: its neighbours are row 0
            lattice = lattice + 0.5 * (lattice[self.neighbours[j, 0]] + lattice[self.neighbours[j, 1]])
        return _SparseProduct.apply(slice_, splat, lattice)

    def symmetric_normalized(self) -> "PermutohedralLattice":
        """densecrf's NORMALIZE_SYMMETRIC kernel: x -> n * L(n * x), n = 1 / sqrt(L(1)).

        The normalisation cancels the kernel's overall scale, so only the shape of the
        lattice kernel matters, as in densecrf.
        """
        with torch.no_grad():
            ones = torch.ones(self.offsets.shape[0], 1, dtype=torch.float32, device=self.offsets.device)
            norm = 1.0 / torch.sqrt(self.filter(ones)[:, 0] + 1e-20)
        scale = norm if self.point_scale is None else norm * self.point_scale
        return replace(self, point_scale=scale, _matrices={})

    def _sparse(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (M+1, P) splat matrix and its transpose, the (P, M+1) slice matrix, as CSR.

        Each carries sqrt(alpha) * point_scale of its point, so that they stay exact
        transposes of each other (which the gradient relies on).
        """
        key = (dtype, device)
        if key not in self._matrices:
            points, corners = self.offsets.shape
            scale = torch.full((points,), math.sqrt(1.0 / (1.0 + 2.0 ** (-self.dim))), device=self.offsets.device)
            if self.point_scale is not None:
                scale = scale * self.point_scale
            size = (self.num_vertices + 1, points)
            with warnings.catch_warnings():  # "CSR support is in beta": its matmul is what we need
                warnings.simplefilter("ignore", UserWarning)
                splat_values = (self.splat_weights * scale[self.splat_points]).to(dtype)
                splat = torch.sparse_csr_tensor(self.splat_pointers, self.splat_points, splat_values, size=size, check_invariants=False)
                pointers = torch.arange(0, points * corners + 1, corners, device=self.offsets.device)
                slice_values = (self.weights * scale[:, None]).reshape(-1).to(dtype)
                slice_ = torch.sparse_csr_tensor(pointers, self.offsets.reshape(-1), slice_values, size=size[::-1], check_invariants=False)
            self._matrices[key] = (splat.to(device), slice_.to(device))
        return self._matrices[key]


class _SparseProduct(torch.autograd.Function):
    """y = A @ x for a constant sparse A, with its transpose given for the gradient A^T @ dy."""

    @staticmethod
    def forward(ctx, matrix, transposed, x):
        ctx.transposed = transposed
        return matrix @ x

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.transposed @ grad.contiguous()


class LatticeMessages:
    """Gaussian and bilateral messages over the whole image through two lattices, as densecrf.

    Features are densecrf2d's: (x/sxy, y/sxy) for the smoothness kernel and
    (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) for the appearance kernel, x the column and y the
    row in pixels, colours in 0..255. One lattice per kernel serves the whole batch.
    """

    def __init__(self, rgb: torch.Tensor, gaussian_sxy: float, bilateral_sxy: float, bilateral_srgb: float):
        """rgb: (N, 3, H, W) float, colours in 0..255. Builds the lattices without gradients."""
        n, _, h, w = rgb.shape
        self.shape = (n, h, w)
        with torch.no_grad():
            device = rgb.device
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            xy = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).float().expand(n, -1, -1)
            colour = rgb.detach().float().permute(0, 2, 3, 1).reshape(n, h * w, 3)
            groups = torch.arange(n, device=device).repeat_interleave(h * w)
            self._gaussian = _position_lattice(n, h, w, float(gaussian_sxy), device)
            bilateral = torch.cat([xy / float(bilateral_sxy), colour / float(bilateral_srgb)], dim=-1)
            self._bilateral = PermutohedralLattice.from_features(bilateral.reshape(-1, 5), groups).symmetric_normalized()

    def __call__(self, q: torch.Tensor, gaussian_weight: torch.Tensor, bilateral_weight: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) probabilities, (K,) weights per kernel -> (N, K, H, W) weighted messages."""
        n, k, h, w = q.shape
        flat = q.permute(0, 2, 3, 1).reshape(n * h * w, k)  # the lattice filters (points, channels)
        out = gaussian_weight * self._gaussian.filter(flat) + bilateral_weight * self._bilateral.filter(flat)
        return out.reshape(n, h, w, k).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=4)
def _position_lattice(n: int, h: int, w: int, sxy: float, device: torch.device) -> PermutohedralLattice:
    """The smoothness kernel's lattice depends on the batch's shape only: built once per shape
    (~50 ms at 480 x 360 on a CPU core), kept for the last 4 shapes (~20 MB each there)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    xy = torch.stack([xs, ys], dim=-1).reshape(h * w, 2).float().repeat(n, 1)
    groups = torch.arange(n, device=device).repeat_interleave(h * w)
    return PermutohedralLattice.from_features(xy / sxy, groups).symmetric_normalized()


def _elevate(f: torch.Tensor) -> torch.Tensor:
    """(P, d) -> (P, d+1) points on the hyperplane sum = 0, scaled as densecrf scales them."""
    d = f.shape[1]
    # densecrf stores inv_std_dev as a float, then multiplies in double and stores a float
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = torch.tensor([1.0 / math.sqrt((i + 1) * (i + 2)) * inv_std_dev for i in range(d)], dtype=torch.float32, device=f.device)
    cf = f * scale
    # suffix[:, k] = cf[:, k] + ... + cf[:, d-1], summed from the end as densecrf does
    suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), dim=1), [1])
    tail = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)  # sum of cf[k] for k > j-1
    j = torch.arange(1, d + 1, dtype=torch.float32, device=f.device)
    return torch.cat([suffix[:, :1], tail - j * cf], dim=1)


def _rank(residual: torch.Tensor) -> torch.Tensor:
    """(P, d+1) -> (P, d+1) float rank of each coordinate, ties broken as densecrf breaks them.

    densecrf compares each pair i < j once: i gains 1 if r_i < r_j, otherwise j gains 1.
    The same loop over the (d+1)d/2 pairs, on columns, is ~30x faster than one
    (P, d+1, d+1) comparison.
    """
    n = residual.shape[1]
    cols = [residual[:, i] for i in range(n)]
    rank = [torch.zeros(residual.shape[0], dtype=torch.int32, device=residual.device) for _ in range(n)]
    for i in range(n - 1):
        for j in range(i + 1, n):
            first_smaller = cols[i] < cols[j]
            rank[i] += first_smaller
            rank[j] += ~first_smaller
    return torch.stack(rank, dim=1).to(torch.float32)


class _VertexKeys:
    """Integer keys of lattice vertices, packed into one int64 code per vertex when they fit.

    A code is an order-preserving mixed-radix number of the d key coordinates and the
    group. The radix leaves room for the corners (rem0 +- d) and their blur neighbours
    (+- d more), so a neighbour's code is the vertex's code plus a constant. Keys too wide
    for 62 bits (tiny bandwidths on huge images) stay (d [+1]) rows sorted with unique(dim=0).
    """

    def __init__(self, rem0: torch.Tensor, rank: torch.Tensor, groups: torch.Tensor | None):
        d = rem0.shape[1]
        self.d = d
        self.rem0, self.rank = rem0, rank
        self.groups = None if groups is None else groups.to(rem0.device).long()
        self.low = rem0.min(dim=0).values - 2 * d
        span = rem0.max(dim=0).values + 2 * d - self.low + 1
        group_span = 1 if groups is None else int(self.groups.max()) + 1
        bits = float(torch.log2(span.double()).sum()) + math.log2(group_span)
        self.packed = bits <= _MAX_KEY_BITS
        if self.packed:
            strides = [1] * d
            for i in range(d - 2, -1, -1):
                strides[i] = strides[i + 1] * int(span[i + 1])
            self.strides = torch.tensor(strides, dtype=torch.long, device=rem0.device)
            self.group_stride = strides[0] * int(span[0])

    def vertices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct vertex codes, sorted ((M,), or (M, d [+1]) rows), the (P*(d+1),) vertex
        index of each corner, and the stable permutation grouping corners by vertex."""
        codes = self._corner_codes()
        if not self.packed:
            vertex_rows, inverse = torch.unique(codes.reshape(-1, codes.shape[-1]), dim=0, return_inverse=True)
            return vertex_rows, inverse, torch.argsort(inverse, stable=True)
        # one sort gives the distinct codes, each corner's vertex and the splat order
        ordered, by_vertex = torch.sort(codes.reshape(-1), stable=True)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        inverse = torch.empty_like(by_vertex)
        inverse[by_vertex] = torch.cumsum(first, 0) - 1
        return ordered[first], inverse, by_vertex

    def _corner_codes(self) -> torch.Tensor:
        """(P, d+1) codes of each point's simplex corners, or (P, d+1, d [+1]) rows if unpacked."""
        d = self.d
        if not self.packed:
            r = torch.arange(d + 1, device=self.rem0.device)
            canonical = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))
            rows = self.rem0[:, None, :] + canonical[:, self.rank[:, :d]].permute(1, 0, 2)
            if self.groups is not None:
                rows = torch.cat([rows, self.groups[:, None, None].expand(-1, d + 1, 1)], dim=2)
            return rows
        base = ((self.rem0 - self.low) * self.strides).sum(dim=1)
        if self.groups is not None:
            base = base + self.groups * self.group_stride
        # canonical[r, k] = r - (d+1) * [k > d - r]: corner r adds r * sum(strides) and
        # subtracts (d+1) * the strides of the coordinates ranked above d - r, a suffix sum
        # over the strides placed by rank (the implied last coordinate has stride 0).
        strides = torch.cat([self.strides, self.strides.new_zeros(1)]).expand(self.rank.shape[0], -1)
        by_rank = torch.zeros_like(self.rank).scatter_(1, self.rank, strides)
        above = torch.flip(torch.cumsum(torch.flip(by_rank, [1]), 1), [1])  # above[:, k] = sum over ranks >= k
        above = torch.cat([above[:, 1:], above.new_zeros(above.shape[0], 1)], dim=1).flip(1)  # [:, r] = ranks > d - r
        r = torch.arange(d + 1, device=base.device)
        return base[:, None] + r * int(self.strides.sum()) - (d + 1) * above

    def find(self, vertex_codes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Row of each vertex's key + shift among `vertex_codes` (sorted, from unique); -1 if absent."""
        if self.packed:
            wanted = vertex_codes + int((shift * self.strides).sum())
            at = torch.searchsorted(vertex_codes, wanted).clamp(max=vertex_codes.shape[0] - 1)
            return torch.where(vertex_codes[at] == wanted, at, torch.full_like(at, -1))
        rows = vertex_codes.clone()
        rows[:, : self.d] += shift
        every = torch.cat([vertex_codes, rows])
        _, inverse = torch.unique(every, dim=0, return_inverse=True)
        count = vertex_codes.shape[0]
        vertex_of = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device=rows.device)
        vertex_of[inverse[:count]] = torch.arange(count, device=rows.device)
        return vertex_of[inverse[count:]]
