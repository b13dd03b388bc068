"""`segflow train`: train an FCN from scratch on an image folder and a label folder.

The loop is deliberately plain (AdamW, poly decay, weighted cross-entropy) and fully
reproducible from `TrainConfig.seed`. Every epoch it writes a resumable state file
(`WORK_DIR/state.pt`, tensors and plain values only, loadable with weights_only=True);
every `eval_every` epochs it scores val at full resolution and, on a new best val mIoU,
writes the deployable safetensors checkpoint to `output`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segflow.models.checkpoint import save_checkpoint
from segflow.models.data import Augmentation, SegmentationSet, batches, load_folder_pair, median_frequency_weights, steps_per_epoch
from segflow.models.labels import label_set
from segflow.models.registry import IMAGENET_MEAN, IMAGENET_STD, architecture_for, build_network
from segflow.models.scores import confusion_matrix, mean_iou, per_class_iou


@dataclass(frozen=True)
class TrainConfig:
    images: str
    labels: str
    val_images: str
    val_labels: str
    output: str
    work_dir: str
    model: str = "fcn8s_resnet18"
    label_set: str = "camvid"
    epochs: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop: tuple[int, int] = (176, 224)
    scale: tuple[float, float] = (0.5, 0.9)
    class_weights: str = "median-frequency"  # or "none"
    eval_every: int = 5
    seed: int = 0
    threads: int = 0  # 0: torch's default
    resume: bool = False
    command: str = field(default="", compare=False)


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the best val metrics reached."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    labels = label_set(cfg.label_set)
    train_set = load_folder_pair(cfg.images, cfg.labels)
    val_set = load_folder_pair(cfg.val_images, cfg.val_labels)
    architecture = architecture_for(cfg.model)
    net = build_network(architecture, labels.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = median_frequency_weights(train_set.labels, labels.num_classes) if cfg.class_weights == "median-frequency" else None
    aug = Augmentation(crop=cfg.crop, scale=cfg.scale)
    gen = torch.Generator().manual_seed(cfg.seed)
    total_steps = cfg.epochs * steps_per_epoch(len(train_set.images), cfg.batch_size)

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    start_epoch, best, elapsed, history = 0, {"miou": -1.0}, 0.0, []
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, best, elapsed = state["epoch"], json.loads(state["best"]), state["elapsed"]
        history = json.loads(state["history"])

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    step = start_epoch * steps_per_epoch(len(train_set.images), cfg.batch_size)
    bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs, desc="train", file=sys.stderr)
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        losses = []
        for images, targets in batches(train_set, cfg.batch_size, aug, labels.ignore_index, gen):
            lr = cfg.lr * (1 - step / total_steps) ** 0.9
            for group in opt.param_groups:
                group["lr"] = lr
            logits = net((images - mean) / std)
            loss = F.cross_entropy(logits, targets, weight=weights, ignore_index=labels.ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        elapsed += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(elapsed, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            confusion = evaluate(net, val_set, labels.num_classes, labels.ignore_index)
            record["val_miou"] = mean_iou(confusion)
            if record["val_miou"] > best["miou"]:
                best = {
                    "miou": record["val_miou"],
                    "epoch": epoch + 1,
                    "per_class_iou": dict(zip(labels.classes, per_class_iou(confusion).round(4).tolist())),
                    "train_seconds": round(elapsed, 1),
                }
                _save_deployable(cfg, net, labels, architecture, best)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_miou=f"{best['miou']:.3f}")
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "best": json.dumps(best),
                "elapsed": elapsed,
                "history": json.dumps(history),
            },
            state_path.with_suffix(".tmp"),
        )
        state_path.with_suffix(".tmp").replace(state_path)
        (work / "history.json").write_text(json.dumps(history, indent=1))
    return best


@torch.no_grad()
def evaluate(net: torch.nn.Module, data: SegmentationSet, num_classes: int, ignore_index: int | None, batch_size: int = 4) -> np.ndarray:
    """Summed (K, K) confusion of `net` on `data` at full resolution."""
    net.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(data.images), batch_size):
        chunk = data.images[start : start + batch_size]
        if len({t.shape for t in chunk}) > 1:
            preds = [net(((t[None].float() / 255) - mean) / std).argmax(1)[0] for t in chunk]
        else:
            preds = list(net((torch.stack(chunk).float() / 255 - mean) / std).argmax(1))
        for pred, label in zip(preds, data.labels[start : start + batch_size]):
            confusion += confusion_matrix(label.numpy(), pred.numpy(), num_classes, ignore_index)
    return confusion


def _save_deployable(cfg: TrainConfig, net, labels, architecture, best) -> None:
    meta = {
        "architecture": architecture,
        "labels": labels.to_dict(),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "training": {
            "data": {"images": cfg.images, "labels": cfg.labels, "val_images": cfg.val_images, "val_labels": cfg.val_labels},
            "command": cfg.command,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "command"},
            "epoch": best["epoch"],
            "seconds": best["train_seconds"],
        },
        "metrics": {"val_miou": round(best["miou"], 4), "val_per_class_iou": best["per_class_iou"]},
    }
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{cfg.output}.tmp"
    save_checkpoint(tmp, net.state_dict(), meta)
    Path(tmp).replace(cfg.output)
