"""Where each image's previous mask is: OUTPUT/history/, or another output of the same collection.

OUTPUT/history/masks/*.parquet holds rows a reprocess replaced (the masks columns plus
`superseded_at`, UTC timestamp, and `superseded_by`, the replacing job's fingerprint;
pipeline/history.py writes them). An image's previous mask is its most recently superseded
row. With another output (`--against OTHER`), it is OTHER's current row.

Finding them costs one pass over the `uri` (and history's two stamp) columns, kept as an
index of one (uri -> file URL) entry per image; the masks themselves are read per shard,
only for the uris that shard needs (`old_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segflow.errors import InputError
from segflow.pipeline.commit import MASKS
from segflow.pipeline.state import committed_files
from segflow.pipeline.storage import filesystem_for, redact, with_retries

HISTORY = "history"


@dataclass(frozen=True)
class Replacement:
    """Which history rows one run wrote: superseded by its job fingerprint, at or after its start."""

    job_fingerprint: str
    since: datetime

    def names(self, row: dict) -> bool:
        return row["superseded_by"] == self.job_fingerprint and row["superseded_at"] >= self.since


def history_url(output: str) -> str:
    """OUTPUT/history/masks: the previous versions of replaced masks."""
    return f"{output.rstrip('/')}/{HISTORY}/{MASKS}"


def has_history(output: str, options: dict | None = None) -> bool:
    """Whether OUTPUT/history/masks/ holds any Parquet file (the previous versions of replaced masks)."""
    return bool(_history_files(output, options or {}))


def index_previous(output: str, against: str | None, options: dict, replaced_by: Replacement | None = None) -> dict[str, str]:
    """uri -> URL of the file holding its previous row: OTHER's masks with `against`, else OUTPUT's history."""
    return _index_against(against, options) if against is not None else _index_history(output, options, replaced_by)


def read_old_masks(output: str, uris: set[str], against: str | None = None, storage_options: dict | None = None) -> dict[str, bytes]:
    """{uri: old mask PNG} for the wanted uris (the report's few images): history's latest or OTHER's."""
    options = storage_options or {}
    index = index_previous(output, against, options)
    by_file: dict[str, list[str]] = {}
    for uri in uris:
        if uri in index:
            by_file.setdefault(index[uri], []).append(uri)
    return {uri: row["mask"] for uri, row in old_rows(by_file, against is None, options).items()}


def old_rows(by_file: dict[str, list[str]], history: bool, options: dict) -> dict[str, dict]:
    """{file URL: uris} -> {uri: previous row (uri, key, mask, job_fingerprint[, superseded_at])}."""
    columns = ["uri", "key", "mask", "job_fingerprint"] + (["superseded_at"] if history else [])
    found: dict[str, dict] = {}
    for url, uris in by_file.items():
        for row in read_rows(url, columns, uris, options).to_pylist():
            prior = found.get(row["uri"])
            if prior is None or (history and row["superseded_at"] > prior["superseded_at"]):
                found[row["uri"]] = row
    return found


def read_rows(url: str, columns: list[str], uris: list[str] | None, options: dict) -> pa.Table:
    """Columns of one Parquet file, only the rows of `uris` (all with None)."""
    fs, path = filesystem_for(url, options)
    table = with_retries(pq.read_table, path, filesystem=fs, columns=columns, what=url)
    if uris is not None:
        table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(uris, pa.string())))
    return table


def _index_against(other: str, options: dict) -> dict[str, str]:
    """uri -> URL of OTHER's committed masks file holding it."""
    files = committed_files(other, MASKS, options)
    if not files:
        raise InputError(f"--against {redact(other)}: no masks of committed shards there; give another output of the same collection")
    return _index(other, files, options)


def _index_history(output: str, options: dict, replaced_by: Replacement | None = None) -> dict[str, str]:
    """uri -> URL of the history file holding its most recently superseded row (`replaced_by`: only rows it names)."""
    files = _history_files(output, options)
    if not files:
        raise InputError(f"{redact(history_url(output))}: no history yet (a reprocess writes it when it replaces masks); "
                         "compare with another output instead: segflow diff OUTPUT DIFF --against OTHER")
    fs, _ = filesystem_for(output, options)
    where: dict[str, tuple] = {}
    for path in files:
        table = with_retries(pq.read_table, path, filesystem=fs, columns=["uri", "superseded_at", "superseded_by"], what=path)
        url = fs.unstrip_protocol(path) if not is_local(fs) else path
        for row in table.to_pylist():
            prior = where.get(row["uri"])
            if prior is None or row["superseded_at"] > prior[1]["superseded_at"]:
                where[row["uri"]] = (url, row)
    return {uri: url for uri, (url, row) in where.items() if replaced_by is None or replaced_by.names(row)}


def _history_files(output: str, options: dict) -> list[str]:
    url = history_url(output)
    fs, directory = filesystem_for(url, options)
    fs.invalidate_cache()
    if not with_retries(fs.isdir, directory, what=url):
        return []
    names = with_retries(fs.ls, directory, detail=False, what=url)
    return sorted(p for p in names if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))


def _index(root: str, files: list[str], options: dict) -> dict[str, str]:
    fs, _ = filesystem_for(root, options)
    where: dict[str, str] = {}
    for path in files:
        table = with_retries(pq.read_table, path, filesystem=fs, columns=["uri"], what=path)
        url = fs.unstrip_protocol(path) if not is_local(fs) else path
        where.update(dict.fromkeys(table.column("uri").to_pylist(), url))
    return where


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
