"""What the pipeline is measured against: a plain sequential loop, and the ideal.

`run_baseline` is the script anyone would write first: for each image, read, decode, run
the full network (`forward`, upsampled logits), argmax, softmax + dense CRF, encode the
refined and raw masks as PNG, in one loop, one process, torch at its default threads.
It produces the same masks the pipeline stores, which `run.py` checks.

`measure_alone` times the two expensive steps on their own, single-threaded, in CPU
seconds (`time.process_time`): the model's low-resolution forward, and upsampling +
softmax + CRF. The ideal throughput of a machine with `cores` cores is
`cores / (model + crf)` images/s: every core busy with nothing but those two steps.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segflow.pipeline.config import CRFParams
from segflow.models.crf.dense import refine_with_crf
from segflow.pipeline.decode import decode_image
from segflow.pipeline.masks import encode_mask
from segflow.pipeline.refine import probabilities_from_logits

KEPT_MASKS = 32  # full masks kept for a pixel-level comparison; the rest by hash only


@dataclass
class Model:
    """A loaded network and its input normalisation, as `ModelWorker` applies it."""

    net: torch.nn.Module
    mean: torch.Tensor  # (1, 3, 1, 1), in 0..255 units
    std: torch.Tensor

    @classmethod
    def load(cls, ref) -> "Model":
        from segflow.models.registry import load_model

        loaded = load_model(ref.model, ref.checkpoint, ref.weights, ref.num_classes, ref.seed)
        mean = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
        return cls(loaded.net.eval(), mean, std)

    def normalise(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, H, W) float32, exactly as the model actor does it."""
        x = torch.from_numpy(rgb[None]).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


@dataclass
class BaselineResult:
    images: int
    seconds: float
    stage_seconds: dict  # totals over all images
    mask_hashes: dict = field(repr=False)  # path -> blake2b of the final mask's class ids
    kept_masks: dict = field(repr=False)  # path -> (H, W) uint8, the first KEPT_MASKS images

    def as_dict(self) -> dict:
        n = max(1, self.images)
        return {
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images / self.seconds, 3),
            "torch_threads": torch.get_num_threads(),
            "stage_seconds_per_image": {k: round(v / n, 4) for k, v in self.stage_seconds.items()},
        }


def run_baseline(paths: list[Path], model: Model, crf: CRFParams | None, flat_palette: list[int], max_pixels: int) -> BaselineResult:
    """Sequentially segment every image; torch keeps whatever thread count it defaults to."""
    stages = dict.fromkeys(("read", "decode", "model", "crf", "encode"), 0.0)
    hashes, kept = {}, {}
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        rgb = decode_image(data, str(path), max_pixels)
        t2 = time.perf_counter()
        with torch.inference_mode():
            logits = model.net(model.normalise(rgb))[0]  # (C, H, W), full resolution
        raw = logits.argmax(dim=0).to(torch.uint8).numpy()
        t3 = time.perf_counter()
        if crf is not None:
            probs = torch.softmax(logits, dim=0).numpy()
            final = refine_with_crf(rgb, probs, crf)
        else:
            final = raw
        t4 = time.perf_counter()
        encode_mask(final, flat_palette)
        if crf is not None:
            encode_mask(raw, flat_palette)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[name] += seconds
        hashes[str(path)] = mask_hash(final)
        if len(kept) < KEPT_MASKS:
            kept[str(path)] = final
    return BaselineResult(len(paths), time.perf_counter() - start, stages, hashes, kept)


def measure_alone(paths: list[Path], model: Model, crf: CRFParams | None, max_pixels: int) -> dict:
    """CPU seconds per image of the model's low-res forward and of upsample+softmax+CRF, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_cpu, crf_cpu = [], []
        for i, path in enumerate([paths[0], *paths]):  # the first pass warms caches and is dropped
            rgb = decode_image(path.read_bytes(), str(path), max_pixels)
            c0 = time.process_time()
            with torch.inference_mode():
                lowres = model.net.lowres_logits(model.normalise(rgb))[0].numpy()
            c1 = time.process_time()
            if crf is not None:
                refine_with_crf(rgb, probabilities_from_logits(lowres, *rgb.shape[:2]), crf)
            c2 = time.process_time()
            if i:
                model_cpu.append(c1 - c0)
                crf_cpu.append(c2 - c1)
    finally:
        torch.set_num_threads(threads)
    return {
        "images": len(paths),
        "model_cpu_seconds_per_image": round(float(np.mean(model_cpu)), 4),
        "crf_cpu_seconds_per_image": round(float(np.mean(crf_cpu)), 4) if crf is not None else 0.0,
    }


def mask_hash(mask: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(mask, dtype=np.uint8).tobytes(), digest_size=16).hexdigest()

