"""Committing a shard: one Parquet file per shard in each output dataset, written atomically.

Layout under OUTPUT (see README):

    masks/shard-<id>.parquet     one row per image that produced a mask
    errors/shard-<id>.parquet    one row per image that failed, with stage and reason
    metrics/shard-<id>.parquet   evaluate only: per-image confusion matrices and scores

Order matters: errors and metrics are committed first and the masks file last, so the
masks file is the shard's commit marker. A shard with leftovers but no masks file was
interrupted mid-commit; planning removes those leftovers and runs it again.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA
from pipeline.storage import commit_file

MASKS, ERRORS, METRICS = "masks", "errors", "metrics"
DATASETS = (MASKS, ERRORS, METRICS)


def dataset_url(output: str, dataset: str) -> str:
    return f"{output.rstrip('/')}/{dataset}"


def shard_file_url(output: str, dataset: str, shard_id: str) -> str:
    return f"{dataset_url(output, dataset)}/shard-{shard_id}.parquet"


def commit_shard(
    output: str,
    shard_id: str,
    mask_rows: list[dict],
    error_rows: list[dict],
    metrics_rows: list[dict] | None,
    file_metadata: dict,
    storage_options: dict | None = None,
) -> None:
    """Write a shard's files, commit marker (masks) last. Rows are sorted by uri for stable output."""
    metadata = {b"segflow": json.dumps(file_metadata, sort_keys=True).encode()}
    if metrics_rows:
        metrics = pa.Table.from_pylist(sorted(metrics_rows, key=_by_uri), schema=metrics_schema())
        _commit_table(shard_file_url(output, METRICS, shard_id), metrics, metadata, storage_options)
    errors = pa.Table.from_pylist(sorted(error_rows, key=_by_uri), schema=ERRORS_SCHEMA)
    _commit_table(shard_file_url(output, ERRORS, shard_id), errors, metadata, storage_options)
    masks = pa.Table.from_pylist(sorted(mask_rows, key=_by_uri), schema=MASKS_SCHEMA)
    _commit_table(shard_file_url(output, MASKS, shard_id), masks, metadata, storage_options)


def metrics_schema() -> pa.Schema:
    """Per-image evaluation rows: identity columns plus `metrics.metric_schema()`."""
    from pipeline.metrics import metric_schema

    identity = [pa.field(n, pa.string()) for n in ("uri", "label_uri", "shard_id", "job_fingerprint")]
    return pa.schema([*identity, *metric_schema()])


def table_bytes(table: pa.Table, metadata: dict | None = None) -> bytes:
    """Serialise a table to Parquet bytes (zstd) with optional extra schema metadata."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _commit_table(url: str, table: pa.Table, metadata: dict, storage_options: dict | None) -> None:
    commit_file(url, table_bytes(table, metadata), storage_options=storage_options)


def _by_uri(row: dict) -> str:
    return row["uri"]
