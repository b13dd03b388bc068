"""Committing a shard: one Parquet file per shard in each output dataset, written atomically.

Layout under OUTPUT (see README):

    masks/shard-<id>.parquet     one row per image that produced a mask
    errors/shard-<id>.parquet    one row per image that failed, with stage and reason
    metrics/shard-<id>.parquet   evaluate only: per-image confusion matrices (sparse) and scores

Order matters: errors and metrics are committed first and the masks file last, so the
masks file is the shard's commit marker. A shard with leftovers but no masks file was
interrupted mid-commit; planning removes those leftovers and runs it again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from segflow.pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA
from segflow.pipeline.storage import commit_file

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
    """Write a shard's files, commit marker (masks) last. Rows are sorted by uri for stable output.

    Ctrl-C and SIGTERM that arrive meanwhile are handled once the marker is written
    (`_interrupts_held`): an interrupt between the files would leave an interrupted commit.
    """
    metadata = {b"segflow": json.dumps(file_metadata, sort_keys=True).encode()}
    metrics = pa.Table.from_pylist(sorted(metrics_rows, key=_by_uri), schema=metrics_schema()) if metrics_rows else None
    errors = pa.Table.from_pylist(sorted(error_rows, key=_by_uri), schema=ERRORS_SCHEMA)
    masks = pa.Table.from_pylist(sorted(mask_rows, key=_by_uri), schema=MASKS_SCHEMA)
    with _interrupts_held():
        if metrics is not None:
            _commit_table(shard_file_url(output, METRICS, shard_id), metrics, metadata, storage_options)
        _commit_table(shard_file_url(output, ERRORS, shard_id), errors, metadata, storage_options)
        _commit_table(shard_file_url(output, MASKS, shard_id), masks, metadata, storage_options)


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT and SIGTERM for the block, then deliver them to their own handlers.

    Python runs signal handlers in the main thread between two bytecodes, so an interrupt
    could end a commit after the errors file and before the masks file. Readers ignore
    such leftovers and the next run removes them, but nothing is lost by finishing the
    commit first: its writes take milliseconds on local disk (on an object store, as long
    as its PUTs take). Outside the main thread (where handlers cannot be set, and never
    run) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, and could not be put back
            held[signum] = handler
            signal.signal(signum, lambda number, frame: arrived.append(number))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def metrics_schema() -> pa.Schema:
    """Per-image evaluation rows: identity columns plus `metrics.metric_schema()`."""
    from segflow.pipeline.evaluation.metrics import metric_schema

    # label_key: the label file's content key when scored, so a relabelled ground truth is rescored
    identity = [pa.field(n, pa.string()) for n in ("uri", "label_uri", "shard_id", "job_fingerprint", "label_key")]
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
