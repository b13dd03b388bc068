"""REVIEW/report.html: the review queue as a page a person works down, one image per row.

Each row: rank, score and the reasons in words, then image | mask | the other mask | the
pixels where they differ. The other mask is the previous version (history or --against)
when the score used it, else the model's own mask before the CRF, so the highlighted pixels
are the ones a reviewer should check first. Only the queued images' rows are read.
"""

from __future__ import annotations

from html import escape

import pyarrow as pa

from segflow.models.labels import LabelSet
from segflow.pipeline.previous import read_old_masks
from segflow.pipeline.diff_report import change_panels
from segflow.pipeline.evaluation.gallery import read_mask_rows
from segflow.pipeline.html_page import legend, page, pct, strip
from segflow.pipeline.review import QUEUE_PARQUET
from segflow.pipeline.storage import commit_file

REPORT_HTML = "report.html"


def write_review_report(review: str, queue: pa.Table, labels: LabelSet, output: str, against: str | None = None,
                        storage_options: dict | None = None, shown: int = 50, thumb_width: int = 320) -> str:
    """Render the first `shown` images of `queue` (review.build_queue's) to REVIEW/report.html; -> its URL."""
    options = storage_options or {}
    rows = queue.slice(0, shown).to_pylist()
    uris = {r["uri"] for r in rows}
    current = read_mask_rows(output, uris, options)
    with_previous = {r["uri"] for r in rows if r["previous_changed_fraction"] is not None}
    previous = read_old_masks(output, with_previous, against, options) if with_previous else {}
    items = []
    for r in rows:
        stored = current.get(r["uri"], {})
        if r["uri"] in previous:
            other, other_title = previous[r["uri"]], "previous"
        else:
            other, other_title = stored.get("raw_mask"), "before CRF"
        panels = change_panels(r["uri"], other, stored.get("mask"), labels, options, thumb_width)
        panels[1].title, panels[2].title = other_title, "mask"
        panels = [panels[0], panels[2], panels[1], panels[3]]  # image | mask | other | changed
        items.append((r, panels))
    html = render_review_report(items, labels, title=output, total=len(queue))
    url = f"{review.rstrip('/')}/{REPORT_HTML}"
    commit_file(url, html.encode("utf-8"), storage_options=options)
    return url


def render_review_report(items: list[tuple[dict, list]], labels: LabelSet, *, title: str = "", total: int = 0) -> str:
    """The page as a string; pure."""
    head = (f"<header><h1>segflow review queue</h1><p class=sub>{escape(title)}</p><p class=counts>{total} images queued"
            f"{f', the first {len(items)} shown' if len(items) < total else ''} · full list: {QUEUE_PARQUET}</p>"
            "<p class=what>Score: the estimated share of wrong pixels, the largest of 1 − mean confidence, half the "
            "share the CRF relabelled, and half the share that differs from the previous mask. Magenta: pixels where "
            "the two masks shown differ.</p></header>")
    if not items:
        return page("review queue", title, [head, "<p class=empty>No image passed the filters.</p>"])
    rows = []
    for r, panels in items:
        name = r["uri"].rsplit("/", 1)[-1]
        classes = ", ".join(r["classes"][:6])
        rows.append(f"<div class=item><div class=caption><span class=rank>#{r['rank']}</span> <b title='{escape(r['uri'])}'>"
                    f"{escape(name)}</b> score {pct(r['score'])} % <span class=what>(from {escape(r['score_from'] or '—')})</span></div>"
                    f"<p class=why>{escape(r['why'])}<br>classes: {escape(classes)}</p>{strip(panels)}</div>")
    return page("review queue", title, [head, f"<section class=gallery>{legend(labels)}{''.join(rows)}</section>"])
