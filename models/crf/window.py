"""ConvCRF's truncated message passing (Teichmann & Cipolla 2018): neighbours within a window.

The fully connected CRF sums over every pair of pixels. ConvCRF assumes that pixels more
than k//2 rows or columns apart do not interact, which makes the model a stack of local
filters: exact for that truncated model, with no lattice approximation, and on a GPU just
a few elementwise passes. Messages can be computed at 1/s of the resolution (average-pooled
probabilities and colours, positions still in full-resolution pixels), then upsampled
bilinearly, which widens the window to about k*s pixels at s^2 less work.

The kernels and their normalisation are densecrf's, restricted to the window:

    gaussian:  k(i, j) = exp(-|p_i - p_j|^2 / (2 sxy^2))
    bilateral: k(i, j) = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))
    message:   m_i = n_i * sum_{j in window(i)} k(i, j) n_j Q_j,  n_i = 1 / sqrt(sum_j k(i, j))

with p in pixels and I in 0..255, the pixel itself included (j = i), and neighbours
outside the image absent (they neither send messages nor count in n). With a window that
covers the whole image and s = 1 this is the exact dense CRF with Gaussian kernels.

Memory: the bilateral weights of all k^2 offsets are kept (k^2 * H/s * W/s, one channel,
no class axis); messages are accumulated offset by offset, so class-sized intermediates
stay O(K * H * W) rather than the O(k^2 * K * H * W) that unfolding would take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class WindowMessages:
    """Gaussian and bilateral messages inside a k x k window, for one batch of images."""

    def __init__(
        self,
        rgb: torch.Tensor,
        gaussian_sxy: float,
        bilateral_sxy: float,
        bilateral_srgb: float,
        window_size: int,
        downsample: int = 1,
    ):
        """rgb: (N, 3, H, W) float, colours in 0..255. Builds the kernels without gradients."""
        self.size = tuple(rgb.shape[-2:])
        self.downsample = downsample
        self.radius = window_size // 2
        with torch.no_grad():
            image = self._pool(rgb.detach().float())
            ones = torch.ones_like(image[:, :1])
            # separable spatial kernel: exp(-(dy^2 + dx^2) / 2s^2) = g(dy) g(dx)
            steps = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32, device=rgb.device) * downsample
            self.gaussian_1d = torch.exp(-(steps**2) / (2.0 * float(gaussian_sxy) ** 2))
            self.gaussian_norm = _rsqrt(self._separable(ones, self.gaussian_1d))
            self.bilateral_weights = self._bilateral_weights(image, float(bilateral_sxy), float(bilateral_srgb))
            self.bilateral_norm = _rsqrt(self._accumulate(ones, self.bilateral_weights))

    def __call__(self, q: torch.Tensor, gaussian_weight: torch.Tensor, bilateral_weight: torch.Tensor) -> torch.Tensor:
        """(N, K, H, W) probabilities, (K,) weights per kernel -> (N, K, H, W) weighted messages.

        Both kernels and their weighting run at the pooled resolution, so probabilities are
        pooled once and messages upsampled once (upsampling is linear per channel, so it
        commutes with the weighting).
        """
        pooled = self._pool(q)
        g_norm = self.gaussian_norm.to(q.dtype)
        b_norm = self.bilateral_norm.to(q.dtype)
        smooth = g_norm * self._separable(g_norm * pooled, self.gaussian_1d.to(q.dtype))
        appearance = b_norm * self._accumulate(b_norm * pooled, self.bilateral_weights.to(q.dtype))
        k = q.shape[1]
        return self._unpool(gaussian_weight.view(1, k, 1, 1) * smooth + bilateral_weight.view(1, k, 1, 1) * appearance)

    def _bilateral_weights(self, image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
        """(k*k, N, 1, h, w) kernel weight from each pixel to its neighbour at each offset (0 off-image)."""
        r = self.radius
        h, w = image.shape[-2:]
        padded = F.pad(image, (r, r, r, r))
        inside = F.pad(torch.ones_like(image[:, :1]), (r, r, r, r))
        weights = []
        step = self.downsample
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                spatial = (((dy - r) * step) ** 2 + ((dx - r) * step) ** 2) / (2.0 * sxy**2)
                colour = ((padded[:, :, dy : dy + h, dx : dx + w] - image) ** 2).sum(1, keepdim=True) / (2.0 * srgb**2)
                weights.append(torch.exp(-(spatial + colour)) * inside[:, :, dy : dy + h, dx : dx + w])
        return torch.stack(weights)

    def _accumulate(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over offsets o of weights[o] * x shifted by o, one offset at a time."""
        r = self.radius
        h, w = x.shape[-2:]
        padded = F.pad(x, (r, r, r, r))
        out = torch.zeros_like(x)
        for o in range(weights.shape[0]):
            dy, dx = divmod(o, 2 * r + 1)
            out.addcmul_(weights[o], padded[:, :, dy : dy + h, dx : dx + w])  # in place: 2x faster, autograd-safe
        return out

    def _separable(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Depthwise 2-D convolution with the separable kernel g(dy) g(dx), zero outside the image."""
        c = x.shape[1]
        r = self.radius
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        s = self.downsample
        if s == 1:
            return x
        n, c, h, w = x.shape
        if h % s == 0 and w % s == 0:  # the same means as avg_pool2d, ~3x faster on a CPU
            return x.reshape(n, c, h // s, s, w // s, s).sum(5).sum(3) * (1.0 / (s * s))
        return F.avg_pool2d(x, s, ceil_mode=True, count_include_pad=False)

    def _unpool(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample == 1:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def _rsqrt(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.sqrt(x + 1e-20)
