"""What a benchmark runs on: N distinct image files in a fresh folder, and the model.

`camvid`: the 468 real CamVid train + val images (480x360 PNG), in a fixed order, copied;
beyond 468 the list cycles and the copies get new names. Copies rather than a .txt
manifest with repeats, because listing de-duplicates a manifest's entries.

`generated`: self-made street scenes at 480x360 (`samples/make_street_scenes.render`),
saved as JPEG like the bundled samples. Rendering is the slow part, so at most
`GENERATED_UNIQUE` scenes are drawn and the rest are copies under new names.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
GENERATED_UNIQUE = 64


def prepare_images(source: str, count: int, folder: Path) -> list[Path]:
    """Write `count` image files under `folder` (created); return their paths in a stable order."""
    folder.mkdir(parents=True, exist_ok=True)
    if source == "camvid":
        originals = camvid_images()
    elif source == "generated":
        originals = _render_scenes(min(count, GENERATED_UNIQUE), folder / "_unique")
    else:
        raise ValueError(f"--source must be camvid or generated, got {source!r}")
    paths = []
    for i in range(count):
        original = originals[i % len(originals)]
        target = folder / f"{i:07d}_{original.name}"
        shutil.copyfile(original, target)
        paths.append(target)
    if source == "generated":
        shutil.rmtree(folder / "_unique")
    return paths


def camvid_images() -> list[Path]:
    found = sorted((CAMVID / "train").glob("*.png")) + sorted((CAMVID / "val").glob("*.png"))
    if not found:
        raise SystemExit(f"no CamVid images under {CAMVID}/train and /val; use --source generated")
    return found


def _render_scenes(count: int, folder: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("make_street_scenes", REPO / "samples" / "make_street_scenes.py")
    scenes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenes)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"street_{seed:04d}.jpg"
        scenes.render(1000 + seed).save(path, quality=88)
        paths.append(path)
    return paths


def choose_model(checkpoint: str | None = None, model: str = "auto", weights: str = "none", num_classes: int = 11):
    """--checkpoint, else --model; "auto" is the bundled model once it exists, else an FCN-8s
    ResNet-18 with random weights (same architecture and cost; its masks are not segmentations)."""
    from segflow.models.catalog import BUNDLED_CHECKPOINT  # torch-free, like the driver it stands in for
    from segflow.pipeline.config import ModelRef

    if checkpoint:
        return ModelRef(checkpoint=checkpoint)
    if model == "bundled" or (model == "auto" and BUNDLED_CHECKPOINT.exists()):
        return ModelRef()
    if model == "auto":
        return ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11)
    return ModelRef(model=model, weights=weights, num_classes=num_classes)
