"""The driver's memory for evaluation rows at ADE20K's 150 classes: dense vs sparse rows, and K's share.

    python bench/confusion_memory.py --images 200 --json confusion-memory.json
    python bench/confusion_memory.py --images 200 --classes 11 --scene-classes 11   # the same scenes ...
    python bench/confusion_memory.py --images 200 --classes 150 --scene-classes 11  # ... at K = 11 and 150

Why: the driver keeps every metrics row of a shard until the shard commits. Each row holds
four confusion matrices (raw and CRF, whole image and trimap band) and, per variant, five
per-class lists (IoU, four boundary counts). Dense, that is 4 x 150^2 = 90,000 integers plus
10 x 150 values per image. Sparse (pipeline/evaluation/sparse.py), it is the nonzero cells
and the classes the image holds only, so a row no longer grows with K: the two runs with
`--scene-classes 11` score identical scenes over 11 and over 150 classes, and their sparse
forms should need the same memory.

The rows are real `image_metrics` rows (void 255) of synthetic 480x360 scenes: 10-20
classes (out of the first `--scene-classes`, by default all K) per image, in regions (a
Voronoi partition, void on region edges); the raw prediction moves the region edges by
~8 px and gives 3 regions a wrong class, the CRF one ~4 px and 1 region. They are computed
once here, then pickled one by one to a file in each form ("dense": the lists older
segflow stored; "sparse": today's), as Ray hands results to the driver.

Each form is measured in its own fresh interpreter, which does what the driver does with
an evaluation's rows: it unpickles them one at a time into the lists of the shards in
flight (all `--images` at once, in shards of `--shard-size`), commits each shard
(`commit.commit_shard`, the dense form with the schema older outputs were written with),
then summarises OUTPUT/metrics (`summary.summarise_metrics`). It reports its RSS after the
imports, after holding every row, and its peak (`ru_maxrss`); the ratios compare what the
rows add above the imports. Both forms' summaries must be equal, or the run fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

K, VOID, HEIGHT, WIDTH = 150, 255, 360, 480
MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    global K
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=K, help="K, the label set's size (default: ADE20K's 150)")
    p.add_argument("--scene-classes", type=int, help="draw each scene's classes from the first N only (default: all K); "
                   "the same N at two --classes values gives the same scenes, so only K differs")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    K = args.classes
    if args.child:
        print(json.dumps(_drive(json.loads(args.child))))
        return 0
    from segflow.pipeline.evaluation.metrics import image_metrics
    from segflow.pipeline.evaluation.sparse import MATRICES, dense_row

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows = [{"uri": f"img{i:05d}.png", "label_uri": f"img{i:05d}.label.png", "shard_id": "",
             **image_metrics(*_scene(rng, args.scene_classes or K), K, VOID)} for i in range(args.images)]
    seconds_rows = time.perf_counter() - t0
    cells = [len(r[f"{m}_cells"]) for r in rows for m in MATRICES]
    result = {"images": args.images, "classes": K, "image_size": f"{WIDTH}x{HEIGHT}", "shard_size": args.shard_size,
              "nonzero_cells_per_matrix": {"mean": round(float(np.mean(cells)), 1), "max": int(max(cells))},
              "seconds_computing_rows": round(seconds_rows, 1)}
    matrix_values = {"dense": 4 * K * K, "sparse": 2 * float(np.mean(cells)) * len(MATRICES)}
    held = [len(r[f"{v}_classes"]) for r in rows for v in ("raw", "crf")]
    per_class_values = {"dense": 10 * K, "sparse": 2 * 6 * float(np.mean(held))}  # per variant: classes, IoU, 4 counts
    with tempfile.TemporaryDirectory(prefix="segflow-confusion-memory-") as tmp:
        for form, convert in (("dense", lambda r: dense_row(r, K)), ("sparse", lambda r: r)):
            path = Path(tmp) / f"{form}.pickles"
            with open(path, "wb") as f:
                for row in rows:
                    pickle.dump(convert(row), f, protocol=pickle.HIGHEST_PROTOCOL)
            spec = {"form": form, "rows": str(path), "output": str(Path(tmp) / form), "shard_size": args.shard_size}
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
            if child.returncode != 0:
                sys.stderr.write(child.stderr)
                raise SystemExit(f"the {form} child failed (exit status {child.returncode})")
            result[form] = json.loads(child.stdout.strip().splitlines()[-1])
            # integers and floats in a row's lists: its matrices, and its per-class lists (IoU, boundary counts)
            result[form]["list_values_per_row"] = {"matrices": round(matrix_values[form]), "per_class": round(per_class_values[form])}
            path.unlink()
    dense, sparse = result["dense"], result["sparse"]
    if dense.pop("summary_sha256") != sparse.pop("summary_sha256"):
        raise SystemExit("the dense and sparse rows gave different summaries")
    result["same_summary"] = True
    result["ratio_dense_to_sparse"] = {
        "rows_held_mib": round(dense["held_mib"] / sparse["held_mib"], 1),
        "peak_over_imports_mib": round(dense["peak_over_imports_mib"] / sparse["peak_over_imports_mib"], 1),
        "peak_rss_mib": round(dense["peak_rss_mib"] / sparse["peak_rss_mib"], 2),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _scene(rng: np.random.Generator, pool: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, raw prediction, CRF prediction), (H, W) int class maps; see the module docstring.

    Classes come from the first `pool` of the K; with fewer than 10 there, every one of them.
    """
    n = min(int(rng.integers(10, 21)), pool)
    classes = rng.choice(pool, n, replace=False)
    seeds = rng.uniform((0, 0), (HEIGHT, WIDTH), (3 * n, 2)).astype(np.float32)
    seed_class = np.concatenate([classes, rng.choice(classes, 2 * n)])
    label = _regions(seeds, seed_class).astype(np.int64)
    label[label != np.roll(label, 1, axis=1)] = VOID  # unlabelled region edges, as in ADE20K

    def predicted(jitter: float, wrong: int) -> np.ndarray:
        cls = seed_class.copy()
        for i in rng.choice(len(cls), wrong, replace=False):  # a region's class mistaken, for one present or not
            cls[i] = rng.choice(classes) if rng.random() < 0.5 else rng.integers(pool)
        return _regions(seeds + rng.normal(0, jitter, seeds.shape).astype(np.float32), cls)

    return label, predicted(8.0, 3), predicted(4.0, 1)


def _regions(seeds: np.ndarray, seed_class: np.ndarray, step: int = 4) -> np.ndarray:
    """Each pixel takes its nearest seed's class (computed every `step` px, then repeated)."""
    yy, xx = np.mgrid[0:HEIGHT:step, 0:WIDTH:step].astype(np.float32)
    nearest = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    return np.repeat(np.repeat(seed_class[nearest], step, 0), step, 1)[:HEIGHT, :WIDTH]


def _drive(spec: dict) -> dict:
    """In a fresh interpreter: hold every row as the driver does, commit the shards, summarise."""
    import psutil

    from segflow.pipeline import commit
    from segflow.pipeline.evaluation.sparse import dense_schema
    from segflow.pipeline.evaluation.summary import summarise_metrics

    if spec["form"] == "dense":  # what older segflow wrote: commit_shard with dense matrix columns
        schema = dense_schema(commit.metrics_schema())
        commit.metrics_schema = lambda: schema
    process = psutil.Process()
    imports = process.memory_info().rss
    t0 = time.perf_counter()
    shards: list[list[dict]] = []
    with open(spec["rows"], "rb") as f:
        while True:
            try:
                row = pickle.load(f)
            except EOFError:
                break
            if not shards or len(shards[-1]) == spec["shard_size"]:
                shards.append([])
            shards[-1].append(row)
    held = process.memory_info().rss
    for i, rows in enumerate(shards):
        commit.commit_shard(spec["output"], f"{i:016x}", [], [], rows, {})
    shards.clear()
    summary = summarise_metrics(spec["output"], extremes=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    metrics = Path(spec["output"]) / "metrics"
    return {
        "imports_rss_mib": round(imports / MIB, 1),
        "held_mib": round((held - imports) / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "peak_over_imports_mib": round((peak - imports) / MIB, 1),
        "metrics_files_kib": round(sum(p.stat().st_size for p in metrics.iterdir()) / 1024, 1),
        "seconds": round(time.perf_counter() - t0, 2),
        "summary_sha256": hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
