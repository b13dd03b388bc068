"""Relabelled ground truth: rescore current masks from OUTPUT, without running the model again.

Every metrics row (and every `label` error row) carries `label_key`, the content key of
the label file it was scored (or refused) against. When an evaluation's LABELS change,
`stale_scores` finds the images whose mask is current but whose score was made against
another label (or none), and `rescore` recomputes their metrics from the stored masks:
decode the mask PNGs, read the new label, `image_metrics`. Each shard's errors and metrics
files are then rewritten (the rows they replace go to OUTPUT/history/ first): the errors
file first, so a crash in between leaves an image with neither a score nor a label row,
which the next plan finds stale again; never a stale score that looks current.

Rows written before `label_key` existed say nothing about their label: they are taken
as current (rescoring a whole old OUTPUT on upgrade would cost more than it tells).
The rows a rewritten file keeps have their confusion matrices in today's sparse form, with
the same counts, whichever form the file held (`sparse.upgrade`).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segflow.pipeline.commit import ERRORS, MASKS, METRICS, metrics_schema, shard_file_url, table_bytes
from segflow.pipeline.evaluation.sparse import upgrade
from segflow.pipeline.storage import commit_file, filesystem_for, with_retries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rescore:
    """Images to rescore in one committed shard: parallel tuples (uri, label_uri, label_key)."""

    shard_id: str
    uris: tuple[str, ...]
    label_uris: tuple[str | None, ...]
    label_keys: tuple[str | None, ...]


def stale_scores(manifest: pa.Table, existing, work_uris: set[str]) -> list[Rescore]:
    """Shards whose images have a current mask but a score made against another label than LABELS' now.

    `existing`: state.ExistingOutputs (its files); `manifest`: with label_uri, label_key.
    """
    fs = existing.fs
    masked: dict[str, str] = {}  # uri -> shard of its mask
    stored: dict[str, str | None] = {}  # uri -> label_key its score or refusal was made against
    for (dataset, sid), path in sorted(existing.files.items()):
        if dataset == MASKS:
            for uri in with_retries(pq.read_table, path, columns=["uri"], filesystem=fs, what=path).column("uri").to_pylist():
                masked[uri] = sid
            continue
        names = with_retries(pq.read_schema, path, filesystem=fs, what=path).names
        if dataset not in (METRICS, ERRORS):
            continue
        if "label_key" not in names:  # written before label keys: unknown, taken as current
            columns = ["uri"] + (["stage"] if dataset == ERRORS else [])
            table = with_retries(pq.read_table, path, columns=columns, filesystem=fs, what=path)
            if dataset == ERRORS:
                table = table.filter(pc.equal(table.column("stage"), "label"))
            for uri in table.column("uri").to_pylist():
                stored.setdefault(uri, "<unknown>")
            continue
        columns = ["uri", "label_key"] + (["stage"] if dataset == ERRORS else [])
        table = with_retries(pq.read_table, path, columns=columns, filesystem=fs, what=path)
        if dataset == ERRORS:
            table = table.filter(pc.equal(table.column("stage"), "label"))
        for uri, key in zip(table.column("uri").to_pylist(), table.column("label_key").to_pylist()):
            stored[uri] = key
    by_shard: dict[str, list[tuple[str, str | None, str | None]]] = {}
    columns = [manifest.column(c).to_pylist() for c in ("uri", "label_uri", "label_key")]
    for uri, label_uri, label_key in zip(*columns):
        if uri in work_uris or uri not in masked:
            continue
        before = stored.get(uri, "<none>")
        if before == "<unknown>" or (before == "<none>" and label_key is None) or before == label_key:
            continue
        by_shard.setdefault(masked[uri], []).append((uri, label_uri, label_key))
    return [Rescore(sid, *map(tuple, zip(*rows))) for sid, rows in sorted(by_shard.items())]


def rescore(output: str, shards: list[Rescore], context, superseded_by: str, storage_options: dict | None = None) -> int:
    """Recompute the metrics of `shards`' images from their stored masks; -> images rescored.

    `context`: the job's refine.RefineContext (evaluation options, classes, storage).
    """
    from segflow.errors import ImageError
    from segflow.pipeline.history import history_url
    from segflow.pipeline.masks import decode_mask
    from segflow.pipeline.refine import _metrics_row

    fs, _ = filesystem_for(output, storage_options)
    done = 0
    for shard in shards:
        wanted = pa.array(list(shard.uris), pa.string())
        masks_path = _path(output, MASKS, shard.shard_id, storage_options)
        masks = with_retries(pq.read_table, masks_path, filesystem=fs, what=masks_path)
        masks = masks.filter(pc.is_in(masks.column("uri"), value_set=wanted)).to_pylist()
        label_of = dict(zip(shard.uris, zip(shard.label_uris, shard.label_keys)))
        scores, refusals = [], []
        for row in masks:
            label_uri, label_key = label_of[row["uri"]]
            refined = decode_mask(row["mask"]) if row["raw_mask"] is not None else None
            raw = decode_mask(row["raw_mask"]) if row["raw_mask"] is not None else decode_mask(row["mask"])
            base = {k: row[k] for k in ("uri", "key", "shard_id", "node_id", "job_fingerprint", "model_fingerprint", "crf_fingerprint")}
            try:
                scores.append({**_metrics_row({"label_uri": label_uri}, context, base, raw, refined), "label_key": label_key})
            except ImageError as exc:  # a label refused, or unreadable now: the image's label row says which
                reason = exc.reason if exc.uri == row["uri"] else f"label {exc.uri}: {exc.reason}"
                refusals.append({**base, "stage": "label", "reason": reason, "attempts": 1, "image_fault": True, "label_key": label_key})
        stamp = _dt.datetime.now(_dt.timezone.utc)
        # errors first (see the module docstring), then metrics; what each loses goes to history before
        for dataset, new_rows in ((ERRORS, refusals), (METRICS, scores)):
            _replace_rows(fs, output, dataset, shard.shard_id, [r["uri"] for r in masks], new_rows, stamp, superseded_by,
                          history_url(output, dataset), storage_options)
        done += len(masks)
    if done:
        log.info("rescored %d image(s) whose labels changed, from their stored masks", done)
    return done


def _replace_rows(fs, output, dataset, sid, uris, new_rows, stamp, superseded_by, history, storage_options) -> None:
    from segflow.pipeline.schema import ERRORS_SCHEMA

    schema = ERRORS_SCHEMA if dataset == ERRORS else metrics_schema()
    path = _path(output, dataset, sid, storage_options)
    try:
        old = with_retries(pq.read_table, path, filesystem=fs, what=path)
    except FileNotFoundError:
        old = schema.empty_table()
    metadata = old.schema.metadata
    if dataset == METRICS:  # an older file's dense matrices become cells and counts, not nulls
        old = upgrade(old)
    old = _conform(old, schema)
    drop = pc.is_in(old.column("uri"), value_set=pa.array(uris, pa.string()))
    if dataset == ERRORS:  # only label rows are replaced; an image's other error rows are not about its label
        drop = pc.and_(drop, pc.equal(old.column("stage"), "label"))
    gone = old.filter(drop)
    if len(gone):
        gone = gone.append_column("superseded_at", pa.array([stamp] * len(gone), pa.timestamp("us", tz="UTC")))
        gone = gone.append_column("superseded_by", pa.array([superseded_by] * len(gone), pa.string()))
        commit_file(f"{history}/rescore-{sid}-{stamp.strftime('%Y%m%dT%H%M%S%fZ')}.parquet", table_bytes(gone, metadata), storage_options)
    if not len(gone) and not new_rows:
        return
    kept = old.filter(pc.invert(drop))
    table = pa.concat_tables([kept, pa.Table.from_pylist(new_rows, schema=schema)]).sort_by("uri")
    commit_file((fs, path), table_bytes(table, metadata))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: columns it lacks (older files) are null."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _path(output: str, dataset: str, sid: str, storage_options: dict | None) -> str:
    _, path = filesystem_for(shard_file_url(output, dataset, sid), storage_options)
    return path
