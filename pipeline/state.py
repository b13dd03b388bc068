"""What an existing OUTPUT already holds, and what a new run must redo.

The outputs themselves are the state: there is no separate database to drift out of
sync. A committed shard is one whose masks file exists (it is written last); rows of
committed shards say which (uri, key, job fingerprint) results exist.

An image is up to date when it has a row whose content key and job fingerprint match
this run and that counts as done: a mask, or an error row blaming the image itself
(`image_fault`; unreadable, undecodable, too large, bad label). An error row blaming the
run (a failed shard, model or CRF) is retried by the next run. Everything else is work.
Superseded rows are never removed before their replacement exists: they stay current
until the shard that replaces them has committed, and then move to OUTPUT/history/
(`history.py`). Between the two, a crash can leave an image with two rows in the plain
files; the pending record names the stale one, `read_existing` and the readers hide it,
and the next run finishes the move.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from segflow.pipeline.commit import DATASETS, ERRORS, MASKS, dataset_url
from segflow.pipeline.history import hidden_rows
from segflow.pipeline.schema import ERRORS_SCHEMA, image_fault
from segflow.pipeline.storage import clean_staging, filesystem_for, with_retries

SHARD_FILE = re.compile(r"^shard-([0-9a-f]{16})\.parquet$")  # sharding.Shard.file_name; group 1: the shard id
_STATE_COLUMNS = ["uri", "key", "job_fingerprint", "shard_id"]


@dataclass
class ExistingOutputs:
    """Rows of committed shards (uri, key, job_fingerprint, shard_id, dataset, done) and file locations.

    `done`: a mask, or an error row blaming the image (schema.image_fault).
    """

    rows: pa.Table
    files: dict[tuple[str, str], str] = field(default_factory=dict)  # (dataset, shard_id) -> path
    fs: object = None

    @property
    def committed_shards(self) -> set[str]:
        return {sid for (dataset, sid) in self.files if dataset == MASKS}


def shard_files(
    output: str, storage_options: dict | None = None, datasets: tuple[str, ...] = DATASETS, remove_staging: bool = False
) -> dict[tuple[str, str], str]:
    """(dataset, shard_id) -> path of every shard file in OUTPUT's `datasets`, committed or not.

    A shard is committed when its masks file exists; what to make of the others (files of
    an interrupted commit) is the caller's business. One fresh listing per dataset: this
    process's cached listings predate what other writers committed since.
    `remove_staging` deletes staging files of interrupted writes on the way.
    """
    fs, _ = filesystem_for(output, storage_options)
    fs.invalidate_cache()
    files: dict[tuple[str, str], str] = {}
    for dataset in datasets:
        url = dataset_url(output, dataset)
        _, directory = filesystem_for(url, storage_options)
        if not with_retries(fs.exists, directory, what=url):
            continue
        if remove_staging:
            clean_staging((fs, directory))
        for path in with_retries(fs.ls, directory, detail=False, what=url):
            match = SHARD_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                files[(dataset, match.group(1))] = path
    return files


def committed_files(output: str, dataset: str, storage_options: dict | None = None) -> list[str]:
    """Paths of `dataset`'s files (masks, errors or metrics) that belong to committed shards, sorted.

    What readers read: a shard's errors and metrics count only once its masks file, the
    commit marker, exists. Files an interrupted commit left behind are not results (the
    next run removes them and redoes the shard), so no reader may show their rows.
    """
    files = shard_files(output, storage_options, datasets=tuple(dict.fromkeys((MASKS, dataset))))
    committed = {sid for (kind, sid) in files if kind == MASKS}
    return sorted(path for (kind, sid), path in files.items() if kind == dataset and sid in committed)


def has_committed_shards(output: str, storage_options: dict | None = None) -> bool:
    """Whether OUTPUT holds any committed shard: one listing of masks/, nothing read.

    When OUTPUT cannot be listed the answer is True, the cautious one for its callers (the
    error itself surfaces when the run reads OUTPUT).
    """
    try:
        return bool(shard_files(output, storage_options, datasets=(MASKS,)))
    except Exception:  # noqa: BLE001 - see the docstring
        return True


def read_existing(output: str, storage_options: dict | None = None, remove_leftovers: bool = False) -> ExistingOutputs:
    """Read the state columns of every committed shard under OUTPUT.

    Files of interrupted commits (a shard's errors/metrics without its masks marker) and
    staging files are ignored, and deleted when `remove_leftovers` (the run stage does;
    planning stays free of side effects).
    """
    fs, _ = filesystem_for(output, storage_options)
    files = shard_files(output, storage_options, remove_staging=remove_leftovers)
    committed = {sid for (dataset, sid) in files if dataset == MASKS}
    for (dataset, sid), path in list(files.items()):
        if sid not in committed:  # interrupted between its first file and its commit marker
            if remove_leftovers:
                with_retries(fs.rm, path, what=path)
            del files[(dataset, sid)]
    tables = []
    for dataset in (MASKS, ERRORS):
        paths = [p for (d, _), p in files.items() if d == dataset]
        if not paths:
            continue
        if dataset == MASKS:
            t = ds.dataset(paths, filesystem=fs, format="parquet").to_table(columns=_STATE_COLUMNS)
            done = pa.array([True] * len(t), pa.bool_())
        else:  # the schema given: files from before `image_fault` read it as null (decided by stage)
            schema = pa.schema([ERRORS_SCHEMA.field(c) for c in [*_STATE_COLUMNS, "stage", "image_fault"]])
            t = ds.dataset(paths, schema=schema, filesystem=fs, format="parquet").to_table()
            done = image_fault(t)
            stage = t.column("stage")
            t = t.select(_STATE_COLUMNS)
        if dataset == MASKS:
            stage = pa.nulls(len(t), pa.string())
        t = t.append_column("dataset", pa.array([dataset] * len(t), pa.string()))
        t = t.append_column("stage", stage)
        tables.append(t.append_column("done", done))
    rows = pa.concat_tables(tables) if tables else _empty_state()
    stale = hidden_rows(output, storage_options)
    if stale is not None:  # rows already replaced by a committed shard, not yet moved to history
        rows = rows.filter(stale)
    return ExistingOutputs(rows=rows, files=files, fs=fs)


@dataclass
class WorkDiff:
    """The outcome of comparing a manifest with existing outputs."""

    work: pa.Table  # manifest rows to process, sorted by uri
    up_to_date: int
    drop_uris: set[str]  # images whose rows this run supersedes or prunes (moved to history, never just dropped)
    deleted: list[str]  # URIs with results whose source is no longer listed


def diff_work(manifest: pa.Table, existing: ExistingOutputs, job_fingerprint: str, force: bool, retry_errors: bool, prune: bool) -> WorkDiff:
    """Split the manifest into work and up-to-date images; find superseded and deleted results."""
    rows = existing.rows
    listed = manifest.column("uri")
    deleted = pc.filter(rows.column("uri"), pc.invert(pc.is_in(rows.column("uri"), value_set=listed))).unique().to_pylist()
    if force or len(rows) == 0:
        done_uris = pa.array([], pa.string())
    else:
        good = pc.and_(pc.equal(rows.column("job_fingerprint"), job_fingerprint), pc.is_valid(rows.column("key")))
        # error rows blaming the run never count as done; with retry_errors, no error row does
        good = pc.and_(good, pc.equal(rows.column("dataset"), MASKS) if retry_errors else rows.column("done"))
        current = rows.filter(good).select(["uri", "key"])
        matched = manifest.select(["uri", "key"]).join(current, keys=["uri", "key"], join_type="inner")
        # an image with two rows (impossible unless files were edited by hand) is redone to heal it;
        # a mask with a `label` error row beside it (evaluated, but its label missing or refused) is one result
        counts = pc.value_counts(_results(rows).column("uri"))
        duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        done_uris = pc.filter(matched.column("uri"), pc.invert(pc.is_in(matched.column("uri"), value_set=duplicated)))
    is_done = pc.is_in(manifest.column("uri"), value_set=done_uris)
    work = manifest.filter(pc.invert(is_done))
    superseded = pc.filter(rows.column("uri"), pc.is_in(rows.column("uri"), value_set=work.column("uri"))).to_pylist()
    drop = set(superseded) | (set(deleted) if prune else set())
    return WorkDiff(work=work, up_to_date=len(manifest) - len(work), drop_uris=drop, deleted=deleted)


def _results(rows: pa.Table) -> pa.Table:
    """`rows` less the `label` error rows of images that have a mask: those only say why metrics are missing."""
    masked = pc.filter(rows.column("uri"), pc.equal(rows.column("dataset"), MASKS))
    note = pc.and_(pc.equal(rows.column("stage"), "label"), pc.is_in(rows.column("uri"), value_set=masked))
    return rows.filter(pc.invert(pc.fill_null(note, False)))


def _empty_state() -> pa.Table:
    columns = {c: pa.array([], pa.string()) for c in [*_STATE_COLUMNS, "dataset"]}
    return pa.table({**columns, "stage": pa.array([], pa.string()), "done": pa.array([], pa.bool_())})
