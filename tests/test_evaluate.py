"""`evaluate` end to end on real CamVid val images with the bundled model.

The engine's per-image confusion matrices (metrics/) must equal an independent numpy
bincount of the committed masks against the label files, and the dataset summary must
equal what the summed matrices give.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segflow.models.registry import BUNDLED_CHECKPOINT
from segflow.pipeline import job
from segflow.pipeline.config import LabelPairing, SegmentConfig
from segflow.pipeline.masks import decode_mask
from segflow.pipeline.reader import read_masks, read_metrics

K, VOID = 11, 11


def _bincount_confusion(label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """torchvision's reference-script formula, written out independently of pipeline.metrics."""
    keep = (label >= 0) & (label < K)
    return np.bincount(K * label[keep].astype(int) + pred[keep], minlength=K * K).reshape(K, K)


@pytest.fixture(scope="module")
def evaluated(camvid, tmp_path_factory, ray_local):
    if not BUNDLED_CHECKPOINT.exists():
        pytest.skip("the bundled model has not been trained into this checkout yet")
    out = tmp_path_factory.mktemp("eval")
    listing = out / "images.txt"
    names = sorted(p.name for p in (camvid / "val").iterdir())[::25][:4]
    listing.write_text("".join(f"{camvid / 'val' / n}\n" for n in names))
    cfg = SegmentConfig(
        input=str(listing), output=str(out / "run"), shard_size=2, progress=False,
        evaluation=LabelPairing(labels=str(camvid / "valannot")),
    )
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    summary = job.summarise_stage(cfg, plan, job.run_stage(cfg, plan))
    return cfg, plan, summary, job.finish_evaluation(cfg, plan), names


def test_confusion_matrices_equal_independent_bincount_to_the_last_pixel(evaluated, camvid):
    cfg, _, summary, _, names = evaluated
    assert summary.masks == len(names) and summary.errors == 0
    masks = {r["uri"]: r for r in read_masks(cfg.output, columns=["uri", "mask", "raw_mask"]).to_pylist()}
    total = {"raw": np.zeros((K, K), np.int64), "crf": np.zeros((K, K), np.int64)}
    # the dense matrices, asked for by name, are rebuilt from the stored cells and counts
    for row in read_metrics(cfg.output, columns=["uri", "label_uri", "raw_confusion", "crf_confusion"]).to_pylist():
        label = np.array(Image.open(row["label_uri"]))
        label = np.where(label == VOID, -1, label)
        mask_row = masks[row["uri"]]
        for variant, column in (("raw", "raw_mask"), ("crf", "mask")):
            expected = _bincount_confusion(label, decode_mask(mask_row[column]).astype(int))
            got = np.array(row[f"{variant}_confusion"]).reshape(K, K)
            assert np.array_equal(got, expected), f"{row['uri']} {variant}"
            total[variant] += expected
    assert len(masks) == len(names)
    with open(f"{cfg.output}/summary.json") as f:
        saved = json.load(f)
    for variant in ("raw", "crf"):
        tp = np.diag(total[variant]).astype(float)
        union = total[variant].sum(0) + total[variant].sum(1) - tp
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        assert saved[variant]["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12)


def test_evaluation_writes_summary_and_self_contained_report(evaluated):
    cfg, _, _, evaluation, _ = evaluated
    html = open(f"{cfg.output}/report.html").read()
    assert not any(f'{attr}="http' in html for attr in ("src", "href"))
    assert "Road" in html and "data:image/" in html  # class table and inline gallery pictures
    assert evaluation["crf"] is not None and evaluation["delta"] is not None
