"""The GPU path: is the model stage near the bare network's speed, and does bf16 keep the masks?

    python bench/run.py --gpu-check --images 256 --batch-size 16 --json gpu.json

1. Throughput (the ceiling): a bare loop of `lowres_logits` on synthetic tensors already on
   the device, channels_last, under bf16 autocast, against the engine's model stage
   (`ModelWorker.infer_shard`, called directly, without Ray) over real image files: read,
   decode in background threads, pinned host-to-device copies, forward, logits back to
   the host. Target on a GPU: the stage within ~80% of the ceiling means reading,
   decoding and copying are hidden behind the network.
2. Agreement: the same images through `ModelWorker` with autocast off (fp32) and bf16,
   masks = argmax of the upsampled logits; they must agree on >= 99.5% of pixels.

Without CUDA the same code runs on the CPU (bf16 autocast on CPU), with few images: that
proves the code path, and its numbers say nothing about a GPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

AGREEMENT_TARGET = 0.995


def gpu_check(model_ref, images: int = 64, batch_size: int = 8, compile: bool = False) -> dict:
    import torch

    from inputs import prepare_images

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        images = min(images, 8)  # bf16 on a CPU is slow; this only proves the code path
    with tempfile.TemporaryDirectory(prefix="segflow-gpu-check-") as tmp:
        paths = prepare_images("camvid", images, Path(tmp) / "images")
        stage = _model_stage_rate(model_ref, paths, device, batch_size, "bf16", compile)
        height, width = stage.pop("image_hw")
        ceiling = _bare_loop_rate(model_ref, device, batch_size, height, width, "bf16", seconds=10.0 if cuda else 2.0)
        agreement = bf16_agreement(model_ref, paths[: min(len(paths), 32)], device, batch_size)
    return {
        "gpu_check": {
            "device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA: code path only, not a GPU measurement)",
            "images": len(paths),
            "batch_size": batch_size,
            "model_stage_images_per_second": stage["images_per_second"],
            "bare_model_images_per_second": ceiling,
            "model_stage_vs_bare": round(stage["images_per_second"] / ceiling, 3),
            "bf16_pixel_agreement": agreement,
            "bf16_agreement_ok": agreement >= AGREEMENT_TARGET,
            "compile": compile,
        }
    }


def _worker(model_ref, device: str, batch_size: int, autocast: str, compile: bool = False):
    import torch

    from segflow.pipeline.inference import InferenceOptions, ModelWorker

    options = InferenceOptions(
        device=device, threads=torch.get_num_threads(), batch_size=batch_size, decode_threads=4, autocast=autocast, compile=compile
    )
    return ModelWorker(model_ref, options)


def _shard(paths: list[Path]):
    from segflow.pipeline.sharding import Shard

    uris = tuple(str(p) for p in paths)
    return Shard("gpu-check", uris, tuple("" for _ in uris), tuple(None for _ in uris))


def _model_stage_rate(model_ref, paths: list[Path], device: str, batch_size: int, autocast: str, compile: bool) -> dict:
    """Images/s of `infer_shard` over real files, after one warm-up batch."""
    worker = _worker(model_ref, device, batch_size, autocast, compile)
    for item in worker.infer_shard(_shard(paths[:batch_size])):
        _raise_failure(item)
    start = time.perf_counter()
    count = 0
    for item in worker.infer_shard(_shard(paths)):
        _raise_failure(item)
        count += 1
    rate = count / (time.perf_counter() - start)
    return {"images_per_second": round(rate, 2), "image_hw": item["rgb"].shape[:2]}


def _bare_loop_rate(model_ref, device: str, batch_size: int, height: int, width: int, autocast: str, seconds: float) -> float:
    """Images/s of the network alone on a resident synthetic batch: the ceiling."""
    import torch

    from segflow.models.registry import load_model

    net = load_model(model_ref.model, model_ref.checkpoint, model_ref.weights, model_ref.num_classes, model_ref.seed).net
    net = net.to(device).eval()
    x = torch.randn(batch_size, 3, height, width, device=device)
    if device == "cuda":
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if autocast == "bf16" else torch.float16
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=autocast != "off"):
        net.lowres_logits(x)  # warm-up: cuDNN algorithm choice, allocator
        _sync(device)
        start, batches = time.perf_counter(), 0
        while time.perf_counter() - start < seconds or batches < 2:
            net.lowres_logits(x)
            batches += 1
        _sync(device)
    return round(batches * batch_size / (time.perf_counter() - start), 2)


def bf16_agreement(model_ref, paths: list[Path], device: str, batch_size: int) -> float:
    """Share of pixels whose class is the same with bf16 autocast as in fp32."""
    masks = {}
    for autocast in ("off", "bf16"):
        worker = _worker(model_ref, device, batch_size, autocast)
        masks[autocast] = [_mask(item) for item in worker.infer_shard(_shard(paths))]
    equal = sum(int((a == b).sum()) for a, b in zip(masks["off"], masks["bf16"]))
    total = sum(a.size for a in masks["off"])
    return round(equal / total, 6)


def _mask(item: dict) -> np.ndarray:
    """The pipeline's raw mask of a model-stage item: argmax of the upsampled logits."""
    from segflow.pipeline.refine import probabilities_from_logits

    _raise_failure(item)
    height, width = item["rgb"].shape[:2]
    return probabilities_from_logits(item["logits"], height, width).argmax(axis=0)


def _raise_failure(item: dict) -> None:
    if "failure" in item:
        raise SystemExit(f"{item['uri']}: {item['failure']}")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
