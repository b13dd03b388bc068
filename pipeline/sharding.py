"""Deterministic shards: the unit of scheduling, retry and commit.

The work list is sorted by URI and cut into runs of `shard_size`. A shard's id is a hash
of the job fingerprint and its members' (uri, key) pairs, so the same inputs under the
same model and CRF always give the same ids and file names, and a rerun overwrites
instead of duplicating.

Resume falls out of this: committed shards drop out of the work list as whole, aligned
runs of `shard_size`, so re-cutting what is left reproduces the uncommitted shards
exactly, ids included.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Shard:
    """One unit of work: parallel lists of image URIs, content keys and (for evaluate) label URIs."""

    shard_id: str
    uris: tuple[str, ...]
    keys: tuple[str, ...]
    label_uris: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def file_name(self) -> str:
        return f"shard-{self.shard_id}.parquet"


def plan_shards(work: pa.Table, shard_size: int, job_fingerprint: str) -> list[Shard]:
    """Cut a work table (columns uri, key and optionally label_uri; sorted by uri) into shards."""
    uris = work.column("uri").to_pylist()
    keys = [k if k is not None else "" for k in work.column("key").to_pylist()]
    labels = work.column("label_uri").to_pylist() if "label_uri" in work.column_names else [None] * len(uris)
    shards = []
    for start in range(0, len(uris), shard_size):
        members = slice(start, start + shard_size)
        shards.append(
            Shard(
                shard_id=shard_id(job_fingerprint, uris[members], keys[members]),
                uris=tuple(uris[members]),
                keys=tuple(keys[members]),
                label_uris=tuple(labels[members]),
            )
        )
    return shards


def shard_id(job_fingerprint: str, uris: list[str], keys: list[str]) -> str:
    """A 16-hex-digit id that depends only on the fingerprint and the members."""
    h = hashlib.sha256(job_fingerprint.encode())
    for uri, key in zip(uris, keys):
        h.update(b"\0")
        h.update(uri.encode())
        h.update(b"\1")
        h.update(key.encode())
    return h.hexdigest()[:16]
