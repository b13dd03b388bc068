"""Deterministic shards: the unit of scheduling, retry and commit.

The work list is sorted by URI and cut into runs of at most `shard_size`, ramped at both
ends: 4, 8, 16, 32, 64, ..., 64, 32, 16, 8, 4 for the default 64. A shard commits only when all
its images are done, so small first shards put results on disk seconds after the model
starts, and small last shards let every worker finish at about the same time instead
of one working through a full shard alone. In between, shards are full size and
per-shard costs stay amortised. With `shard_size` <= 4 the cut is plain runs of it.

A short list is cut finer: no shard holds more than 1/MIN_SHARDS of it. At 200 images
the default cut was 4 8 16 32 64 16 32 16 8 4, and the 64 queued behind another shard
on one actor kept it working ~15 % of the job alone while the other was done
(`bench/run.py --images 200`: 0.76 of the ideal images/s). Each actor holds up to two
shards, so what balances is the size of the largest shard against the whole list; a
simulation of that dispatch (2 and 4 actors, 40 to 5,000 images) finishes within
4 % of the ideal with the cap at 1/12 where the plain cut lost up to 14 % (2 actors)
and 34 % (4 actors). Lists of more than 12 x `shard_size` images are cut as before.

A shard's id is a hash of the job fingerprint and its members' (uri, key) pairs, so the
same work under the same model and CRF always gives the same ids and file names, and a
rerun overwrites instead of duplicating. `plan_resumable` cuts the whole manifest, not
just the work, and keeps each shard of that cut whose images are all still to do: a
resumed run (same INPUT, same fingerprint) therefore gets exactly the shards, and ids,
that the killed run had not committed, ramp included, since a shard commits all or
nothing. Only work that shares a shard of the full cut with done images (new or changed
images in an incremental run) is cut afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

RAMP_START = 4  # images in the first and the last shard, when shard_size is larger
MIN_SHARDS = 12  # a short list is cut into about this many shards at least (module docstring)


@dataclass(frozen=True)
class Shard:
    """One unit of work: parallel lists of image URIs, content keys and (for evaluate) label URIs."""

    shard_id: str
    uris: tuple[str, ...]
    keys: tuple[str, ...]
    label_uris: tuple[str | None, ...]
    label_keys: tuple[str | None, ...] = ()  # evaluate: each label's content key (metrics rows carry it); not in the id

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
    label_keys = work.column("label_key").to_pylist() if "label_key" in work.column_names else [None] * len(uris)
    shards, start = [], 0
    for size in shard_sizes(len(uris), shard_size):
        members = slice(start, start + size)
        start += size
        shards.append(
            Shard(
                shard_id=shard_id(job_fingerprint, uris[members], keys[members]),
                uris=tuple(uris[members]),
                keys=tuple(keys[members]),
                label_uris=tuple(labels[members]),
                label_keys=tuple(label_keys[members]),
            )
        )
    return shards


def plan_resumable(manifest: pa.Table, work: pa.Table, shard_size: int, job_fingerprint: str) -> list[Shard]:
    """Shards for `work` (a subset of the sorted `manifest`) that a resumed run cuts the same way.

    The manifest's own cut, less every shard with a done image; then the rest of the
    work, cut afresh. When everything is work, that is simply the work's cut.
    """
    if len(work) == len(manifest) or len(work) == 0:
        return plan_shards(work, shard_size, job_fingerprint)
    todo = set(work.column("uri").to_pylist())
    kept = [s for s in plan_shards(manifest, shard_size, job_fingerprint) if all(u in todo for u in s.uris)]
    covered = {u for s in kept for u in s.uris}
    rest = work.filter(pa.array([u not in covered for u in work.column("uri").to_pylist()], pa.bool_()))
    return kept + plan_shards(rest, shard_size, job_fingerprint)


def shard_sizes(count: int, shard_size: int) -> list[int]:
    """How many images each shard of a `count`-image work list holds, in order.

    Sizes double from RAMP_START up to `shard_size`, taken alternately from the front and
    the back of the list, so both ends ramp: for 1,000 images and 64, 4 8 16 32 64 ... 64 32 16 8 4;
    no shard is larger than 1/MIN_SHARDS of the list (for 200 images: 4 8 16 16 16 ... 16 16 8 4).
    """
    shard_size = min(shard_size, max(RAMP_START, count // MIN_SHARDS))
    if shard_size <= RAMP_START:
        return [shard_size] * (count // shard_size) + ([count % shard_size] if count % shard_size else [])
    front, back, size, left = [], [], RAMP_START, count
    while left:
        for end in (front, back):
            take = min(size, left)
            if take:
                end.append(take)
                left -= take
        size = min(2 * size, shard_size)
    return front + back[::-1]


def shard_id(job_fingerprint: str, uris: list[str], keys: list[str]) -> str:
    """A 16-hex-digit id that depends only on the fingerprint and the members."""
    h = hashlib.sha256(job_fingerprint.encode())
    for uri, key in zip(uris, keys):
        h.update(b"\0")
        h.update(uri.encode())
        h.update(b"\1")
        h.update(key.encode())
    return h.hexdigest()[:16]
