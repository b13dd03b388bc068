"""The review queue: the images most worth a person's time, from what the masks rows already hold.

The score estimates the share of an image's pixels that are wrong, as the largest of three
estimates (`review_score`):

    confidence      1 - mean_confidence       the expected share of wrong pixels if the
                                              model's softmax is calibrated
    CRF             crf_changed_fraction / 2  the CRF and the model disagree on these pixels;
                                              not knowing which is right, half of them
    previous model  changed_fraction / 2      the same for the previous model's mask
                                              (OUTPUT/history, or --against OTHER), when there is one

The largest, not a sum: one strong signal is enough to send an image to a person, and the
score stays a share of pixels, so `--min-score 0.1` reads "an estimated 10 % or more of the
pixels are wrong". `min_confidence` is shown in each image's reasons but is not in the score:
it is one pixel's value, and on CamVid val its rank correlation with per-image error was
-0.19 (the measurement: bench/review_quality.py). The same script measures the score itself.

Memory stays flat: shards are scored one by one (in a process pool when there are many,
`diff.map_shards`) and only the best `top` rows of each are kept.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from segflow.errors import UsageError
from segflow.models.labels import LabelSet
from segflow.pipeline.commit import table_bytes
from segflow.pipeline.diff import ShardWork, map_shards, plan_comparison, shard_rows
from segflow.pipeline.storage import commit_file, filesystem_for, with_retries

QUEUE_PARQUET = "queue.parquet"
TERMS = ("confidence", "CRF", "previous model")
QUEUE_SCHEMA = pa.schema([
    pa.field("rank", pa.int32()),  # 1 = look first
    pa.field("uri", pa.string(), nullable=False),
    pa.field("score", pa.float64()),  # estimated share of wrong pixels (module docstring)
    pa.field("score_from", pa.string()),  # the term that set the score: confidence | CRF | previous model
    pa.field("mean_confidence", pa.float32()),
    pa.field("min_confidence", pa.float32()),
    pa.field("crf_changed_fraction", pa.float32()),  # null without the CRF
    pa.field("previous_changed_fraction", pa.float64()),  # null without a previous version
    pa.field("classes", pa.list_(pa.string())),  # classes present in the mask, most pixels first
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("why", pa.string()),  # the reasons, in words
    pa.field("job_fingerprint", pa.string()),
])
_COLUMNS = ["uri", "key", "height", "width", "job_fingerprint", "mean_confidence", "min_confidence",
            "crf_changed_fraction", "pixel_counts"]


@dataclass(frozen=True)
class ShardReview:
    """One worker's job: a shard to score, the filters, and how many rows to keep."""

    work: ShardWork
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    min_score: float
    top: int | None


def review_score(mean_confidence: float | None, crf_changed_fraction: float | None,
                 previous_changed_fraction: float | None) -> tuple[float, str | None]:
    """-> (estimated share of wrong pixels, the term that set it); see the module docstring. (0.0, None) without any term."""
    terms = {
        "confidence": None if mean_confidence is None else 1.0 - float(mean_confidence),
        "CRF": None if crf_changed_fraction is None else float(crf_changed_fraction) / 2,
        "previous model": None if previous_changed_fraction is None else float(previous_changed_fraction) / 2,
    }
    known = {k: v for k, v in terms.items() if v is not None}
    if not known:
        return 0.0, None
    source = max(known, key=lambda k: (known[k], -TERMS.index(k)))
    return known[source], source


def build_queue(output: str, review: str, *, top: int | None = 100, classes: tuple[str, ...] = (), min_score: float = 0.0,
                against: str | None = None, storage_options: dict | None = None, workers: int | None = None) -> tuple[pa.Table, LabelSet]:
    """Score every image of OUTPUT, keep the `top` best (None: all) that pass the filters; write REVIEW/queue.parquet.

    `classes`: keep images whose mask holds any of these classes (names or ids).
    -> (the queue, ranked, QUEUE_SCHEMA; OUTPUT's label set).
    """
    options = storage_options or {}
    labels, work, _ = plan_comparison(output, against, options, old_required=against is not None)
    wanted = resolve_classes(classes, labels)
    jobs = [ShardReview(w, wanted, tuple(labels.classes), min_score, top) for w in work]
    rows: list[dict] = []
    for shard in map_shards(score_shard, jobs, workers):
        rows = _best(rows + shard, top)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    queue = pa.Table.from_pylist(rows, schema=QUEUE_SCHEMA)
    commit_file(f"{review.rstrip('/')}/{QUEUE_PARQUET}", table_bytes(queue), storage_options=options)
    return queue, labels


def score_shard(job: ShardReview) -> list[dict]:
    """Score one shard's images; -> the best `job.top` rows that pass the filters (a worker's job)."""
    work = job.work
    columns = _COLUMNS + (["mask"] if work.old_urls else [])
    fs, path = filesystem_for(work.new_url, work.storage_options)
    table = with_retries(pq.read_table, path, filesystem=fs, columns=columns, what=work.new_url)
    previous = {}
    if work.old_urls:
        changes, _ = shard_rows(work, table)
        previous = {r["uri"]: r["changed_fraction"] for r in changes if r["status"] == "compared"}
    rows = []
    for row in table.select(_COLUMNS).to_pylist():
        counts = row["pixel_counts"] or []
        if job.classes and not any(c < len(counts) and counts[c] > 0 for c in job.classes):
            continue
        change = previous.get(row["uri"])
        score, source = review_score(row["mean_confidence"], row["crf_changed_fraction"], change)
        if score < job.min_score:
            continue
        present = sorted((c for c in range(len(counts)) if counts[c] > 0), key=lambda c: -counts[c])
        rows.append({
            "uri": row["uri"], "score": score, "score_from": source,
            "mean_confidence": row["mean_confidence"], "min_confidence": row["min_confidence"],
            "crf_changed_fraction": row["crf_changed_fraction"], "previous_changed_fraction": change,
            "classes": [job.class_names[c] if c < len(job.class_names) else f"class {c}" for c in present],
            "height": row["height"], "width": row["width"], "job_fingerprint": row["job_fingerprint"],
            "why": reasons(row["mean_confidence"], row["min_confidence"], row["crf_changed_fraction"], change, source),
        })
    return _best(rows, job.top)


def reasons(mean_confidence, min_confidence, crf_changed_fraction, previous_changed_fraction, source) -> str:
    """Why an image is in the queue, in words; the term that set the score comes first."""
    parts = {}
    if mean_confidence is not None:
        parts["confidence"] = f"mean confidence {mean_confidence * 100:.1f} %, so about {(1 - mean_confidence) * 100:.1f} % of pixels likely wrong"
    if crf_changed_fraction is not None:
        parts["CRF"] = f"the CRF relabelled {crf_changed_fraction * 100:.1f} % of pixels"
    if previous_changed_fraction is not None:
        parts["previous model"] = f"{previous_changed_fraction * 100:.1f} % of pixels differ from the previous mask"
    ordered = [parts[source]] if source in parts else []
    ordered += [v for k, v in parts.items() if k != source]
    if min_confidence is not None:
        ordered.append(f"least confident pixel {min_confidence * 100:.0f} %")
    return "; ".join(ordered)


def resolve_classes(given: tuple[str, ...] | list[str], labels: LabelSet) -> tuple[int, ...]:
    """Class names (any case) or ids -> ids; an unknown one is a UsageError listing the classes."""
    by_name = {n.lower(): i for i, n in enumerate(labels.classes)}
    ids = []
    for item in given:
        text = str(item).strip()
        if text.isdigit() and int(text) < labels.num_classes:
            ids.append(int(text))
        elif text.lower() in by_name:
            ids.append(by_name[text.lower()])
        else:
            raise UsageError(f"--classes: {text!r} is not a class of this output; use a name or id 0..{labels.num_classes - 1}: "
                             + ", ".join(labels.classes))
    return tuple(dict.fromkeys(ids))


def _best(rows: list[dict], top: int | None) -> list[dict]:
    """Highest score first; ties by uri, so the queue is the same on every run."""
    key = lambda r: (-r["score"], r["uri"])  # noqa: E731
    return heapq.nsmallest(top, rows, key=key) if top is not None else sorted(rows, key=key)
