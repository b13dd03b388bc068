"""The structured models' model card: every variant scored on CamVid val in one run.

    python bench/structured_card.py [--dpn CKPT] [--context CKPT] [--crfrnn CKPT] [--limit N] [--json PATH]

For each variant (FCN alone; FCN + dense CRF; FCN + post-hoc meanfield, lattice and
window; the jointly trained FCN + CRF layer; DPN; the contextual CRF) it reports, over
the 11 CamVid classes with void ignored, mIoU and per-class IoU from one summed confusion
matrix, boundary F-score (2 px), trimap mIoU at 2, 5 and 10 px, and CPU-seconds per
image (network + refinement, `--threads` torch threads, this machine). Everything runs
through the engine's own functions (probabilities_from_logits, the refinement kinds), so
the numbers are the engine's. Head checkpoints default to the bundled ones beside the
bundled model; a variant whose checkpoint is absent is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from segflow.models import catalog
from segflow.models.crf import resolve_refinement
from segflow.models.data import load_folder_pair
from segflow.models.probabilities import labels_and_confidence, probabilities_from_logits
from segflow.models.registry import load_model
from segflow.models.scores import confusion_matrix, mean_iou, per_class_iou
from segflow.pipeline.evaluation.boundary import boundary_counts, trimap_band
from segflow.pipeline.evaluation.metrics import boundary_f1

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
TRIMAP_WIDTHS = (2, 5, 10)


class Totals:
    """Summed confusion, boundary counts and trimap confusions of one variant (merged by addition)."""

    def __init__(self, k: int):
        self.k = k
        self.confusion = np.zeros((k, k), np.int64)
        self.boundary = np.zeros((4, k), np.int64)
        self.trimap = {w: np.zeros((k, k), np.int64) for w in TRIMAP_WIDTHS}
        self.seconds = 0.0
        self.images = 0

    def process(self, label: np.ndarray, pred: np.ndarray, ignore: int | None, seconds: float) -> None:
        valid = (label < self.k) if ignore is None else (label != ignore) & (label < self.k)
        self.confusion += confusion_matrix(label, pred, self.k, ignore)
        self.boundary += boundary_counts(label, pred, valid, self.k, 2)
        for w in TRIMAP_WIDTHS:
            band = trimap_band(label, valid, w)
            self.trimap[w] += confusion_matrix(label[band], pred[band], self.k, ignore)
        self.seconds += seconds
        self.images += 1

    def compute(self, classes: list[str]) -> dict:
        _, _, f1 = boundary_f1(self.boundary)
        return {
            "miou": round(100 * mean_iou(self.confusion), 2),
            "per_class_iou": dict(zip(classes, np.round(100 * per_class_iou(self.confusion), 1).tolist())),
            "boundary_f": round(100 * float(np.nanmean(f1)), 2),
            **{f"trimap_miou_{w}px": round(100 * mean_iou(self.trimap[w]), 2) for w in TRIMAP_WIDTHS},
            "cpu_seconds_per_image": round(self.seconds / max(1, self.images), 3),
            "images": self.images,
        }


def _logits(net, image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return net.lowres_logits((image[None].float() / 255 - mean) / std)[0].float().numpy()


def score(loaded, refinements: dict, data, limit: int | None) -> dict:
    """{variant: Totals} for one network and the refinements applied after it."""
    net = loaded.net.eval()
    labels = loaded.labels
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    totals = {name: Totals(labels.num_classes) for name in refinements}
    for image, label in list(zip(data.images, data.labels))[:limit]:
        t0 = time.process_time()
        probs = probabilities_from_logits(_logits(net, image, mean, std), *image.shape[-2:])
        raw, _ = labels_and_confidence(probs)
        network_seconds = time.process_time() - t0
        rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        gt = label.numpy()
        for name, kind in refinements.items():
            t1 = time.process_time()
            pred = raw if kind is None else kind.refine(rgb, probs)
            totals[name].process(gt, pred, labels.ignore_index, network_seconds + time.process_time() - t1)
    return {name: t.compute(labels.classes) for name, t in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for head in ("dpn", "context", "crfrnn"):
        default = catalog.head_checkpoint_path(f"fcn8s_resnet18_{head}")
        p.add_argument(f"--{head}", default=str(default), help=f"the {head} checkpoint (default {default})")
    p.add_argument("--limit", type=int, help="first N val images only (default: all 101)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", help="also write the results here (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_folder_pair(str(CAMVID / "val"), str(CAMVID / "valannot"))
    results = {}
    base = load_model()
    tuned = base.meta.get("crf") or {}
    results.update(score(base, {
        "FCN-8s": None,
        "FCN-8s + dense CRF (pydensecrf2)": resolve_refinement("dense", tuned=tuned),
        "FCN-8s + meanfield, lattice (post hoc)": resolve_refinement("meanfield", {"backend": "lattice"}, tuned),
        "FCN-8s + meanfield, window (post hoc)": resolve_refinement("meanfield", {"backend": "window"}, tuned),
    }, data, args.limit))
    for head, title in (("crfrnn", "FCN-8s + CRF layer, trained jointly"), ("dpn", "DPN"), ("context", "contextual CRF")):
        path = getattr(args, head)
        if not Path(path).exists():
            print(f"{title}: no checkpoint at {path}; skipped", flush=True)
            continue
        variants = {title: None}
        if head == "context":  # Lin et al. follow their coarse prediction with the dense CRF
            variants[f"{title} + dense CRF"] = resolve_refinement("dense", tuned=tuned)
        for name, r in score(load_model(checkpoint=path), variants, data, args.limit).items():
            results[name] = r | {"checkpoint": path}
    for name, r in results.items():
        print(json.dumps({"variant": name, **r}), flush=True)
    print("| variant | mIoU | boundary F | trimap mIoU 2/5/10 px | CPU-s/image |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['miou']:.2f} | {r['boundary_f']:.2f} | {r['trimap_miou_2px']:.1f} / {r['trimap_miou_5px']:.1f} / {r['trimap_miou_10px']:.1f} | {r['cpu_seconds_per_image']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
