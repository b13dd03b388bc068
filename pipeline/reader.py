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

from segflow.pipeline.commit import ERRORS, MASKS, METRICS
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
    dataset = open_dataset(output, METRICS, storage_options)
    return dataset.to_table(columns=columns) if dataset is not None else pa.table({})


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


def _current(dataset: ds.Dataset, output: str, storage_options: dict | None) -> ds.Dataset:
    """`dataset` without rows a committed shard has replaced (see the module docstring)."""
    keep = hidden_rows(output, storage_options)
    return dataset if keep is None else dataset.filter(keep)
