"""Reading segflow's outputs: tables as Arrow or pandas, masks as numpy arrays.

    from segflow.pipeline.reader import read_masks, read_errors, load_mask
    table = read_masks("out/")                      # pyarrow.Table
    df = read_masks("out/", columns=["uri", "pixel_counts"]).to_pandas()
    mask = load_mask("out/", "/data/img_001.png")   # (H, W) uint8 class ids

Only committed shards are read: staging files, and the errors and metrics files of a commit
that was interrupted before its masks file, are ignored. Rows already replaced by a
committed shard but not yet moved to OUTPUT/history/ (a run killed in between) are hidden,
so every image has exactly one row here, the old one or the new one (`history.hidden_rows`).
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from segflow.pipeline.commit import ERRORS, MASKS, METRICS, metrics_schema
from segflow.pipeline.evaluation.sparse import MATRICES, dense_column, legacy_fields, legacy_per_class_fields, per_class_fields, upgrade
from segflow.pipeline.history import hidden_rows
from segflow.pipeline.masks import decode_mask
from segflow.pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA, image_fault
from segflow.pipeline.state import committed_files
from segflow.pipeline.storage import filesystem_for


def open_dataset(output: str, name: str, storage_options: dict | None = None) -> ds.Dataset | None:
    """The Parquet dataset `name` (masks, errors, metrics) of OUTPUT's committed shards, or None if it has none.

    Files of an interrupted commit (errors or metrics without their shard's masks file) and
    staging files are left out (`state.committed_files`).
    """
    paths = committed_files(output, name, storage_options)
    if not paths:
        return None
    fs, _ = filesystem_for(output, storage_options)
    return _current(ds.dataset(paths, filesystem=fs, format="parquet"), output, storage_options)


def read_masks(output: str, columns: list[str] | None = None, filter=None, storage_options: dict | None = None) -> pa.Table:
    """The masks table (see README for columns); `filter` is a pyarrow.compute expression."""
    return _read(output, MASKS, MASKS_SCHEMA, columns, filter, storage_options)


def read_errors(output: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    """The errors table (see README for columns).

    `image_fault` is filled in for rows of outputs written before it existed, from `stage`.
    """
    paths = committed_files(output, ERRORS, storage_options)
    if not paths:
        return ERRORS_SCHEMA.empty_table().select(columns) if columns else ERRORS_SCHEMA.empty_table()
    fs, _ = filesystem_for(output, storage_options)
    table = _current(ds.dataset(paths, schema=ERRORS_SCHEMA, filesystem=fs, format="parquet"), output, storage_options).to_table()
    table = table.set_column(table.schema.get_field_index("image_fault"), "image_fault", image_fault(table))
    return table.select(columns) if columns else table


def read_metrics(output: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    """The metrics table (evaluate; columns in `commit.metrics_schema`), confusion matrices sparse.

    Each matrix m (`raw_confusion`, `raw_trimap_confusion`, `crf_confusion`,
    `crf_trimap_confusion`) is the pair m_cells, m_counts (evaluation/sparse.py), and each
    variant's per-class lists are over its `<variant>_classes`, rows of outputs written
    before those forms included. Name m itself in `columns` to get it as the
    dense K*K row-major list older versions stored, built from either form.
    """
    paths = committed_files(output, METRICS, storage_options)
    if not paths:
        return pa.table({})
    fs, _ = filesystem_for(output, storage_options)
    found = ds.dataset(paths, filesystem=fs, format="parquet")
    # One schema for every file: older ones hold the dense columns, newer the sparse ones.
    schema = metrics_schema()
    for field in [*legacy_fields(), *(f for fragment in found.get_fragments() for f in fragment.physical_schema)]:
        if field.name not in schema.names:
            schema = schema.append(field)
    dataset = _current(ds.dataset(paths, schema=schema, filesystem=fs, format="parquet"), output, storage_options)
    dense = [m for m in MATRICES if columns is not None and m in columns]
    table = upgrade(dataset.to_table(columns=None if columns is None else _metrics_sources(columns)))
    for m in dense:  # K per row: its num_classes (upgrade fills it in for older rows)
        k = table.column("num_classes")
        table = table.append_column(m, dense_column(table.column(f"{m}_cells"), table.column(f"{m}_counts"), k))
    return table.select(columns) if columns is not None else table


def load_mask(output: str, uri: str, raw: bool = False, storage_options: dict | None = None) -> np.ndarray:
    """The (H, W) uint8 mask of one image (`raw=True`: the model's mask before the CRF)."""
    column = "raw_mask" if raw else "mask"
    table = read_masks(output, columns=["uri", column], filter=pc.field("uri") == uri, storage_options=storage_options)
    if len(table) == 0:
        raise KeyError(f"{uri}: no mask in {output}")
    png = table.column(column)[0].as_py()
    if png is None:
        raise KeyError(f"{uri}: no raw mask (the CRF did not run, so `mask` is the raw mask)")
    return decode_mask(png)


def iter_masks(output: str, raw: bool = False, storage_options: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (uri, mask) pairs batch by batch, with flat memory."""
    dataset = open_dataset(output, MASKS, storage_options)
    if dataset is None:
        return
    column = "raw_mask" if raw else "mask"
    for batch in dataset.to_batches(columns=["uri", column], batch_size=256):
        for uri, png in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if png is not None:
                yield uri, decode_mask(png)


def output_metadata(output: str, storage_options: dict | None = None) -> dict:
    """The segflow metadata (label set, fingerprints, CRF) stored in the masks files."""
    dataset = open_dataset(output, MASKS, storage_options)
    if dataset is None:
        return {}
    meta = dataset.schema.metadata or {}
    return json.loads(meta.get(b"segflow", b"{}"))


def _read(output, name, schema, columns, filter, storage_options) -> pa.Table:
    dataset = open_dataset(output, name, storage_options)
    if dataset is None:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return dataset.to_table(columns=columns, filter=filter)


def _metrics_sources(columns: list[str]) -> list[str]:
    """The stored columns `read_metrics` needs to return `columns`: a matrix's both forms, and K for a dense one."""
    matrices = [m for m in MATRICES if any(c == m or c.startswith(f"{m}_") for c in columns)]
    sources = [c for c in columns if c not in MATRICES]
    for m in matrices:
        sources += [f"{m}_cells", f"{m}_counts", m] + (["num_classes", _per_class(m)] if m in columns else [])
    for v in ("raw", "crf"):  # a variant's per-class lists, or K: both forms (older rows' K is their lists' length)
        if any(c == f"{v}_classes" or c.startswith(f"{v}_class_") or c == "num_classes" for c in columns):
            sources += ["num_classes", *(f.name for f in per_class_fields(v)), *(f.name for f in legacy_per_class_fields(v))]
    return list(dict.fromkeys(sources))


def _per_class(matrix: str) -> str:
    """An older output's K-long per-class list of the matrix's variant: its length is the row's K."""
    return f"{matrix.split('_')[0]}_boundary_gt"


def _current(dataset: ds.Dataset, output: str, storage_options: dict | None) -> ds.Dataset:
    """`dataset` without rows a committed shard has replaced (see the module docstring)."""
    keep = hidden_rows(output, storage_options)
    return dataset if keep is None else dataset.filter(keep)
