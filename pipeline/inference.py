"""The model stage: a Ray actor that loads its network once and streams a shard's logits.

Given a `RefineContext` with a shard, the actor also refines each image itself
(`refine_item`) and streams the image's rows instead: what CPU-only clusters do (see
cluster.py). The context comes with each call, not with the actor, so an actor depends
only on the model and how it runs, and can start before the job is planned
(pipeline/prestart.py).

Per shard, background threads read and decode images while the
actor's main thread runs the network, so decoding stays off the model's critical path.
Consecutive images of the same size are batched (padding would change an FCN's output
near the borders, so sizes are never mixed).

What leaves the actor per image is the decoded RGB (the CRF's bilateral kernel needs it)
and the network's *low-resolution* logits: for FCN-8s at stride 8 that is 64x fewer
values than full-resolution probabilities. Upsampling happens beside the CRF, with the
same bilinear operation the network's `forward` would apply, so masks are unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from segflow.pipeline.config import ModelRef
from segflow.pipeline.resize import decode_for_network, needs_image_size_path
from segflow.errors import ImageError, StorageError
from segflow.pipeline.sharding import Shard
from segflow.pipeline.storage import read_bytes, use_storage_environment

@dataclass(frozen=True)
class InferenceOptions:
    """How a model actor runs its network (none of this changes the masks beyond autocast's tolerance)."""

    device: str = "cpu"  # "cpu" or "cuda"
    threads: int = 1  # torch intra-op threads on CPU
    batch_size: int = 4
    decode_threads: int = 1
    autocast: str = "off"  # off | bf16 | fp16 (on a CPU too, where bf16 is mainly for checking the code path)
    channels_last: bool = True
    compile: bool = False
    max_pixels: int = 40_000_000


class ModelWorker:
    """Holds one network; `infer_shard` is a Ray streaming generator (one item per image)."""

    def __init__(self, model: ModelRef, options: InferenceOptions, storage_options: dict | None = None, storage_env: dict | None = None):
        """`storage_env`: the driver's `storage.storage_environment()`, adopted before the checkpoint is read."""
        import torch

        from segflow.models.registry import load_model

        from concurrent.futures import ThreadPoolExecutor

        use_storage_environment(storage_env)
        # One decode pool for the actor's life. A new pool per shard started new threads,
        # each of which could take a fresh malloc arena that kept the freed memory of its
        # shard's decoded images: the actor's RSS grew ~0.2 MB per image (1,040 -> 1,250
        # MiB over 1,200 images); with one pool it stays within ~3% over 2,000.
        self._decode_pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="decode")
        self.options = options
        self.storage_options = storage_options or {}
        if options.device == "cpu":
            torch.set_num_threads(options.threads)
        loaded = load_model(
            model.model, model.checkpoint, model.weights, model.num_classes, model.seed, storage_options=self.storage_options
        )
        self.device = torch.device(options.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one image size per shard: pick the fastest conv algorithms once
        net = loaded.net.to(self.device).eval()
        if options.channels_last and options.device == "cuda":
            net = net.to(memory_format=torch.channels_last)
        self.lowres = torch.compile(net.lowres_logits) if options.compile else net.lowres_logits
        if model.tta != "none":  # full-resolution logits averaged over mirrored/rescaled copies
            from functools import partial

            from segflow.models.tta import tta_logits

            self.lowres = partial(tta_logits, self.lowres, mode=model.tta)
        from segflow.models.working_size import resolve_working_size

        # Larger images run at this long side and get masks back at their size (pipeline/resize.py).
        self.working_size = resolve_working_size(model.working_size, loaded.meta, model.tiles)
        self.tiles = model.tiles
        if model.tiles is not None:  # tiles bound the network's memory whatever the image's size
            from functools import partial

            from segflow.models.sliding import slide_logits

            network = self.lowres
            # each tile is normalised on its own: a 48 Mpx image as normalised floats is 576 MB, made twice
            self.lowres = partial(slide_logits, lambda crop: network(self._normalised(crop)), tile=model.tiles[0], stride=model.tiles[1])
        self.mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1) * 255
        self.node_id = _node_id()

    def pid(self) -> int:
        """The actor's process id (fault-injection tests kill it)."""
        return os.getpid()

    def infer_shard(self, shard: Shard, refine_context=None):
        """Yield, per image in shard order, an inference result dict or a failure dict
        (given a `refine.RefineContext`: `refine_item`'s rows for each image instead).
        """
        if refine_context is None:
            yield from self._infer(shard)
            return
        from segflow.pipeline.refine import refine_item

        # A refinement kind that runs on the device refines each batch right after the
        # network, while its logits are still there (models/crf: runs_on == "device").
        refiner = refine_context.refiner
        device_refiner = refiner if getattr(refiner, "runs_on", "cpu") == "device" else None
        for item in self._infer(shard, device_refiner):
            yield refine_item(item, refine_context, shard.shard_id)

    def _infer(self, shard: Shard, device_refiner=None):
        """Per image in shard order, an inference result dict or a failure dict.

        Decoding runs in `decode_threads` background threads (PIL releases the GIL), at
        most one shard ahead, while this thread runs the network. A batch runs as soon as
        it is full or no decoded image is waiting, so a slow reader never stalls the model.
        """
        futures = [self._decode_pool.submit(self._read_and_decode, *member) for member in zip(shard.uris, shard.keys, shard.label_uris)]
        try:
            pending: list[dict] = []
            for i, future in enumerate(futures):
                item = future.result()  # a StorageError ends the shard; `finally` drops the rest
                if "failure" in item:
                    yield item
                    continue
                if pending and item["rgb"].shape != pending[0]["rgb"].shape:
                    yield from self._run_batch(pending, device_refiner)
                    pending = []
                pending.append(item)
                next_ready = i + 1 < len(futures) and futures[i + 1].done()
                if len(pending) >= self.options.batch_size or not next_ready:
                    yield from self._run_batch(pending, device_refiner)
                    pending = []
            yield from self._run_batch(pending, device_refiner)
        finally:
            for later in futures:
                later.cancel()  # a shard given up (failing store, cancelled task) stops decoding

    def _read_and_decode(self, uri: str, key: str, label_uri: str | None) -> dict:
        base = {"uri": uri, "key": key, "label_uri": label_uri, "node_id": self.node_id}
        try:
            t0 = time.perf_counter()
            data = read_bytes(uri, self.storage_options)
            t1 = time.perf_counter()
            rgb, resized = decode_for_network(data, uri, self.options.max_pixels, self.working_size)
            tiles = {"tiles": self.tiles} if self.tiles is not None else {}
            return {**base, "rgb": rgb, **resized, **tiles, "seconds_read": t1 - t0, "seconds_decode": time.perf_counter() - t1}
        except ImageError as exc:
            return {**base, "failure": {"stage": exc.stage, "reason": exc.reason, "image_fault": True}}
        except (StorageError, ImportError):
            raise  # an outage or a missing module says nothing about this image: the shard fails (engine.py)
        except Exception as exc:  # never lose an image: anything unexpected becomes its error row
            return {**base, "failure": {"stage": "read", "reason": f"{type(exc).__name__}: {exc}", "image_fault": True}}

    def _run_batch(self, items: list[dict], device_refiner=None):
        if not items:
            return
        t0 = time.perf_counter()
        try:
            batch = np.stack([it["rgb"] for it in items])
            if device_refiner is not None and any(needs_image_size_path(it) for it in items):
                device_refiner = None  # resized or tiled: refined stripe by stripe at the image's size (pipeline/resize.py)
            if device_refiner is None:
                logits = self._forward(batch)
            else:
                logits, refined, forward_seconds = self._forward_and_refine(batch, device_refiner)
                refine_seconds = (time.perf_counter() - t0 - forward_seconds) / len(items)
                for it, labels in zip(items, refined):
                    it["refined"], it["seconds_device_refine"] = labels, refine_seconds
                t0 += refine_seconds * len(items)  # seconds_infer below: the network's share only
        except Exception as exc:
            for it in items:
                it.pop("rgb", None)
                # the network failed, not the image (a CUDA error, memory): the row does not count
                # as done, and a rerun tries the image again
                yield {**it, "failure": {"stage": "infer", "reason": f"{type(exc).__name__}: {exc}", "image_fault": False}}
            return
        per_image = (time.perf_counter() - t0) / len(items)
        for it, lowres in zip(items, logits):
            yield {**it, "logits": lowres, "seconds_infer": per_image}

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, C, h, w) float32 low-resolution logits."""
        return self._forward_on_device(self._to_device(batch)).float().cpu().numpy()

    def _forward_and_refine(self, batch: np.ndarray, refiner) -> tuple[np.ndarray, np.ndarray, float]:
        """The network, then a device refinement kind on its logits still on the device.

        -> (B, C, h, w) float32 logits (the raw mask and confidences come from them, as
        for every kind), (B, H, W) uint8 refined labels, and the network's seconds.
        """
        import torch

        t0 = time.perf_counter()
        pixels = self._to_device(batch)
        logits = self._forward_on_device(pixels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the split between network and CRF time is true
        forward_seconds = time.perf_counter() - t0
        with torch.inference_mode():
            refined = refiner.refine_batch(logits.float(), pixels)
        return logits.float().cpu().numpy(), refined, forward_seconds

    def _to_device(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _forward_on_device(self, pixels):
        """(B, H, W, 3) uint8 tensor on the device -> (B, C, h, w) logits on the device."""
        import torch

        x = pixels.permute(0, 3, 1, 2)
        if self.tiles is None:
            x = self._normalised(x)
        with torch.inference_mode(), _autocast(self.device, self.options.autocast):
            return self.lowres(x)  # with tiles: each tile is normalised (`__init__`)

    def _normalised(self, x):
        """(B, 3, H, W) uint8 -> the network's input: float, minus the mean, over the std."""
        import torch

        x = (x.float() - self.mean) / self.std
        if self.options.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _autocast(device, mode: str):
    import contextlib

    import torch

    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def _node_id() -> str:
    """The Ray node this runs on, or "local" outside Ray (asking Ray would start a cluster)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        return "local"
