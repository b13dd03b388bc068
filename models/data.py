"""Training data: image/label folder pairs held in memory, and the augmentations.

CamVid-sized sets (hundreds of 480x360 images) fit in memory as uint8 tensors, which keeps
the 2-core training loop free of decode work and DataLoader processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class SegmentationSet:
    """Images (N, 3, H, W) uint8 and labels (N, H, W) uint8, paired by file name."""

    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    names: list[str]


def load_folder_pair(image_dir: str | Path, label_dir: str | Path, limit: int = 0) -> SegmentationSet:
    """Load every image in `image_dir` (the first `limit` by name, if > 0) with the label of the same stem in `label_dir`."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    labels_by_stem = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    images, labels, names = [], [], []
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in paths[:limit] if limit > 0 else paths:
        if path.stem not in labels_by_stem:
            raise FileNotFoundError(f"{path}: no label named {path.stem}.* in {label_dir}")
        rgb = np.array(Image.open(path).convert("RGB"))
        label = np.array(Image.open(labels_by_stem[path.stem]))
        if label.shape != rgb.shape[:2]:
            raise ValueError(f"{path}: label is {label.shape}, image is {rgb.shape[:2]}")
        images.append(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        labels.append(torch.from_numpy(label.astype(np.uint8)))
        names.append(path.name)
    if not images:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return SegmentationSet(images, labels, names)


def median_frequency_weights(labels: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """SegNet's median-frequency balancing: weight_c = median(freq) / freq_c.

    freq_c is class c's pixel count over the pixels of images where c appears.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    present_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for label in labels:
        c = torch.bincount(label.flatten().long(), minlength=256)[:num_classes].double()
        counts += c
        present_pixels += (c > 0).double() * label.numel()
    freq = counts / present_pixels.clamp(min=1)
    weights = torch.where(freq > 0, freq.median() / freq.clamp(min=1e-12), torch.zeros_like(freq))
    return weights.float()


@dataclass(frozen=True)
class Augmentation:
    """Random scale, crop, horizontal flip and colour jitter."""

    crop: tuple[int, int] = (176, 224)
    scale: tuple[float, float] = (0.5, 0.9)
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25

    def sample(self, image: torch.Tensor, label: torch.Tensor, ignore_index: int, gen: torch.Generator):
        """One augmented (3, h, w) float [0, 1] image and (h, w) int64 label."""
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=gen).item()
        h, w = image.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        img = F.interpolate(image[None].float() / 255, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        img, lab = self._pad_to_crop(img, lab, ignore_index)
        ch, cw = self.crop
        top = torch.randint(0, img.shape[1] - ch + 1, (), generator=gen).item()
        left = torch.randint(0, img.shape[2] - cw + 1, (), generator=gen).item()
        img, lab = img[:, top : top + ch, left : left + cw], lab[top : top + ch, left : left + cw]
        if torch.rand((), generator=gen).item() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return self._jitter_colour(img, gen), lab

    def _pad_to_crop(self, img, lab, ignore_index):
        ch, cw = self.crop
        ph, pw = max(0, ch - img.shape[1]), max(0, cw - img.shape[2])
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            lab = F.pad(lab, (0, pw, 0, ph), value=ignore_index)
        return img, lab

    def _jitter_colour(self, img, gen):
        def factor(amount):
            return 1 + amount * (2 * torch.rand((), generator=gen).item() - 1)

        img = img * factor(self.brightness)
        mean = img.mean()
        img = (img - mean) * factor(self.contrast) + mean
        grey = img.mean(0, keepdim=True)
        img = (img - grey) * factor(self.saturation) + grey
        return img.clamp(0, 1)


def batches(data: SegmentationSet, batch_size: int, aug: Augmentation, ignore_index: int, gen: torch.Generator):
    """Yield one epoch of augmented (B, 3, h, w) float images and (B, h, w) labels."""
    order = torch.randperm(len(data.images), generator=gen).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        pairs = [aug.sample(data.images[i], data.labels[i], ignore_index, gen) for i in order[start : start + batch_size]]
        yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.floor(n / batch_size))
