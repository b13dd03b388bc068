"""Replacing rows without losing them: superseded rows stay current until their replacement commits.

A run that reprocesses an image (new model or CRF, changed content, `--force`,
`--retry-errors`) produces a new row in a new shard while the old row sits in an older
shard. The old row is never removed first. For each shard that supersedes rows:

1. stage: the superseded rows, whole, go to `OUTPUT/_replacing/<name>/<dataset>.parquet`
   (history columns: the dataset's own plus `superseded_at`, `superseded_by`), then
   `record.json` (which rows, which shard replaces them). Until the new shard commits,
   the record changes nothing: the old rows are what readers see.
2. commit the new shard (`commit.commit_shard`; its masks file is the marker).
3. finish: copy the staged files to `OUTPUT/history/<dataset>/<name>.parquet`, rewrite
   each old shard file without the superseded rows (masks file last), delete the record.

A crash between 2 and 3 leaves two rows for an image in the plain Parquet files; the
record says which one is stale, so `reader` (and planning) hide it, and the next run or
`segflow verify --repair` finishes the record. Every step is idempotent: a history file
that exists is complete (written atomically) and is not written again; filtering an
already rewritten file changes nothing. A record whose shard never committed is
discarded (its rows were never touched).

Pruning (`--prune`) stages the rows of deleted sources the same way, under a record that
needs no replacement: they leave the current datasets and land in history.

`OUTPUT/history/` keeps every superseded row until `prune_history` (`segflow verify
OUTPUT --prune-history`); nothing expires on its own. Readers of `OUTPUT/masks` with plain
`pyarrow.dataset` never see it: it is a separate folder. docs/history.md has the layout and
why segflow's own files were chosen over a table format.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from segflow.pipeline.commit import ERRORS, MASKS, METRICS, dataset_url, shard_file_url, table_bytes
from segflow.pipeline.storage import commit_file, filesystem_for, redact, with_retries

log = logging.getLogger(__name__)

HISTORY = "history"
REPLACING = "_replacing"  # leading "_": pyarrow.dataset never lists it as data
RECORD = "record.json"
_FINISH_ORDER = (METRICS, ERRORS, MASKS)  # an old shard's masks file, its commit marker, is rewritten last
# Error stages that blame the image itself when a row predates the `image_fault` column (schema.image_fault).
_IMAGE_STAGES = ("read", "decode", "label")


@dataclass
class Record:
    """One pending replacement: `rows` (uri, old shard id) leave the current datasets once it applies."""

    name: str
    shard_id: str | None  # the superseding shard; None: pruned rows, replaced by nothing
    previous_marker: str | None  # identity of masks/shard-<shard_id> when staged (None: absent)
    superseded_by: str
    superseded_at: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps({**self.__dict__, "rows": [list(r) for r in self.rows]}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        d = json.loads(data)
        return cls(**{**d, "rows": [tuple(r) for r in d["rows"]]})


def history_url(output: str, dataset: str) -> str:
    return f"{output.rstrip('/')}/{HISTORY}/{dataset}"


def history_schema(schema: pa.Schema) -> pa.Schema:
    """A dataset's schema plus when its rows were superseded and by which job fingerprint."""
    return schema.append(pa.field("superseded_at", pa.timestamp("us", tz="UTC"))).append(pa.field("superseded_by", pa.string()))


def pending_records(output: str, storage_options: dict | None = None) -> list[Record]:
    """Complete records under OUTPUT/_replacing (record.json written), in name order."""
    fs, _ = filesystem_for(output, storage_options)
    url = f"{output.rstrip('/')}/{REPLACING}"
    _, directory = filesystem_for(url, storage_options)
    fs.invalidate_cache(directory)
    if not with_retries(fs.exists, directory, what=url):
        return []
    records = []
    for entry in sorted(with_retries(fs.ls, directory, detail=False, what=url)):
        path = f"{entry.rstrip('/')}/{RECORD}"
        try:
            records.append(Record.from_json(with_retries(fs.cat_file, path, what=path)))
        except FileNotFoundError:  # still being staged, or staging was killed: not a record yet
            continue
    return records


def applies(record: Record, output: str, storage_options: dict | None = None) -> bool:
    """Whether the record's rows are superseded now: pruned, or its shard committed since staging."""
    if record.shard_id is None:
        return True
    marker = _marker(output, record.shard_id, storage_options)
    return marker is not None and marker != record.previous_marker


def hidden_rows(output: str, storage_options: dict | None = None) -> pc.Expression | None:
    """A filter that keeps only current rows, or None when nothing is hidden (the usual case).

    Rows of applied records are stale: their replacement is committed (or they were
    pruned), and only the clean-up that moves them to history is still to do.
    """
    keep = None
    for record in pending_records(output, storage_options):
        if not record.rows or not applies(record, output, storage_options):
            continue
        uris = pa.array(sorted({u for u, _ in record.rows}), pa.string())
        shards = pa.array(sorted({s for _, s in record.rows}), pa.string())
        stale = pc.field("uri").isin(uris) & pc.field("shard_id").isin(shards)
        keep = ~stale if keep is None else keep & ~stale
    return keep


def finish_pending(output: str, storage_options: dict | None = None) -> int:
    """Finish every applied record and discard the others; -> records finished.

    For the run stage and `segflow verify --repair`, under the output lock. A record whose
    shard did not commit is deleted: its rows are still the current ones.
    """
    finished = 0
    for record in pending_records(output, storage_options):
        if applies(record, output, storage_options):
            finish(output, record, storage_options)
            finished += 1
        else:
            _remove_record(output, record.name, storage_options)
    _remove_incomplete_records(output, storage_options)
    return finished


def stage(
    output: str, name: str, shard_id: str | None, rows: list[tuple[str, str]], files: dict[tuple[str, str], str],
    superseded_by: str, storage_options: dict | None = None,
) -> Record:
    """Write the superseded rows, whole, and then the record under OUTPUT/_replacing/<name>/.

    `files`: (dataset, shard_id) -> path of the committed shard files (state.ExistingOutputs.files).
    """
    fs, _ = filesystem_for(output, storage_options)
    now = _dt.datetime.now(_dt.timezone.utc)
    record = Record(
        name=name, shard_id=shard_id,
        previous_marker=_marker(output, shard_id, storage_options) if shard_id is not None else None,
        superseded_by=superseded_by, superseded_at=now.isoformat(), rows=sorted(rows),
    )
    by_shard: dict[str, set[str]] = {}
    for uri, sid in rows:
        by_shard.setdefault(sid, set()).add(uri)
    for dataset in (MASKS, ERRORS, METRICS):
        tables, metadata = [], None
        for sid, uris in sorted(by_shard.items()):
            path = files.get((dataset, sid))
            if path is None:
                continue
            table = with_retries(pq.read_table, path, filesystem=fs, what=path)
            metadata = metadata or table.schema.metadata
            table = _canonical(table.filter(pc.is_in(table.column("uri"), value_set=pa.array(sorted(uris), pa.string()))), dataset)
            if len(table):
                tables.append(table)
        if not tables:
            continue
        table = pa.concat_tables(tables, promote_options="permissive")
        table = table.append_column("superseded_at", pa.array([now] * len(table), pa.timestamp("us", tz="UTC")))
        table = table.append_column("superseded_by", pa.array([superseded_by] * len(table), pa.string()))
        commit_file(_record_file(output, name, f"{dataset}.parquet"), table_bytes(table, metadata), storage_options)
    commit_file(_record_file(output, name, RECORD), record.to_json(), storage_options)  # last: the record is complete
    return record


def finish(output: str, record: Record, storage_options: dict | None = None) -> None:
    """Move the staged rows to history, rewrite the old shard files without them, drop the record."""
    fs, _ = filesystem_for(output, storage_options)
    for dataset in (MASKS, ERRORS, METRICS):
        staged = _record_file(output, record.name, f"{dataset}.parquet")
        target = f"{history_url(output, dataset)}/{record.name}.parquet"
        _, staged_path = filesystem_for(staged, storage_options)
        _, target_path = filesystem_for(target, storage_options)
        if with_retries(fs.exists, target_path, what=target) or not with_retries(fs.exists, staged_path, what=staged):
            continue  # already moved (a history file is complete once it exists), or nothing of this dataset
        commit_file(target, with_retries(fs.cat_file, staged_path, what=staged), storage_options)
    by_shard: dict[str, set[str]] = {}
    for uri, sid in record.rows:
        if sid != record.shard_id:  # a shard rewritten under its own id replaced its rows itself
            by_shard.setdefault(sid, set()).add(uri)
    for sid, uris in sorted(by_shard.items()):
        value_set = pa.array(sorted(uris), pa.string())
        for dataset in _FINISH_ORDER:
            url = shard_file_url(output, dataset, sid)
            _, path = filesystem_for(url, storage_options)
            try:
                table = with_retries(pq.read_table, path, filesystem=fs, what=url)
            except FileNotFoundError:
                continue
            kept = table.filter(pc.invert(pc.is_in(table.column("uri"), value_set=value_set)))
            if len(kept) != len(table):
                commit_file((fs, path), table_bytes(kept, table.schema.metadata))
    _remove_record(output, record.name, storage_options)


class Replacer:
    """Commits a run's shards so that no row is removed before its replacement is committed.

    Built by the run stage from what OUTPUT holds (`state.ExistingOutputs`, stale rows of
    unfinished records already hidden); the engine hands each finished shard to `commit`.
    """

    def __init__(self, output: str, existing, superseded_by: str, storage_options: dict | None = None, only: set[str] | None = None):
        self.output = output
        self.files = dict(existing.files)
        self.superseded_by = superseded_by
        self.storage_options = storage_options
        rows = existing.rows
        if only is not None:
            rows = rows.filter(pc.is_in(rows.column("uri"), value_set=pa.array(sorted(only), pa.string())))
        self.rows: dict[str, list[tuple[str, str]]] = {}  # uri -> [(dataset, shard_id)]
        for uri, dataset, sid in zip(*(rows.column(c).to_pylist() for c in ("uri", "dataset", "shard_id"))):
            self.rows.setdefault(uri, []).append((dataset, sid))
        self.kept_previous = 0

    def prune(self, uris: set[str]) -> int:
        """Move the rows of `uris` (deleted from the source) to history; -> rows moved."""
        rows = [(u, sid) for u in sorted(uris) for _, sid in self.rows.pop(u, [])]
        if rows:
            record = stage(self.output, f"prune-{_stamp()}", None, rows, self.files, self.superseded_by, self.storage_options)
            finish(self.output, record, self.storage_options)
        return len(rows)

    def commit(self, shard_id: str, masks: list[dict], errors: list[dict], metrics: list[dict] | None,
               commit: Callable[[list, list, list | None], None]) -> None:
        """Stage what the shard supersedes, `commit(masks, errors, metrics)`, then finish.

        An error row that does not blame its image (a failed shard, model or CRF) does not
        replace a mask: the image keeps its previous mask, which the next run retries
        since its fingerprint is not the current one. A model that fails on every image
        thus leaves OUTPUT's masks as they were.
        """
        keep = {r["uri"] for r in errors if not _blames_image(r) and any(
            d == MASKS and sid != shard_id for d, sid in self.rows.get(r["uri"], []))}
        if keep:
            first = next(r["reason"] for r in errors if r["uri"] in keep)
            log.warning("%d image(s) keep their previous mask: the new run failed on them for reasons not of the "
                        "images (first: %s); a rerun tries them again", len(keep), redact(str(first)))
            errors = [r for r in errors if r["uri"] not in keep]
            self.kept_previous += len(keep)
        new = [r["uri"] for r in masks] + [r["uri"] for r in errors]
        rows = sorted({(u, sid) for u in new for _, sid in self.rows.get(u, []) if sid != shard_id})
        if not rows:
            commit(masks, errors, metrics)
            return
        record = stage(self.output, f"shard-{shard_id}-{_stamp()}", shard_id, rows, self.files, self.superseded_by, self.storage_options)
        commit(masks, errors, metrics)
        finish(self.output, record, self.storage_options)
        for u in new:
            self.rows.pop(u, None)


def prune_history(output: str, storage_options: dict | None = None) -> int:
    """Delete OUTPUT/history (every superseded row); -> files deleted. Under the output lock."""
    fs, _ = filesystem_for(output, storage_options)
    url = f"{output.rstrip('/')}/{HISTORY}"
    _, directory = filesystem_for(url, storage_options)
    fs.invalidate_cache(directory)
    if not with_retries(fs.exists, directory, what=url):
        return 0
    files = with_retries(fs.find, directory, what=url)
    for path in files:
        with_retries(fs.rm_file, path, what=path)
    if with_retries(fs.exists, directory, what=url):
        with_retries(fs.rm, directory, recursive=True, what=url)
    return len(files)


# --- helpers ----------------------------------------------------------------------------


def _canonical(table: pa.Table, dataset: str) -> pa.Table:
    """Masks and errors rows in today's schema (columns added since are null), so history files agree."""
    from segflow.pipeline.schema import ERRORS_SCHEMA, MASKS_SCHEMA

    schema = {MASKS: MASKS_SCHEMA, ERRORS: ERRORS_SCHEMA}.get(dataset)
    if schema is None:
        return table
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=pa.schema([f.with_nullable(True) for f in schema]))


def _blames_image(row: dict) -> bool:
    fault = row.get("image_fault")
    return bool(fault) if fault is not None else row.get("stage") in _IMAGE_STAGES


def _marker(output: str, shard_id: str, storage_options: dict | None) -> str | None:
    """Identity of masks/shard-<id> as it is now (size, etag or mtime, inode), or None when absent."""
    url = shard_file_url(output, MASKS, shard_id)
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache(posixpath.dirname(path))
    try:
        info = with_retries(fs.info, path, what=url)
    except FileNotFoundError:
        return None
    return json.dumps([info.get("size"), info.get("ETag") or info.get("etag"), str(info.get("mtime") or info.get("LastModified")),
                       info.get("ino")])


def _record_file(output: str, name: str, file: str) -> str:
    return f"{output.rstrip('/')}/{REPLACING}/{name}/{file}"


def _remove_record(output: str, name: str, storage_options: dict | None) -> None:
    """record.json first: a record without it is no longer one, whatever is left of it."""
    fs, _ = filesystem_for(output, storage_options)
    url = f"{output.rstrip('/')}/{REPLACING}/{name}"
    _, directory = filesystem_for(url, storage_options)
    _, record = filesystem_for(f"{url}/{RECORD}", storage_options)
    if with_retries(fs.exists, record, what=url):
        with_retries(fs.rm_file, record, what=url)
    if with_retries(fs.exists, directory, what=url):
        with_retries(fs.rm, directory, recursive=True, what=url)


def _remove_incomplete_records(output: str, storage_options: dict | None) -> None:
    """Folders of records whose staging was killed before record.json: nothing refers to them."""
    fs, _ = filesystem_for(output, storage_options)
    url = f"{output.rstrip('/')}/{REPLACING}"
    _, directory = filesystem_for(url, storage_options)
    fs.invalidate_cache(directory)
    if not with_retries(fs.exists, directory, what=url):
        return
    for entry in with_retries(fs.ls, directory, detail=False, what=url):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not with_retries(fs.exists, f"{entry.rstrip('/')}/{RECORD}", what=url):
            _remove_record(output, name, storage_options)


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def history_dataset(output: str, dataset: str = MASKS, storage_options: dict | None = None) -> ds.Dataset | None:
    """OUTPUT/history/<dataset> as a pyarrow dataset (superseded rows), or None when there is none."""
    url = history_url(output, dataset)
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache(path)
    if not with_retries(fs.exists, path, what=url):
        return None
    return ds.dataset(path, filesystem=fs, format="parquet")

