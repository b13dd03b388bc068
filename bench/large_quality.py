"""Does the working size cost accuracy? CamVid val at 480x360 vs the same images upscaled 4x.

    python bench/large_quality.py [--limit N] [--scale 4] [--working-sizes default,480]

Runs the model actor's own code in this process (`ModelWorker.infer_shard` with a refine
context, the bundled FCN-8s and its tuned dense CRF) on CamVid val twice: at its own
480x360, and upscaled `--scale` times (bicubic, PNG so no JPEG loss) with each working size
asked for. Labels are upscaled by nearest neighbour, so a mask that is the original run's
mask upscaled scores exactly the original mIoU. mIoU over the 11 classes from the summed
confusion matrix (void ignored), raw (the network's argmax) and final (after the CRF).
The upscaled images are 1920x1440 at scale 4: the default working size (the bundled
model records none yet, so 1024) runs the network at 1024x768, 2.1x the scale it was
trained at; 480 is what its metadata will say once the lead writes it in.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def segment(paths: list[Path], working_size) -> list[tuple[np.ndarray, np.ndarray]]:
    """(final, raw) masks of each image, from the model actor's code with the bundled model and its CRF."""
    from segflow.models.catalog import describe_model
    from segflow.models.crf import resolve_refinement
    from segflow.pipeline.config import ModelRef
    from segflow.pipeline.inference import InferenceOptions, ModelWorker
    from segflow.pipeline.masks import decode_mask
    from segflow.pipeline.refine import RefineContext
    from segflow.pipeline.sharding import Shard

    info = describe_model(None, None, None, None, 0)
    worker = ModelWorker(ModelRef(working_size=working_size), InferenceOptions(batch_size=1))
    context = RefineContext(
        refiner=resolve_refinement("dense", {}, info.meta.get("crf")),
        num_classes=info.labels.num_classes,
        flat_palette=tuple(info.labels.flat_palette()),
        fingerprints={},
    )
    shard = Shard("quality", tuple(map(str, paths)), ("k",) * len(paths), (None,) * len(paths))
    out = []
    for item in worker.infer_shard(shard, context):
        row = item["mask"]
        out.append((decode_mask(row["mask"]), decode_mask(row["raw_mask"])))
    return out


def upscaled_copies(paths: list[Path], scale: int, folder: Path) -> list[Path]:
    copies = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        copy = folder / path.name
        image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(copy)
        copies.append(copy)
    return copies


def miou(masks: list[np.ndarray], labels: list[np.ndarray], num_classes: int = 11) -> float:
    from segflow.models.scores import confusion_matrix, mean_iou

    total = sum(confusion_matrix(label, mask, num_classes, ignore_index=num_classes) for mask, label in zip(masks, labels))
    return 100 * mean_iou(total)


def compare(paths: list[Path], scale: int, working_sizes: list) -> list[dict]:
    """mIoU rows: the original resolution, then the upscaled copies at each working size."""
    labels = [np.array(Image.open(CAMVID / "valannot" / p.name)) for p in paths]
    big_labels = [np.kron(label, np.ones((scale, scale), label.dtype)) for label in labels]
    original = segment(paths, None)
    rows = [{"run": "original 480x360", "final": miou([m[0] for m in original], labels), "raw": miou([m[1] for m in original], labels)}]
    with tempfile.TemporaryDirectory() as folder:
        copies = upscaled_copies(paths, scale, Path(folder))
        for ws in working_sizes:
            masks = segment(copies, ws)
            rows.append({
                "run": f"x{scale} ({480 * scale}x{360 * scale}), working size {ws or 'default'}",
                "final": miou([m[0] for m in masks], big_labels),
                "raw": miou([m[1] for m in masks], big_labels),
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=0, help="first N val images (default all 101)")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
    p.add_argument("--working-sizes", default="default,480", help="comma-separated: default, full or a long side (default default,480)")
    args = p.parse_args()
    paths = sorted((CAMVID / "val").glob("*.png"))
    paths = paths[: args.limit] if args.limit else paths
    sizes = [None if s == "default" else (s if s == "full" else int(s)) for s in args.working_sizes.split(",")]
    rows = compare(paths, args.scale, sizes)
    print(f"CamVid val, {len(paths)} images")
    print("| run | mIoU final (CRF) | mIoU raw | final - original |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['final']:.2f} | {row['raw']:.2f} | {row['final'] - rows[0]['final']:+.2f} |")


if __name__ == "__main__":
    main()
