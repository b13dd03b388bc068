"""Val mIoU and seconds per image of each test-time augmentation setting, in one run.

    python bench/tta_quality.py [--checkpoint URL] [--threads 2] [--limit N]

Runs the network exactly as the model actor does (ImageNet normalisation, `tta_logits`,
then the engine's own probabilities_from_logits and argmax) over CamVid val at full
resolution, without CRF, and prints one markdown row per mode: mIoU over the 11 classes
(void ignored, summed confusion, never a mean of per-image scores) and the network's
seconds per image on this CPU with `--threads` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from segflow.models.data import load_folder_pair
from segflow.models.probabilities import labels_and_confidence, probabilities_from_logits
from segflow.models.registry import load_model
from segflow.models.scores import confusion_matrix, mean_iou
from segflow.models.tta import TTA_MODES, tta_logits

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def measure(checkpoint: str | None, modes: tuple[str, ...], threads: int, limit: int | None) -> list[dict]:
    torch.set_num_threads(threads)
    loaded = load_model(checkpoint=checkpoint)
    net = loaded.net.eval()
    data = load_folder_pair(str(CAMVID / "val"), str(CAMVID / "valannot"))
    images, labels = data.images[:limit], data.labels[:limit]
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    k, ignore = loaded.labels.num_classes, loaded.labels.ignore_index
    rows = []
    for mode in modes:
        confusion = np.zeros((k, k), np.int64)
        seconds = 0.0
        for image, label in zip(images, labels):
            x = (image[None].float() / 255 - mean) / std
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = net.lowres_logits(x) if mode == "none" else tta_logits(net.lowres_logits, x, mode)
            seconds += time.perf_counter() - t0
            pred, _ = labels_and_confidence(probabilities_from_logits(logits[0].numpy(), *image.shape[-2:]))
            confusion += confusion_matrix(label.numpy(), pred, k, ignore)
        rows.append({"tta": mode, "val_miou": round(100 * mean_iou(confusion), 2), "seconds_per_image": round(seconds / len(images), 3), "images": len(images)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint URL (default: the bundled model)")
    p.add_argument("--modes", default=",".join(TTA_MODES), help=f"comma-separated TTA modes (default {','.join(TTA_MODES)})")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--limit", type=int, help="first N val images only (default: all 101)")
    args = p.parse_args()
    rows = measure(args.checkpoint, tuple(args.modes.split(",")), args.threads, args.limit)
    print("| --tta | val mIoU | network s/image |\n|---|---|---|")
    for r in rows:
        print(f"| {r['tta']} | {r['val_miou']:.2f} | {r['seconds_per_image']:.3f} |")


if __name__ == "__main__":
    main()
