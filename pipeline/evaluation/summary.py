"""The dataset summary of an evaluate run: stream OUTPUT/metrics/, sum, score, write the summary.

Only the count columns (and the few columns that rank images) are read, batch by batch, so
memory stays flat however many images were evaluated: the running state is a few (K, K)
matrices and the worst/best N images. Outputs, beside the datasets:

    summary.json      every dataset score for raw and crf, crf - raw, per-class lists,
                      summed confusion matrices, and the worst/best images by per-image mIoU
    summary.parquet   one row per class (columns in `class_table`)
"""

from __future__ import annotations

import heapq
import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from segflow.models.labels import LabelSet
from segflow.pipeline.commit import METRICS
from segflow.errors import InputError
from segflow.pipeline.evaluation.metrics import MetricTotals, count_columns, count_types
from segflow.pipeline.state import committed_files
from segflow.pipeline.storage import commit_file, filesystem_for

SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
RANK_COLUMNS = ("uri", "label_uri", "raw_miou", "crf_miou")


def summarise_metrics(
    output_url: str,
    storage_options: dict | None = None,
    label_set: LabelSet | None = None,
    *,
    extremes: int = 8,
    batch_size: int = 2048,
) -> dict:
    """Read OUTPUT/metrics/ column by column, aggregate, write summary.json and summary.parquet.

    -> the summary dict (see `metrics.MetricTotals.compute`) plus "classes", "label_set",
    "worst_images" and "best_images" (each up to `extremes` dicts with uri, label_uri,
    raw_miou, crf_miou, ranked by the final mask's per-image mIoU: crf when it ran, else raw).
    Raises InputError when OUTPUT holds no metrics of committed shards.
    """
    options = storage_options or {}
    fs, _ = filesystem_for(output_url, options)
    paths = committed_files(output_url, METRICS, options)  # an interrupted commit's metrics are not results
    if not paths:
        raise InputError(f"{output_url.rstrip('/')}/metrics: no metrics of committed shards here; "
                         "`segflow evaluate` writes them (`segment` does not)")
    # An explicit schema makes shards agree even when one was written with all-null crf
    # columns (inferred as type null) and lets older files lack a column: the sparse matrix
    # columns before they existed, the dense ones since (each row has one form).
    columns = [*RANK_COLUMNS, *count_columns()]
    dataset = ds.dataset(paths, filesystem=fs, format="parquet", schema=_read_schema(columns))
    totals = MetricTotals(label_set.num_classes if label_set else None)
    ranking = ImageRanking(extremes)
    for batch in dataset.to_batches(columns=columns, batch_size=batch_size):
        totals.process(batch)
        ranking.process(batch)

    summary = totals.compute()
    k = summary["num_classes"] or 0
    summary["classes"] = list(label_set.classes) if label_set else [f"class {i}" for i in range(k)]
    summary["label_set"] = label_set.to_dict() if label_set else None
    summary["worst_images"], summary["best_images"] = ranking.worst(), ranking.best()
    base = output_url.rstrip("/")
    commit_bytes(f"{base}/{SUMMARY_JSON}", json.dumps(summary, indent=1, allow_nan=False).encode(), options)
    sink = pa.BufferOutputStream()
    pq.write_table(class_table(summary), sink)
    commit_bytes(f"{base}/{SUMMARY_PARQUET}", sink.getvalue().to_pybytes(), options)
    return summary


def class_table(summary: dict) -> pa.Table:
    """One row per class: class_id, class, gt_pixels, absent, and for iou, accuracy, bf and
    trimap_iou the columns <score>_raw, <score>_crf, <score>_delta (float64, null when absent
    or when the CRF did not run). `absent` means no ground truth and no prediction in either mask.
    """
    k = summary["num_classes"] or 0
    raw, crf, delta = summary.get("raw"), summary.get("crf"), summary.get("delta")

    def column(part: dict | None, score: str) -> list:
        return part["per_class"][score] if part else [None] * k

    absent = [(raw is None or i in raw["absent"]) and (crf is None or i in crf["absent"]) for i in range(k)]
    data = {
        "class_id": pa.array(range(k), pa.int32()),
        "class": pa.array(summary["classes"][:k], pa.string()),
        "gt_pixels": pa.array(column(raw, "gt_pixels"), pa.int64()),
        "absent": pa.array(absent, pa.bool_()),
    }
    for score in ("iou", "accuracy", "bf", "trimap_iou"):
        data[f"{score}_raw"] = pa.array(column(raw, score), pa.float64())
        data[f"{score}_crf"] = pa.array(column(crf, score), pa.float64())
        data[f"{score}_delta"] = pa.array(column(delta, score), pa.float64())
    return pa.table(data)


class ImageRanking:
    """The `n` worst and best images by final per-image mIoU, kept while streaming batches."""

    def __init__(self, n: int):
        self.n = n
        self._worst: list[dict] = []
        self._best: list[dict] = []

    def process(self, batch: pa.RecordBatch) -> None:
        if self.n <= 0:
            return
        rows = []
        for row in batch.select(list(RANK_COLUMNS)).to_pylist():
            score = row["crf_miou"] if row["crf_miou"] is not None else row["raw_miou"]
            if score is not None:
                rows.append({**row, "miou": score})
        # Ties break on uri so the gallery is the same on every run.
        self._worst = heapq.nsmallest(self.n, self._worst + rows, key=lambda r: (r["miou"], r["uri"]))
        self._best = heapq.nsmallest(self.n, self._best + rows, key=lambda r: (-r["miou"], r["uri"]))

    def worst(self) -> list[dict]:
        return list(self._worst)

    def best(self) -> list[dict]:
        return list(self._best)


def commit_bytes(url: str, data: bytes, storage_options: dict) -> None:
    """Write `data` to `url` so readers see the old file or the whole new one, never a part."""
    commit_file(url, data, storage_options=storage_options)


def _read_schema(columns: list[str]) -> pa.Schema:
    types = count_types()
    types.update(uri=pa.string(), label_uri=pa.string())
    return pa.schema([pa.field(c, types[c]) for c in columns])
