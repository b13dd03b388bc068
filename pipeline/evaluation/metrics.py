"""Confusion matrices and the scores derived from them.

Every dataset-level score is computed from a summed confusion matrix, never from a mean of
per-image scores: per-image means over-weight small images and classes that barely appear.
Rows are ground truth, columns are predictions.

The flow for `segflow evaluate`: the engine calls `image_metrics` once per image and writes
its dict as one Parquet row (types in `metric_schema`); `MetricTotals` (or `aggregate`) sums
the count columns of any number of rows and derives every dataset score from the sums.
A row's confusion matrices are stored sparse, as their nonzero cells, and its per-class lists
over the classes the image holds, not all K (`sparse.py` says why); rows of older outputs,
dense, are summed alike.
A class absent from both ground truth and prediction has no score: it is None (null in
Parquet and JSON), never 0 or 1.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segflow.pipeline.evaluation.boundary import COUNT_NAMES, GT, GT_MATCHED, PRED, PRED_MATCHED, boundary_counts, trimap_band
from segflow.errors import LabelError
from segflow.pipeline.evaluation.sparse import (
    cells_and_counts,
    legacy_fields,
    per_class_fields,
    row_classes,
    sparse_fields,
    sum_cells,
    sum_per_class,
)
from segflow.models.scores import (  # noqa: F401  (re-exported: the metric kernels' historical home)
    confusion_matrix,
    frequency_weighted_iou,
    mean_class_accuracy,
    mean_iou,
    per_class_accuracy,
    per_class_iou,
    pixel_accuracy,
)

VARIANTS = ("raw", "crf")  # raw model mask, CRF-refined mask


def boundary_f1(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4, K) boundary counts (see `boundary.boundary_counts`, or their sum) -> (K,) precision, recall, F1.

    Precision is NaN without predicted boundary pixels, recall NaN without ground-truth ones.
    F1 is NaN when the class has boundary pixels on neither side (nothing to judge), and 0
    when only one side has them (an edge was missed entirely, or invented).
    """
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counts[PRED] > 0, counts[PRED_MATCHED] / counts[PRED], np.nan)
        recall = np.where(counts[GT] > 0, counts[GT_MATCHED] / counts[GT], np.nan)
        both = np.nan_to_num(precision) + np.nan_to_num(recall)
        f1 = np.where(both > 0, 2 * np.nan_to_num(precision) * np.nan_to_num(recall) / both, 0.0)
    f1 = np.where((counts[PRED] == 0) & (counts[GT] == 0), np.nan, f1)
    return precision, recall, f1


def metric_schema() -> pa.Schema:
    """The Parquet types of the columns `image_metrics` returns (K = number of classes).

    Per variant v in ("raw", "crf"); the crf columns are null when the CRF did not run:
    v_confusion_cells list<int32> and v_confusion_counts list<int64>: the (K, K) confusion matrix
    (rows = ground truth) as the row-major indices of its nonzero cells and their pixel counts
    (`sparse.py`); v_trimap_confusion_cells and _counts the same restricted to the trimap band;
    v_pixel_accuracy, v_miou, v_bf float64 (per-image, for ranking and browsing only);
    v_classes list<int32>: the classes this image's valid ground truth or its v mask holds,
    ascending; the per-class lists below have one value per class in it (`sparse.py`):
    v_class_iou list<float64>; v_class_boundary_pred, v_class_boundary_pred_matched,
    v_class_boundary_gt, v_class_boundary_gt_matched list<int64>. A class not in v_classes
    has IoU None (absent from both sides) and no boundary pixels.
    num_classes int32: K, once per row (null on rows without a score).
    """
    fields = [pa.field("num_classes", pa.int32())]
    for v in VARIANTS:
        fields += [
            *sparse_fields(f"{v}_confusion"),
            *sparse_fields(f"{v}_trimap_confusion"),
            pa.field(f"{v}_pixel_accuracy", pa.float64()),
            pa.field(f"{v}_miou", pa.float64()),
            pa.field(f"{v}_bf", pa.float64()),
            *per_class_fields(v),
        ]
    return pa.schema(fields)


def count_columns() -> list[str]:
    """The columns dataset aggregation needs; read only these (plus what ranking needs).

    The dense confusion columns of older outputs are among them (`count_types` has their types).
    """
    matrices = [f.name for v in VARIANTS for m in ("confusion", "trimap_confusion") for f in sparse_fields(f"{v}_{m}")]
    boundary = [f"{v}_class_boundary_{c}" for v in VARIANTS for c in COUNT_NAMES]
    classes = [f"{v}_classes" for v in VARIANTS]
    legacy = [f.name for f in legacy_fields() if not f.name.endswith("_iou")]
    return ["num_classes", *matrices, *classes, *boundary, *legacy]


def count_types() -> dict[str, pa.DataType]:
    """Column name -> Parquet type, for `metric_schema`'s columns and the dense ones of older outputs."""
    return {f.name: f.type for f in [*metric_schema(), *legacy_fields()]}


def image_metrics(
    label: np.ndarray,
    raw_pred: np.ndarray,
    crf_pred: np.ndarray | None,
    num_classes: int,
    ignore_index: int | None,
    tolerance: int = 2,
    trimap_width: int = 8,
    *,
    uri: str = "label",
) -> dict:
    """One image's metric columns (see `metric_schema`) from (H, W) int class maps.

    `label` is ground truth with void as `ignore_index` (or any value outside [0, K));
    predictions hold classes in [0, K). `tolerance` and `trimap_width` are in pixels.
    Raises LabelError (naming `uri`) when the label and a prediction differ in size, which
    the engine records as an error row for that image.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise LabelError(uri, f"label must be a 2-D (H, W) class map, got shape {label.shape}")
    preds = {"raw": raw_pred, "crf": crf_pred}
    for variant, pred in preds.items():
        if pred is not None and np.shape(pred) != label.shape:
            raise LabelError(uri, f"label is {label.shape[1]}x{label.shape[0]} (WxH) but the {variant} mask is "
                             f"{'x'.join(map(str, np.shape(pred)[::-1]))}; the label must have its image's size")
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid &= label != ignore_index
    band = trimap_band(label, valid, trimap_width)
    row: dict = {"num_classes": num_classes}
    for variant, pred in preds.items():
        if pred is None:
            row.update({f.name: None for f in metric_schema() if f.name.startswith(variant + "_")})
            continue
        pred = np.asarray(pred)
        confusion = confusion_matrix(label, pred, num_classes, ignore_index)
        trimap = confusion_matrix(label[band], pred[band], num_classes, ignore_index)
        counts = boundary_counts(label, pred, valid, num_classes, tolerance)
        for name, matrix in (("confusion", confusion), ("trimap_confusion", trimap)):
            row[f"{variant}_{name}_cells"], row[f"{variant}_{name}_counts"] = cells_and_counts(matrix)
        row[f"{variant}_pixel_accuracy"] = _number(pixel_accuracy(confusion))
        row[f"{variant}_miou"] = _number(mean_iou(confusion))
        row[f"{variant}_bf"] = _number(_nanmean(boundary_f1(counts)[2]))
        # every class with a pixel on either side (valid pixels only, as the counts are)
        classes = np.flatnonzero(confusion.sum(0) + confusion.sum(1) + counts.sum(0))
        row[f"{variant}_classes"] = classes.tolist()
        row[f"{variant}_class_iou"] = _numbers(per_class_iou(confusion)[classes])
        for i, name in enumerate(COUNT_NAMES):
            row[f"{variant}_class_boundary_{name}"] = counts[i][classes].tolist()
    return row


class MetricTotals:
    """Running sums of the metric count columns; merges by addition, scores from the sums.

    Three sums are kept: "raw" over every scored image, "crf" over images with a CRF mask, and
    "raw_paired" (raw over the same images as "crf"), so that crf - raw compares like with like
    even if some images have no CRF mask.
    """

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.rows = 0  # every row seen, error rows included
        self.images = {"raw": 0, "crf": 0, "raw_paired": 0}
        self.sums: dict[str, dict[str, np.ndarray]] = {}

    def process(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add the rows of one batch. Rows without a raw confusion matrix (error rows) only count in `rows`.

        Each row's matrices may be sparse (cells and counts) or, in older outputs, dense.
        """
        self.rows += batch.num_rows
        sparse = {v: _valid(batch, f"{v}_confusion_cells") for v in VARIANTS}
        ok = {v: pc.or_(sparse[v], _valid(batch, f"{v}_confusion")) for v in VARIANTS}
        both = pc.and_(ok["raw"], ok["crf"])
        selections = {"raw": ok["raw"], "crf": both, "raw_paired": both}
        for key, rows in selections.items():
            n = pc.sum(rows.cast(pa.int64())).as_py() or 0
            if not n:
                continue
            variant = key.split("_")[0]
            k = self._classes(batch, variant, rows)
            self.images[key] += n
            zeros = {"confusion": (k, k), "trimap_confusion": (k, k), "boundary": (4, k)}
            sums = self.sums.setdefault(key, {name: np.zeros(shape, np.int64) for name, shape in zeros.items()})
            as_cells = pc.and_(rows, sparse[variant])
            as_dense = pc.and_(rows, pc.invert(sparse[variant]))
            for name in ("confusion", "trimap_confusion"):
                column = f"{variant}_{name}"
                if pc.any(as_cells).as_py():
                    sums[name] += sum_cells(_column(batch, f"{column}_cells").filter(as_cells),
                                            _column(batch, f"{column}_counts").filter(as_cells), k, column).reshape(k, k)
                if pc.any(as_dense).as_py():
                    sums[name] += _sum_lists(batch, column, as_dense, k * k).reshape(k, k)
            per_class = pc.and_(rows, _valid(batch, f"{variant}_classes"))
            per_class_dense = pc.and_(rows, pc.invert(_valid(batch, f"{variant}_classes")))
            for i, name in enumerate(COUNT_NAMES):
                if pc.any(per_class).as_py():
                    sums["boundary"][i] += sum_per_class(_column(batch, f"{variant}_classes").filter(per_class),
                                                         _column(batch, f"{variant}_class_boundary_{name}").filter(per_class),
                                                         k, f"{variant}_class_boundary_{name}")
                if pc.any(per_class_dense).as_py():
                    sums["boundary"][i] += _sum_lists(batch, f"{variant}_boundary_{name}", per_class_dense, k)

    def merge(self, other: "MetricTotals") -> None:
        """Add another worker's totals into these."""
        if other.num_classes is not None and self.num_classes not in (None, other.num_classes):
            raise ValueError(f"cannot merge totals over {other.num_classes} classes into totals over {self.num_classes}")
        self.num_classes = self.num_classes or other.num_classes
        self.rows += other.rows
        for key, n in other.images.items():
            self.images[key] += n
        for key, sums in other.sums.items():
            mine = self.sums.setdefault(key, {name: np.zeros_like(a) for name, a in sums.items()})
            for name, a in sums.items():
                mine[name] += a

    def compute(self) -> dict:
        """The dataset summary: scores per variant, crf - raw deltas, counts of images. JSON-ready."""
        scores = {key: _scores(s) for key, s in self.sums.items()}
        crf, paired = scores.get("crf"), scores.get("raw_paired")
        return {
            "num_classes": self.num_classes,
            "rows": self.rows,
            "images_scored": self.images["raw"],
            "images_with_crf": self.images["crf"],
            "raw": scores.get("raw"),
            "crf": crf,
            "delta": _delta(crf, paired) if crf and paired else None,
        }

    def _classes(self, batch: pa.RecordBatch | pa.Table, variant: str, rows: pa.Array) -> int:
        """K of the scored rows: their `num_classes`, or in older outputs the length of their dense per-class lists."""
        lengths = pc.unique(row_classes(batch, variant).filter(rows)).to_pylist()
        if len(lengths) != 1 or lengths[0] is None:
            raise ValueError(f"scored rows say {lengths} classes; each scored row must say K (num_classes, or K per-class counts)")
        k = lengths[0]
        if self.num_classes not in (None, k):
            raise ValueError(f"rows hold {k}x{k} confusion matrices but earlier rows (or the label set) say "
                             f"{self.num_classes} classes; were runs with different label sets written to one output?")
        self.num_classes = k
        return k


def aggregate(tables: Iterable[pa.Table | pa.RecordBatch] | pa.Table, num_classes: int | None = None) -> dict:
    """Metric rows (any number of tables or batches) -> dataset summary, from summed counts only."""
    if isinstance(tables, (pa.Table, pa.RecordBatch)):
        tables = [tables]
    totals = MetricTotals(num_classes)
    for table in tables:
        totals.process(table)
    return totals.compute()


SCALARS = ("miou", "pixel_accuracy", "mean_class_accuracy", "fw_iou", "bf", "trimap_miou", "trimap_pixel_accuracy")
PER_CLASS_DELTAS = ("iou", "accuracy", "bf", "trimap_iou")


def _scores(sums: dict[str, np.ndarray]) -> dict:
    cm, tcm, counts = sums["confusion"], sums["trimap_confusion"], sums["boundary"]
    iou = per_class_iou(cm)
    bf_p, bf_r, bf = boundary_f1(counts)
    return {
        "miou": _number(_nanmean(iou)),
        "pixel_accuracy": _number(pixel_accuracy(cm)),
        "mean_class_accuracy": _number(mean_class_accuracy(cm)),
        "fw_iou": _number(frequency_weighted_iou(cm)),
        "bf": _number(_nanmean(bf)),
        "trimap_miou": _number(mean_iou(tcm)),
        "trimap_pixel_accuracy": _number(pixel_accuracy(tcm)),
        "absent": np.flatnonzero(np.isnan(iou)).tolist(),
        "per_class": {
            "iou": _numbers(iou),
            "accuracy": _numbers(per_class_accuracy(cm)),
            "bf": _numbers(bf),
            "bf_precision": _numbers(bf_p),
            "bf_recall": _numbers(bf_r),
            "trimap_iou": _numbers(per_class_iou(tcm)),
            "gt_pixels": cm.sum(1).tolist(),
            "pred_pixels": cm.sum(0).tolist(),
        },
        "confusion": cm.tolist(),
        "trimap_confusion": tcm.tolist(),
        "boundary_counts": {name: counts[i].tolist() for i, name in enumerate(COUNT_NAMES)},
    }


def _delta(crf: dict, raw: dict) -> dict:
    out = {key: minus(crf[key], raw[key]) for key in SCALARS}
    out["per_class"] = {
        key: [minus(c, r) for c, r in zip(crf["per_class"][key], raw["per_class"][key])] for key in PER_CLASS_DELTAS
    }
    return out


def minus(a: float | None, b: float | None) -> float | None:
    """a - b, or None when either is missing (a score of a class or variant that did not occur)."""
    return None if a is None or b is None else a - b


def _valid(batch: pa.RecordBatch | pa.Table, column: str) -> pa.Array:
    if column not in batch.schema.names:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    return _column(batch, column).is_valid()


def _column(batch: pa.RecordBatch | pa.Table, column: str) -> pa.Array:
    col = batch.column(column)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _sum_lists(batch: pa.RecordBatch | pa.Table, column: str, rows: pa.Array, length: int) -> np.ndarray:
    """Sum the selected rows' list<int64> values element-wise -> (length,) int64."""
    chosen = _column(batch, column).filter(rows)
    if chosen.null_count or pc.any(pc.not_equal(pc.list_value_length(chosen), length)).as_py():
        raise ValueError(f"column {column!r}: every scored row needs a list of {length} counts (found nulls or other lengths)")
    flat = chosen.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return flat.reshape(-1, length).sum(axis=0)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _number(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _numbers(values: np.ndarray) -> list[float | None]:
    return [_number(v) for v in values]
