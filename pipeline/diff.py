"""What a new model changed, without ground truth: `segflow diff OUTPUT DIFF [--against OTHER]`.

Two versions of each image's mask are compared pixel by pixel:

- old: the previous version from OUTPUT/history/masks/ (rows a reprocess replaced, with
  `superseded_at`; the most recent one per uri), or with `against` the masks of OTHER,
  another output of the same collection (`previous.py` finds them);
- new: OUTPUT's current masks.

Per image the comparison is a change matrix laid out as a confusion matrix: K*K int64
row-major (dense, as metrics stored confusion matrices before `evaluation/sparse.py`), rows =
old class, columns = new class, so the diagonal holds unchanged pixels. Only workers hold
these rows; the driver gets each shard's sum. Collection numbers (changed fraction, per-class pixels
gained and lost, per-class IoU of old vs new) come from the summed matrix, never from a
mean of per-image scores, as evaluation does.

Memory stays flat: the unit of work is one masks file of OUTPUT (a shard); a worker reads
it, the old rows of the same uris, compares, writes DIFF/images/<same file name> and hands
back only its summed matrix, its counts and its most-changed images. The driver holds an
index of one (uri -> old file) entry per image, like planning does. Shards run in a process
pool when there are enough of them to pay for starting it.

Outputs:

    DIFF/images/shard-<id>.parquet   one row per compared image (columns in `IMAGE_SCHEMA`)
    DIFF/summary.json                collection numbers, the summed matrix, the most changed images
    DIFF/summary.parquet             one row per class (columns in `class_table`)
    DIFF/report.html                 written by `diff_report.write_diff_report`
"""

from __future__ import annotations

import heapq
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segflow.errors import InputError
from segflow.models.labels import LabelSet
from segflow.pipeline.commit import MASKS, table_bytes
from segflow.pipeline.masks import decode_mask
from segflow.pipeline.reader import output_metadata
from segflow.pipeline.state import committed_files
from segflow.pipeline.previous import Replacement, has_history, index_previous, is_local, old_rows, read_rows
from segflow.pipeline.storage import commit_file, filesystem_for, redact, with_retries

IMAGES = "images"
SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
THRESHOLDS = (0.01, 0.05, 0.20)  # "images changed by more than 1 %, 5 %, 20 % of their pixels"
MOST_CHANGED = 24  # images kept for the report (and summary.json), most changed first

IMAGE_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("status", pa.string()),  # compared | size_changed (old and new masks differ in size: not compared)
    pa.field("same_content", pa.bool_()),  # the content key is the same: the model changed, not the image
    pa.field("pixels", pa.int64()),
    pa.field("changed_pixels", pa.int64()),
    pa.field("changed_fraction", pa.float64()),
    pa.field("change", pa.list_(pa.int64())),  # K*K row-major, rows = old class, columns = new class
    pa.field("old_job_fingerprint", pa.string()),
    pa.field("new_job_fingerprint", pa.string()),
    pa.field("old_superseded_at", pa.timestamp("us", tz="UTC")),  # history only
])
_NEW_COLUMNS = ["uri", "key", "height", "width", "mask", "job_fingerprint"]


@dataclass(frozen=True)
class ShardWork:
    """One worker's job: a masks file of OUTPUT and where the old rows of its uris are."""

    new_url: str
    old_urls: dict[str, list[str]]  # old file URL -> uris to take from it
    num_classes: int
    history: bool
    diff_url: str
    storage_options: dict = field(default_factory=dict)


@dataclass
class ShardChange:
    """What a worker hands back: sums and the few most changed images, never pixels."""

    change: np.ndarray  # (K, K) int64 summed over the shard's compared images
    compared: int = 0
    size_changed: int = 0
    only_new: int = 0  # new rows without an old version
    over: dict = field(default_factory=dict)  # threshold -> images changed by more than it
    most_changed: list = field(default_factory=list)  # [(changed_fraction, uri)]

    def merge(self, other: "ShardChange") -> None:
        """Add another shard's sums to these (the most changed images stay the overall top)."""
        self.change += other.change
        self.compared += other.compared
        self.size_changed += other.size_changed
        self.only_new += other.only_new
        for t in THRESHOLDS:
            self.over[t] = self.over.get(t, 0) + other.over.get(t, 0)
        self.most_changed = heapq.nlargest(MOST_CHANGED, self.most_changed + other.most_changed)


def diff_outputs(output: str, diff: str, against: str | None = None, storage_options: dict | None = None,
                 workers: int | None = None, replaced_by: Replacement | None = None) -> dict:
    """Compare OUTPUT's masks with their previous versions (history) or with OTHER's; write DIFF.

    -> the summary dict written to DIFF/summary.json. Raises InputError when OUTPUT has no
    masks, when there is no history (and no `against`), or when the two sides' label sets
    differ (class ids would not mean the same thing). `replaced_by` limits a history diff to the
    images one run replaced (what the nightly flow reports).
    """
    options = storage_options or {}
    labels, work, index = plan_comparison(output, against, options, diff, replaced_by=replaced_by)
    total = ShardChange(np.zeros((labels.num_classes,) * 2, np.int64), over={t: 0 for t in THRESHOLDS})
    for part in map_shards(compare_shard, work, workers):
        total.merge(part)
    # every image with an old version was compared or found resized, once: the rest of the index is only in OTHER
    only_old = len(index) - total.compared - total.size_changed if against is not None else 0
    summary = summarise_change(total, labels, only_old=only_old, old=redact(against) if against else "history",
                               new=redact(output))
    _remove_stale_parts(diff, {w.new_url.rsplit("/", 1)[-1] for w in work}, options)
    base = diff.rstrip("/")
    commit_file(f"{base}/{SUMMARY_JSON}", json.dumps(summary, indent=1, allow_nan=False).encode(), storage_options=options)
    commit_file(f"{base}/{SUMMARY_PARQUET}", table_bytes(class_table(summary)), storage_options=options)
    return summary


def plan_comparison(output: str, against: str | None, options: dict, diff: str = "", old_required: bool = True,
                    replaced_by: Replacement | None = None) -> tuple[LabelSet, list[ShardWork], dict[str, str]]:
    """-> (OUTPUT's label set, one ShardWork per committed masks file of OUTPUT, the uri -> old file index).

    Without `against`, the old side is OUTPUT's history; when it has none, that is an
    InputError if `old_required`, else every ShardWork simply has no old rows.
    """
    labels = _label_set(output, options)
    if labels is None:
        raise InputError(f"{redact(output)}: no masks of committed shards here; run `segflow segment` first")
    if against is not None:
        other = _label_set(against, options)
        if other is not None and other.classes != labels.classes:
            raise InputError(f"{redact(against)} and {redact(output)} use different classes ({len(other.classes)} vs "
                             f"{len(labels.classes)}); a pixel diff needs one label set: compare outputs of the same model family")
        index = index_previous(output, against, options)
    elif old_required or has_history(output, options):
        index = index_previous(output, None, options, replaced_by)
    else:
        index = {}
    new_files = committed_files(output, MASKS, options)
    return labels, _plan(output, new_files, index, labels.num_classes, against is None, diff, options), index


def compare_shard(work: ShardWork) -> ShardChange:
    """Compare one masks file with the old rows of its uris; write its DIFF/images file.

    Runs in a worker process: everything it needs is in `work`, and it returns only sums.
    """
    rows, result = shard_rows(work)
    url = f"{work.diff_url.rstrip('/')}/{IMAGES}/{work.new_url.rsplit('/', 1)[-1]}"
    table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
    commit_file(url, table_bytes(table, {b"segflow_diff": json.dumps({"num_classes": work.num_classes}).encode()}),
                storage_options=work.storage_options)
    return result


def shard_rows(work: ShardWork, new: pa.Table | None = None) -> tuple[list[dict], ShardChange]:
    """-> (one IMAGE_SCHEMA row per image of the shard that has an old version, the shard's sums).

    `new`: the shard's rows with at least `uri, key, height, width, mask, job_fingerprint`,
    when the caller has read them already (review does); else they are read from `work.new_url`.
    """
    k = work.num_classes
    new = new if new is not None else read_rows(work.new_url, _NEW_COLUMNS, None, work.storage_options)
    old = old_rows(work.old_urls, work.history, work.storage_options)
    result = ShardChange(np.zeros((k, k), np.int64), over={t: 0 for t in THRESHOLDS})
    rows = []
    for row in new.select(_NEW_COLUMNS).to_pylist():
        before = old.get(row["uri"])
        if before is None:
            result.only_new += 1
            continue
        old_mask, new_mask = decode_mask(before["mask"]), decode_mask(row["mask"])
        image = {
            "uri": row["uri"], "height": row["height"], "width": row["width"],
            "same_content": before.get("key") == row["key"],
            "old_job_fingerprint": before.get("job_fingerprint"), "new_job_fingerprint": row["job_fingerprint"],
            "old_superseded_at": before.get("superseded_at"),
        }
        if old_mask.shape != new_mask.shape:
            result.size_changed += 1
            rows.append({**image, "status": "size_changed"})
            continue
        change = change_matrix(old_mask, new_mask, k, row["uri"])
        pixels = int(change.sum())
        changed = pixels - int(np.trace(change))
        fraction = changed / pixels if pixels else 0.0
        result.change += change
        result.compared += 1
        for t in THRESHOLDS:
            result.over[t] += fraction > t
        result.most_changed = heapq.nlargest(MOST_CHANGED, result.most_changed + [(fraction, row["uri"])])
        rows.append({**image, "status": "compared", "pixels": pixels, "changed_pixels": changed,
                     "changed_fraction": fraction, "change": change.ravel().tolist()})
    return rows, result


def change_matrix(old: np.ndarray, new: np.ndarray, num_classes: int, uri: str = "") -> np.ndarray:
    """(H, W) old and new class maps -> (K, K) int64 counts, rows = old class, columns = new class."""
    k = num_classes
    top = max(int(old.max(initial=0)), int(new.max(initial=0)))
    if top >= k:
        raise InputError(f"{uri}: mask holds class {top}, outside the label set's {k} classes; were both sides made with one label set?")
    return np.bincount(old.astype(np.int64).ravel() * k + new.ravel(), minlength=k * k).reshape(k, k)


def summarise_change(total: ShardChange, labels: LabelSet, *, only_old: int = 0, old: str = "", new: str = "") -> dict:
    """The collection's numbers, all derived from the summed change matrix (see the module docstring)."""
    m = total.change
    pixels = int(m.sum())
    unchanged = np.diag(m)
    old_px, new_px = m.sum(axis=1), m.sum(axis=0)
    union = old_px + new_px - unchanged
    iou = [float(unchanged[c] / union[c]) if union[c] else None for c in range(len(m))]
    return {
        "old": old, "new": new,
        "num_classes": len(m), "classes": list(labels.classes), "label_set": labels.to_dict(),
        "images_compared": total.compared, "images_size_changed": total.size_changed,
        "images_without_old": total.only_new, "images_only_old": only_old,
        "pixels": pixels, "changed_pixels": pixels - int(unchanged.sum()),
        "changed_fraction": (pixels - int(unchanged.sum())) / pixels if pixels else 0.0,
        "images_changed_over": {f"{t:g}": int(total.over[t]) for t in THRESHOLDS},
        "change": m.tolist(),
        "per_class": {
            "old_pixels": old_px.tolist(), "new_pixels": new_px.tolist(),
            "gained": (new_px - unchanged).tolist(), "lost": (old_px - unchanged).tolist(), "iou": iou,
        },
        "most_changed": [{"uri": uri, "changed_fraction": f} for f, uri in total.most_changed],
    }


def most_changed_classes(summary: dict, n: int = 3) -> list[tuple[str, int]]:
    """The `n` classes with the most pixels gained + lost, with that count; none that did not change."""
    pc_ = summary["per_class"]
    moved = [(pc_["gained"][c] + pc_["lost"][c], summary["classes"][c]) for c in range(summary["num_classes"])]
    return [(name, count) for count, name in sorted(moved, reverse=True)[:n] if count > 0]


def class_table(summary: dict) -> pa.Table:
    """One row per class: class_id, class, old_pixels, new_pixels, gained, lost (int64), iou (float64, null
    when the class is in neither the old nor the new masks): from the summed change matrix."""
    p = summary["per_class"]
    k = summary["num_classes"]
    return pa.table({
        "class_id": pa.array(range(k), pa.int32()),
        "class": pa.array(summary["classes"][:k], pa.string()),
        **{name: pa.array(p[name], pa.int64()) for name in ("old_pixels", "new_pixels", "gained", "lost")},
        "iou": pa.array(p["iou"], pa.float64()),
    })


def map_shards(fn, work: list, workers: int | None = None):
    """fn over `work`, in order: in this process, or in a process pool when it pays.

    Starting a pool costs each worker an interpreter and numpy/pyarrow imports (~1 s), so
    it is used only with at least two shards per worker; `workers` caps it (default: the
    CPU count). Processes are spawned, not forked: a driver holding Ray's threads must not fork.
    """
    limit = workers if workers is not None else (os.cpu_count() or 1)
    n = min(limit, len(work) // 2)
    if n <= 1:
        yield from map(fn, work)
        return
    with ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, work)


def _plan(output, new_files, index, k, history, diff, options) -> list[ShardWork]:
    fs, _ = filesystem_for(output, options)
    work = []
    for path in new_files:
        uris = with_retries(pq.read_table, path, filesystem=fs, columns=["uri"], what=path).column("uri").to_pylist()
        by_file: dict[str, list[str]] = {}
        for uri in uris:
            if uri in index:
                by_file.setdefault(index[uri], []).append(uri)
        url = fs.unstrip_protocol(path) if not is_local(fs) else path
        work.append(ShardWork(url, by_file, k, history, diff, options))
    return work


def _remove_stale_parts(diff: str, keep: set[str], options: dict) -> None:
    """Delete DIFF/images files a previous diff into the same DIFF wrote for shards that no longer exist."""
    url = f"{diff.rstrip('/')}/{IMAGES}"
    fs, directory = filesystem_for(url, options)
    if not fs.isdir(directory):
        return
    for path in fs.ls(directory, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and name not in keep:
            fs.rm(path)


def _label_set(output: str, options: dict) -> LabelSet | None:
    labels = output_metadata(output, options).get("labels")
    return LabelSet.from_dict(labels) if labels else None
