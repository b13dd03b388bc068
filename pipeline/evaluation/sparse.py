"""Per-image confusion matrices stored sparse: their nonzero cells and the pixels in each.

Why: a metrics row holds four matrices (raw and CRF, whole image and trimap band), and the
driver keeps every row of a shard until the shard commits. Dense, each is a K*K list: 22,500
integers at ADE20K's 150 classes, 90,000 per image, almost all zero. An image shows a few
classes, so only cells between those classes can be nonzero (at most their number squared),
and in practice far fewer: the diagonal plus the confusions along region borders, about 100
cells per matrix for 10-20 classes in bench/confusion_memory.py's scenes. Stored as those
cells, a row grows with what the image holds, not with K^2 (that bench measures the driver's
memory both ways).

The form, for each matrix column m in `MATRICES`:

    m_cells    list<int32>  row-major indices (ground truth * K + prediction) of the nonzero
                            cells, ascending
    m_counts   list<int64>  the pixels in each of those cells (each > 0)

Both are null where the matrix does not exist (the CRF did not run, an error row).

The per-class lists (IoU and the four boundary counts, per variant v) are stored the same
way, over the classes the image holds rather than all K: `v_classes` (list<int32>, the
classes with a valid ground-truth or predicted pixel, ascending) and `v_class_iou`,
`v_class_boundary_<count>` with one value per class in it. A class outside v_classes has no
IoU and no boundary pixels, so nothing is lost. K is the row's `num_classes`. With K-long
lists, 10 x K values per image remained (1,500 at 150 classes); now the row grows with what
the image holds only, so the driver's memory for the rows in flight no longer grows with K.

Outputs written before these forms hold m itself, dense (list<int64> of K*K, row-major),
and K-long lists `v_iou`, `v_boundary_<count>` (`legacy_fields`; K was their length).
Readers take either form, row by row: `MetricTotals` sums both, `upgrade` turns a table's
dense columns into this form (rescoring rewrites old files with it, `reader.read_metrics`
returns it), and `dense_column` gives the dense matrix back to a caller that asks for m
by name.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# metrics.VARIANTS x (whole image, trimap band); the dense column names of older outputs
MATRICES = ("raw_confusion", "raw_trimap_confusion", "crf_confusion", "crf_trimap_confusion")
VARIANTS = ("raw", "crf")
COUNT_NAMES = ("pred", "pred_matched", "gt", "gt_matched")  # boundary.COUNT_NAMES (this module imports nothing of segflow's)
CELLS_TYPE = pa.list_(pa.int32())  # K up to 46,340 fits; masks hold at most 256 classes
COUNTS_TYPE = pa.list_(pa.int64())
DENSE_TYPE = pa.list_(pa.int64())
CLASSES_TYPE = pa.list_(pa.int32())
SCORES_TYPE = pa.list_(pa.float64())


def sparse_fields(matrix: str) -> list[pa.Field]:
    """The two Parquet fields that store `matrix` (one of `MATRICES`)."""
    return [pa.field(f"{matrix}_cells", CELLS_TYPE), pa.field(f"{matrix}_counts", COUNTS_TYPE)]


def per_class_fields(variant: str) -> list[pa.Field]:
    """The Parquet fields of a variant's per-class lists: its classes, then one value per class in each list."""
    return [pa.field(f"{variant}_classes", CLASSES_TYPE), pa.field(f"{variant}_class_iou", SCORES_TYPE),
            *(pa.field(f"{variant}_class_boundary_{c}", COUNTS_TYPE) for c in COUNT_NAMES)]


def legacy_per_class_fields(variant: str) -> list[pa.Field]:
    """A variant's K-long per-class lists in outputs written before the sparse form."""
    return [pa.field(f"{variant}_iou", SCORES_TYPE), *(pa.field(f"{variant}_boundary_{c}", COUNTS_TYPE) for c in COUNT_NAMES)]


def legacy_fields() -> list[pa.Field]:
    """The dense fields of outputs written before the sparse forms (read, never written)."""
    return [*(pa.field(m, DENSE_TYPE) for m in MATRICES), *(f for v in VARIANTS for f in legacy_per_class_fields(v))]


def row_classes(table: pa.Table | pa.RecordBatch, variant: str) -> pa.Array:
    """Each row's K (int64, null where unknown): its `num_classes`, or in older outputs the length of its dense lists."""
    n = table.num_rows
    own = _combined(table.column("num_classes")).cast(pa.int64()) if "num_classes" in table.schema.names else pa.nulls(n, pa.int64())
    legacy = f"{variant}_boundary_gt"
    if legacy not in table.schema.names or pa.types.is_null(table.schema.field(legacy).type):
        return own
    return pc.coalesce(own, pc.list_value_length(_combined(table.column(legacy))).cast(pa.int64()))


def sum_per_class(classes: pa.Array, values: pa.Array, num_classes: int, what: str = "") -> np.ndarray:
    """Sum many rows' per-class lists over their classes (no nulls) -> (K,) int64, exact."""
    return _sum_sparse(classes, values, num_classes, what, "classes and values",
                       lambda last: f"class {last} lies outside {num_classes} classes")


def dense_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` in the form older outputs wrote: each matrix's cells and counts replaced by
    its dense column, each variant's per-class lists by K-long ones, no `num_classes`
    (tests and bench/ write such files)."""
    fields = []
    for f in schema:
        matrix = f.name.removesuffix("_cells")
        variant = f.name.removesuffix("_classes")
        if matrix in MATRICES:
            fields.append(pa.field(matrix, DENSE_TYPE))
        elif variant in VARIANTS:
            fields += legacy_per_class_fields(variant)
        elif f.name != "num_classes" and not _is_sparse_part(f.name):
            fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def dense_row(row: dict, num_classes: int) -> dict:
    """A metrics row as older outputs stored it: dense K*K matrices, K-long per-class lists."""
    out = {name: value for name, value in row.items() if name != "num_classes" and not _is_sparse_part(name)
           and name.removesuffix("_classes") not in VARIANTS}
    for m in MATRICES:
        cells = row.get(f"{m}_cells")
        out[m] = None if cells is None else to_dense(cells, row[f"{m}_counts"], num_classes).ravel().tolist()
    for v in VARIANTS:
        classes = row.get(f"{v}_classes")
        iou = [None] * num_classes
        for c, value in zip(classes or [], row.get(f"{v}_class_iou") or []):
            iou[c] = value
        out[f"{v}_iou"] = None if classes is None else iou
        for name in COUNT_NAMES:
            counts = np.zeros(num_classes, np.int64)
            if classes is not None:
                counts[classes] = row[f"{v}_class_boundary_{name}"]
            out[f"{v}_boundary_{name}"] = None if classes is None else counts.tolist()
    return out


def _is_sparse_part(name: str) -> bool:
    """A column of the sparse forms other than `<variant>_classes`: matrix cells/counts, per-class values."""
    return (name.removesuffix("_cells") in MATRICES or name.removesuffix("_counts") in MATRICES
            or any(name.startswith(f"{v}_class_") for v in VARIANTS))


def cells_and_counts(matrix: np.ndarray) -> tuple[list[int], list[int]]:
    """(K, K) int counts -> (row-major indices of the nonzero cells, ascending; their counts), as lists."""
    flat = np.asarray(matrix).ravel()
    cells = np.flatnonzero(flat)
    return cells.tolist(), flat[cells].astype(np.int64).tolist()


def to_dense(cells: list[int], counts: list[int], num_classes: int) -> np.ndarray:
    """One row's cells and counts -> its (K, K) int64 matrix."""
    k = num_classes
    out = np.zeros(k * k, np.int64)
    np.add.at(out, np.asarray(cells, np.int64), np.asarray(counts, np.int64))
    return out.reshape(k, k)


def sum_cells(cells: pa.Array, counts: pa.Array, num_classes: int, what: str = "") -> np.ndarray:
    """Sum many rows' sparse matrices (no nulls) -> (K*K,) int64, exact.

    Raises ValueError when a row's two lists differ in length or a cell lies outside K*K
    (a row written for another label set).
    """
    return _sum_sparse(cells, counts, num_classes * num_classes, what, "cells and counts",
                       lambda last: f"cell {last} lies outside a {num_classes}x{num_classes} matrix")


def _sum_sparse(index: pa.Array, values: pa.Array, size: int, what: str, names: str, outside) -> np.ndarray:
    """Rows of (index list, value list) -> their sum as a dense (size,) int64 array, exact.

    Refuses nulls, a row whose two lists differ in length, and an index outside [0, size)
    (`outside(largest index)` says where, for the error).
    """
    index, values = _combined(index).cast(CELLS_TYPE), _combined(values).cast(COUNTS_TYPE)
    if index.null_count or values.null_count:
        raise ValueError(f"{what}: every scored row needs its {names} (found nulls)")
    if pc.any(pc.not_equal(pc.list_value_length(index), pc.list_value_length(values))).as_py():
        raise ValueError(f"{what}: a row's {names} differ in length")
    flat = _values(index)
    if flat.size and (flat.min() < 0 or flat.max() >= size):
        raise ValueError(f"{what}: {outside(int(flat.max()))}; were runs with different label sets written to one output?")
    out = np.zeros(size, np.int64)
    np.add.at(out, flat, _values(values))
    return out


def sparse_from_dense(dense: pa.Array) -> tuple[pa.Array, pa.Array]:
    """A dense K*K list column (older outputs) -> (cells, counts) columns; null rows stay null."""
    dense = _combined(dense)
    n = len(dense)
    if pa.types.is_null(dense.type):
        return pa.nulls(n, CELLS_TYPE), pa.nulls(n, COUNTS_TYPE)
    lengths = pc.fill_null(pc.list_value_length(dense), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = _values(dense)
    row = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
    position = np.arange(values.size) - np.repeat(starts, lengths)
    nonzero = values != 0
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row[nonzero], minlength=n))]).astype(np.int32)
    mask = dense.is_null()
    cells = pa.ListArray.from_arrays(pa.array(offsets), pa.array(position[nonzero], pa.int32()), mask=mask)
    counts = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[nonzero], pa.int64()), mask=mask)
    return cells, counts


def dense_column(cells: pa.Array, counts: pa.Array, num_classes: pa.Array) -> pa.Array:
    """Sparse columns and each row's K -> the dense K*K list column older outputs stored; null rows stay null."""
    cells, counts = _combined(cells).cast(CELLS_TYPE), _combined(counts).cast(COUNTS_TYPE)
    k = pc.fill_null(_combined(num_classes), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    missing = pc.or_(cells.is_null(), pa.array(k <= 0))
    lengths = np.where(missing.to_numpy(zero_copy_only=False), 0, k * k)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.zeros(int(offsets[-1]), np.int64)
    kept = pc.invert(missing)
    cells, counts = cells.filter(kept), counts.filter(kept)
    per_row = pc.list_value_length(cells).to_numpy(zero_copy_only=False).astype(np.int64)
    within = _values(cells)
    if (within >= np.repeat(lengths[lengths > 0], per_row)).any():
        raise ValueError("a row's cells lie outside its KxK matrix (K from its per-class lists)")
    index = within + np.repeat(offsets[:-1][lengths > 0], per_row)
    np.add.at(values, index, _values(counts))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values), mask=missing).cast(DENSE_TYPE)


def upgrade(table: pa.Table) -> pa.Table:
    """`table` with each dense matrix column (older outputs) replaced by its cells and counts.

    Rows that already have cells keep them; the dense columns are dropped. A table without
    dense columns comes back as it is.
    """
    for matrix in MATRICES:
        if matrix not in table.column_names:
            continue
        cells, counts = sparse_from_dense(table.column(matrix))
        for field, legacy in zip(sparse_fields(matrix), (cells, counts)):
            if field.name in table.column_names:
                own = _combined(table.column(field.name)).cast(field.type)
                legacy = pc.if_else(own.is_valid(), own, legacy)
                table = table.set_column(table.schema.get_field_index(field.name), field, legacy)
            else:
                table = table.append_column(field, legacy)
        table = table.drop_columns([matrix])
    for variant in VARIANTS:
        table = _upgrade_per_class(table, variant)
    return table


def _upgrade_per_class(table: pa.Table, variant: str) -> pa.Table:
    """A variant's K-long per-class lists (older outputs) -> its classes and per-class values; K into `num_classes`."""
    legacy = [f.name for f in legacy_per_class_fields(variant) if f.name in table.column_names]
    if not legacy:
        return table
    if all(table.column(name).null_count == table.num_rows for name in legacy):  # newer rows only
        return table.drop_columns(legacy)
    k = row_classes(table, variant)
    if "num_classes" in table.column_names:
        table = table.set_column(table.schema.get_field_index("num_classes"), pa.field("num_classes", pa.int32()), k.cast(pa.int32()))
    else:
        table = table.append_column(pa.field("num_classes", pa.int32()), k.cast(pa.int32()))
    rows = [_row_per_class(table, variant, i) for i in range(table.num_rows)]
    for field in per_class_fields(variant):
        legacy_values = pa.array([None if r is None else r[field.name] for r in rows], field.type)
        if field.name in table.column_names:
            own = _combined(table.column(field.name)).cast(field.type)
            legacy_values = pc.if_else(own.is_valid(), own, legacy_values)
            table = table.set_column(table.schema.get_field_index(field.name), field, legacy_values)
        else:
            table = table.append_column(field, legacy_values)
    return table.drop_columns(legacy)


def _row_per_class(table: pa.Table, variant: str, i: int) -> dict | None:
    """One older row's per-class lists over the classes it holds (those with an IoU or a boundary pixel)."""
    iou = table.column(f"{variant}_iou")[i].as_py() if f"{variant}_iou" in table.column_names else None
    counts = {c: table.column(f"{variant}_boundary_{c}")[i].as_py() if f"{variant}_boundary_{c}" in table.column_names else None
              for c in COUNT_NAMES}
    if iou is None and all(v is None for v in counts.values()):
        return None
    k = len(iou) if iou is not None else len(next(v for v in counts.values() if v is not None))
    held = [c for c in range(k) if (iou is not None and iou[c] is not None)
            or any(v is not None and v[c] for v in counts.values())]
    out = {f"{variant}_classes": held, f"{variant}_class_iou": [iou[c] if iou is not None else None for c in held]}
    for name, values in counts.items():
        out[f"{variant}_class_boundary_{name}"] = [values[c] if values is not None else 0 for c in held]
    return out


def _combined(array):
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _values(lists: pa.Array) -> np.ndarray:
    """The list values of the non-null rows, flattened, as int64."""
    return pc.fill_null(lists.flatten(), 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
