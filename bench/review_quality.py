"""Does the review score find bad masks? Its ranking against true per-image error on a labelled set.

    python bench/review_quality.py --output /tmp/camvid-val --json review-quality.json

runs `segflow evaluate` on CamVid val (101 images, bundled model, dense CRF; ~2 minutes of
CPU) into OUTPUT unless OUTPUT already holds its metrics, then builds the review queue of
every image with the real code (`segflow.pipeline.review.build_queue`) and compares orders:

- the review score (its definition: segflow/pipeline/review.py);
- mean confidence alone (1 - mean_confidence), and the CRF's changed fraction alone;
- the score's terms added instead of taking the largest;
- a random order (1,000 seeded shuffles: mean, and the 5th-95th percentile).

True per-image error is 1 - the final mask's per-image mIoU (from OUTPUT/metrics; CRF when it
ran), and 1 - per-image pixel accuracy as a second view. Reported per order: Spearman's rank
correlation with the error, and how many of the 10 worst images (by mIoU) are in the top 20.
There is no previous model here, so the score's disagreement term is not exercised.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
WORST, TOP, SHUFFLES = 10, 20, 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="an evaluated OUTPUT, or where to evaluate CamVid val")
    p.add_argument("--images", default=str(CAMVID / "val"), help="images to evaluate when OUTPUT has no metrics")
    p.add_argument("--labels", default=str(CAMVID / "valannot"), help="their labels")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)

    from segflow.pipeline.reader import open_dataset

    if open_dataset(args.output, "metrics") is None:
        subprocess.run([sys.executable, "-m", "segflow.flows.cli", "evaluate", args.images, args.labels, args.output,
                        "--no-progress"], check=True)
    result = measure(args.output)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def measure(output: str) -> dict:
    """The numbers described in the module docstring, for an evaluated OUTPUT."""
    from segflow.pipeline.reader import read_masks, read_metrics
    from segflow.pipeline.review import build_queue

    with tempfile.TemporaryDirectory() as review:
        queue, _ = build_queue(output, review, top=None)
    score = dict(zip(queue.column("uri").to_pylist(), queue.column("score").to_pylist()))
    rows = read_masks(output, columns=["uri", "mean_confidence", "crf_changed_fraction"]).to_pylist()
    metrics = {m["uri"]: m for m in read_metrics(output, columns=["uri", "raw_miou", "crf_miou", "raw_pixel_accuracy",
                                                                  "crf_pixel_accuracy"]).to_pylist()}
    uris = sorted(u for u in score if u in metrics)
    final = lambda m, k: m[f"crf_{k}"] if m[f"crf_{k}"] is not None else m[f"raw_{k}"]  # noqa: E731
    miou_error = np.array([1 - final(metrics[u], "miou") for u in uris])
    pixel_error = np.array([1 - final(metrics[u], "pixel_accuracy") for u in uris])
    by_uri = {r["uri"]: r for r in rows}
    orders = {
        "review score": np.array([score[u] for u in uris]),
        "mean confidence alone": np.array([1 - by_uri[u]["mean_confidence"] for u in uris]),
        "CRF changed fraction alone": np.array([by_uri[u]["crf_changed_fraction"] or 0.0 for u in uris]),
        # the alternative the score's `max` was chosen over: adding the terms instead
        "sum of the terms instead of max": np.array([1 - by_uri[u]["mean_confidence"] + (by_uri[u]["crf_changed_fraction"] or 0.0) / 2
                                                     for u in uris]),
    }
    worst = set(np.argsort(-miou_error, kind="stable")[:WORST])
    result = {"output": output, "images": len(uris), "worst": WORST, "top": TOP,
              "error": "1 - per-image mIoU of the final mask (second view: 1 - pixel accuracy)", "orders": {}}
    for name, values in orders.items():
        top = set(np.argsort(-values, kind="stable")[:TOP])
        result["orders"][name] = {"spearman_miou_error": spearman(values, miou_error),
                                  "spearman_pixel_error": spearman(values, pixel_error),
                                  f"worst{WORST}_in_top{TOP}": len(worst & top)}
    rng = np.random.default_rng(0)
    rhos, found = [], []
    for _ in range(SHUFFLES):
        values = rng.permutation(len(uris)).astype(float)
        rhos.append(spearman(values, miou_error))
        found.append(len(worst & set(np.argsort(-values)[:TOP])))
    result["orders"]["random order"] = {
        "spearman_miou_error": float(np.mean(rhos)), "spearman_miou_error_p5_p95": [float(np.percentile(rhos, 5)), float(np.percentile(rhos, 95))],
        f"worst{WORST}_in_top{TOP}": float(np.mean(found)), f"worst{WORST}_in_top{TOP}_p5_p95": [float(np.percentile(found, 5)), float(np.percentile(found, 95))],
    }
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on ranks, ties given their average rank."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # average the ranks of ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


if __name__ == "__main__":
    sys.exit(main())
