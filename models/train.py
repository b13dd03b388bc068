"""`segflow train`: train an FCN, or a head on a trained FCN, on an image folder and a label folder.

The loop is deliberately plain (AdamW, poly decay, the head's own loss; the FCN head's is
weighted cross-entropy) and fully reproducible from `TrainConfig.seed`. Every epoch it
writes a resumable state file (`WORK_DIR/state.pt`, tensors and plain values only,
loadable with weights_only=True); every `eval_every` epochs it scores val at full
resolution and, on a new best val mIoU, writes the deployable safetensors checkpoint to
`output`.

How the network learns is the head's `training_mode` (segflow.models.heads):
- joint (fcn): every weight learns; from scratch unless a base checkpoint is given, and the
  checkpoint is complete;
- staged (dpn) and piecewise (context): the base checkpoint (default: the bundled model) is
  loaded and frozen, only the head learns, and the checkpoint holds the head alone plus
  the base's sha256, which loading checks.
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
from tqdm import tqdm

from segflow.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from segflow.models.data import Augmentation, SegmentationSet, batches, load_folder_pair, median_frequency_weights, steps_per_epoch
from segflow.models.heads import DEFAULT_HEAD, head_class
from segflow.models.labels import label_set
from segflow.models.registry import BUNDLED, BUNDLED_CHECKPOINT, IMAGENET_MEAN, IMAGENET_STD, architecture_for, build_network
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
    head: str = DEFAULT_HEAD
    base: str | None = None  # None: "bundled" for heads that start from a base, else "none" (from scratch)
    label_set: str = "camvid"
    epochs: int = 200
    batch_size: int = 8
    lr: float | None = None  # None: SCRATCH_LR, or FINE_TUNE_LR when a whole trained network is fine-tuned
    weight_decay: float = 1e-4
    crop: tuple[int, int] = (176, 224)
    scale: tuple[float, float] = (0.5, 0.9)
    class_weights: str = "median-frequency"  # or "none"
    eval_every: int = 5
    seed: int = 0
    threads: int = 0  # 0: torch's default
    resume: bool = False
    max_images: int = 0  # 0: every image; N: the first N of train and of val (smoke runs)
    ema: float = 0.0  # 0: off; else the decay per step of an exponential moving average of the weights, which is what is scored and saved
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (cuda when torch sees one)
    command: str = field(default="", compare=False)


SCRATCH_LR = 2e-3  # from scratch, or a fresh head on a frozen base
FINE_TUNE_LR = 1e-4  # a joint head (crfrnn) starting from a trained base: 2e-3 wrecks the trained backbone in a few steps


@dataclass(frozen=True)
class BaseModel:
    """The trained checkpoint a head starts from: where it is, its sha256 and its weights."""

    reference: str  # "bundled", or the checkpoint's absolute path or URL, as head-only checkpoints record it
    sha256: str
    state_dict: dict
    meta: dict


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the best val metrics reached."""
    device = training_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    labels = label_set(cfg.label_set)
    train_set = load_folder_pair(cfg.images, cfg.labels, cfg.max_images)
    val_set = load_folder_pair(cfg.val_images, cfg.val_labels, cfg.max_images)
    head = head_class(cfg.head)
    architecture = architecture_for(cfg.model, cfg.head)
    if architecture["family"] != "fcn":
        raise CheckpointError(f"segflow train trains segflow's FCN (fcn8s_/fcn16s_/fcn32s_ + backbone), not {cfg.model!r}")
    if head.config_type is not None:  # written out in full, so later default changes leave the checkpoint's meaning alone
        architecture["head_config"] = dataclasses.asdict(head.config_type())
    base = load_base(cfg, architecture, labels)
    normalization = (base.meta if base else {}).get("normalization", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    net = build_network(architecture, labels.num_classes, normalization=normalization)
    if base is not None:
        _load_base_weights(net, base)
    if net.head.freezes_base:
        if base is None:
            raise CheckpointError(f"head {cfg.head!r} trains {net.head.training_mode} on a trained, frozen base; give one with --base (bundled, or a checkpoint)")
        net.freeze_base()
    net.to(device)
    peak_lr = peak_learning_rate(cfg, net, base)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=peak_lr, weight_decay=cfg.weight_decay)
    averaged = weight_average(net, cfg.ema)
    weights = median_frequency_weights(train_set.labels, labels.num_classes) if cfg.class_weights == "median-frequency" else None
    if weights is not None:
        weights = weights.to(device)
    aug = Augmentation(crop=cfg.crop, scale=cfg.scale)
    gen = torch.Generator().manual_seed(cfg.seed)
    total_steps = cfg.epochs * steps_per_epoch(len(train_set.images), cfg.batch_size)

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    start_epoch, best, elapsed, history = 0, {"miou": -1.0}, 0.0, []
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("base_sha256", "") != (base.sha256 if base else ""):
            raise CheckpointError(f"{state_path}: this run trained on another base checkpoint; resume with the same --base, or start a new --work-dir")
        net.load_state_dict(state["model"], strict=not net.base_frozen)
        opt.load_state_dict(state["optimizer"])
        if ("ema" in state) != (averaged is not None):
            how = "with --ema" if "ema" in state else "without --ema"
            raise CheckpointError(f"{state_path}: this run trained {how}; resume it the same way, or start a new --work-dir")
        if averaged is not None:
            averaged.load_state_dict(state["ema"], strict=not net.base_frozen)
        gen.set_state(state["generator"])
        start_epoch, best, elapsed = state["epoch"], json.loads(state["best"]), state["elapsed"]
        history = json.loads(state["history"])

    mean = torch.tensor(normalization["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], device=device).view(1, 3, 1, 1)
    scored = averaged.module if averaged is not None else net  # what val scores and the checkpoint holds
    step = start_epoch * steps_per_epoch(len(train_set.images), cfg.batch_size)
    if start_epoch == 0 and base is not None:
        # The starting point is a candidate too: a trained base, or a head whose initial layer
        # already means something (DPN's Potts context), may score better than what training
        # on augmented crops gives, and selecting on val should see it.
        best, miou = _score_and_keep(cfg, scored, val_set, labels, architecture, normalization, base, best, epoch=0, elapsed=0.0)
        history.append({"epoch": 0, "val_miou": miou})
    bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs, desc="train", file=sys.stderr)
    for epoch in bar:
        t0 = time.perf_counter()
        net.train()
        losses, terms = [], {}
        for images, targets in batches(train_set, cfg.batch_size, aug, labels.ignore_index, gen):
            lr = peak_lr * (1 - step / total_steps) ** 0.9
            for group in opt.param_groups:
                group["lr"] = lr
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            named = net.loss((images - mean) / std, targets, weights, labels.ignore_index)
            loss = sum(named.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(net)
            losses.append(loss.item())
            for name, value in named.items():
                terms.setdefault(name, []).append(value.item())
            step += 1
        elapsed += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(elapsed, 1)}
        if len(terms) > 1:
            record["terms"] = {name: float(np.mean(values)) for name, values in terms.items()}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            best, record["val_miou"] = _score_and_keep(cfg, scored, val_set, labels, architecture, normalization, base, best, epoch + 1, elapsed)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", val_miou=f"{best['miou']:.3f}")
        torch.save(
            {
                "model": net.head_state_dict() if net.base_frozen else net.state_dict(),
                "base_sha256": base.sha256 if base else "",
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "best": json.dumps(best),
                "elapsed": elapsed,
                "history": json.dumps(history),
            }
            | ({"ema": averaged.state_dict()} if averaged is not None else {}),
            state_path.with_suffix(".tmp"),
        )
        state_path.with_suffix(".tmp").replace(state_path)
        (work / "history.json").write_text(json.dumps(history, indent=1))
    return best


def _score_and_keep(cfg, net, val_set, labels, architecture, normalization, base, best: dict, epoch: int, elapsed: float) -> tuple[dict, float]:
    """Score `net` on val; on a new best, write the deployable checkpoint. -> (the best so far, the score now)."""
    confusion = evaluate(net, val_set, labels.num_classes, labels.ignore_index)
    miou = mean_iou(confusion)
    if miou > best["miou"]:
        best = {
            "miou": miou,
            "epoch": epoch,
            "per_class_iou": dict(zip(labels.classes, per_class_iou(confusion).round(4).tolist())),
            "train_seconds": round(elapsed, 1),
        }
        _save_deployable(cfg, net, labels, architecture, normalization, base, best)
    return best, miou


def training_device(name: str) -> torch.device:
    """The device `--device` names; `auto` is the GPU when torch sees one. A missing GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name}: torch sees no CUDA device here; use --device cpu or auto")
    return device


def weight_average(net: torch.nn.Module, decay: float):
    """An exponential moving average of `net`'s weights and batch-norm statistics (None when decay is 0).

    Averaging the weights of the last few hundred steps evens out the noise of small-batch
    AdamW, which val scores otherwise show from one evaluation to the next; torch's own
    AveragedModel does it, buffers included, so the average is a network that runs as is.
    """
    if not decay:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"--ema {decay}: give a decay per step between 0 and 1, such as 0.998, or 0 for none")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def load_base(cfg: TrainConfig, architecture: dict, labels) -> BaseModel | None:
    """The base checkpoint `cfg` starts from (None: from scratch), checked against what is trained.

    The base must be a complete FCN checkpoint of the same variant, backbone and classes.
    """
    choice = cfg.base if cfg.base is not None else (BUNDLED if head_class(cfg.head).starts_from_base else "none")
    if choice.lower() == "none":
        return None
    url = str(BUNDLED_CHECKPOINT) if choice == BUNDLED else choice
    state_dict, meta, sha = read_checkpoint(url)
    reference = BUNDLED if choice == BUNDLED else (url if "://" in url else str(Path(url).resolve()))
    base_arch = meta.get("architecture", {})
    wanted = {k: v for k, v in architecture.items() if k not in ("head", "head_config")}
    if "base" in meta or base_arch != wanted:
        raise CheckpointError(f"{url}: base must be a complete {wanted} checkpoint without a head; it is {base_arch}")
    if tuple(meta.get("labels", {}).get("classes", ())) != tuple(labels.classes):
        raise CheckpointError(f"{url}: base classes {meta.get('labels', {}).get('classes')} are not label set {labels.name!r}'s")
    return BaseModel(reference, sha, state_dict, meta)


def peak_learning_rate(cfg: TrainConfig, net, base: BaseModel | None) -> float:
    """`cfg.lr`, else FINE_TUNE_LR when every weight of a trained base learns, else SCRATCH_LR."""
    if cfg.lr is not None:
        return cfg.lr
    return FINE_TUNE_LR if base is not None and not net.base_frozen else SCRATCH_LR


def _load_base_weights(net, base: BaseModel) -> None:
    missing, unexpected = net.load_state_dict(base.state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"{base.reference}: weights do not fit the network: missing {missing[:3]}, unexpected {unexpected[:3]}")


@torch.no_grad()
def evaluate(net: torch.nn.Module, data: SegmentationSet, num_classes: int, ignore_index: int | None, batch_size: int = 4) -> np.ndarray:
    """Summed (K, K) confusion of `net` on `data` at full resolution."""
    net.eval()
    device = next(net.parameters()).device
    mean = torch.tensor(getattr(net, "mean", IMAGENET_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(getattr(net, "std", IMAGENET_STD), device=device).view(1, 3, 1, 1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(data.images), batch_size):
        chunk = data.images[start : start + batch_size]
        if len({t.shape for t in chunk}) > 1:
            preds = [net(((t[None].to(device).float() / 255) - mean) / std).argmax(1)[0] for t in chunk]
        else:
            preds = list(net((torch.stack(chunk).to(device).float() / 255 - mean) / std).argmax(1))
        for pred, label in zip(preds, data.labels[start : start + batch_size]):
            confusion += confusion_matrix(label.numpy(), pred.cpu().numpy(), num_classes, ignore_index)
    return confusion


def _save_deployable(cfg: TrainConfig, net, labels, architecture, normalization, base: BaseModel | None, best) -> None:
    """Write the best checkpoint: complete, or (frozen base) the head alone, pinned to its base's sha256."""
    meta = {
        "architecture": architecture,
        "labels": labels.to_dict(),
        "normalization": {"mean": list(normalization["mean"]), "std": list(normalization["std"])},
        "training": {
            "data": {"images": cfg.images, "labels": cfg.labels, "val_images": cfg.val_images, "val_labels": cfg.val_labels},
            "command": cfg.command,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "command"} | {"lr": peak_learning_rate(cfg, net, base)},
            "epoch": best["epoch"],
            "seconds": best["train_seconds"],
        },
        "metrics": {"val_miou": round(best["miou"], 4), "val_per_class_iou": best["per_class_iou"]},
    }
    if base is not None:
        meta["training"]["base"] = {"checkpoint": base.reference, "sha256": base.sha256}
    weights = {k: v.cpu() for k, v in net.state_dict().items()}
    if net.base_frozen:
        meta["base"] = {"checkpoint": base.reference, "sha256": base.sha256}
        weights = net.head_state_dict()
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{cfg.output}.tmp"
    save_checkpoint(tmp, weights, meta)
    Path(tmp).replace(cfg.output)
