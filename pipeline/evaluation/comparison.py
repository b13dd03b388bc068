"""Several refiners scored in one evaluation: each against the same raw masks, side by side.

`segflow evaluate --crf dense,meanfield` evaluates each refinement kind into OUTPUT/<kind>/
(a complete evaluation each: masks, metrics, summary, report, and incremental like any
other), then this module writes OUTPUT/comparison.json and OUTPUT/comparison.html: the raw
network's scores once, and for every kind its scores and its gain over raw, overall and per
class. The raw scores must agree between the kinds' evaluations (same model, same images,
same labels); when they do not, something other than the refiner differs, and the comparison
refuses rather than compare unlike things.
"""

from __future__ import annotations

import json
from html import escape

from segflow.errors import InputError
from segflow.pipeline.evaluation.metrics import SCALARS, minus
from segflow.pipeline.evaluation.summary import commit_bytes
from segflow.pipeline.html_page import page, pct

COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "comparison.html"


def compare_refiners(output_url: str, evaluations: dict[str, dict], storage_options: dict | None = None) -> dict:
    """evaluations: refinement kind -> its evaluation summary (summary.json's content, with "report").

    -> {"classes", "raw": scores, "refiners": {kind: {"scores", "gain", "per_class_iou", "report"}}},
    also written to OUTPUT/comparison.json and OUTPUT/comparison.html.
    """
    if not evaluations:
        raise ValueError("no evaluations to compare")
    raws = {kind: summary.get("raw") for kind, summary in evaluations.items()}
    first_kind, raw = next(iter(raws.items()))
    if raw is None:
        raise InputError(f"{output_url}: the {first_kind} evaluation scored no image; nothing to compare")
    for kind, other in raws.items():
        if other is None or other.get("confusion") != raw.get("confusion"):
            raise InputError(f"{output_url}: the raw masks of the {kind} and {first_kind} evaluations differ; "
                             "compare refiners on one model, images and labels (rerun with --force)")
    classes = next(iter(evaluations.values()))["classes"]
    comparison = {"classes": classes, "raw": _scores(raw), "raw_per_class_iou": raw["per_class"]["iou"], "refiners": {}}
    for kind, summary in evaluations.items():
        refined = summary.get("crf") or raw  # kind "none": the masks are the raw ones
        scores = _scores(refined)
        comparison["refiners"][kind] = {
            "scores": scores,
            "gain": {name: minus(scores.get(name), comparison["raw"].get(name)) for name in scores},
            "per_class_iou": refined["per_class"]["iou"],
            "report": summary.get("report"),
        }
    base = output_url.rstrip("/")
    options = storage_options or {}
    commit_bytes(f"{base}/{COMPARISON_JSON}", json.dumps(comparison, indent=1, allow_nan=False).encode(), options)
    commit_bytes(f"{base}/{COMPARISON_HTML}", comparison_page(base, comparison).encode(), options)
    return comparison


def comparison_page(title: str, comparison: dict) -> str:
    """One self-contained page: a row per mask (raw, then each refiner), a column per score and per class."""
    kinds = comparison["refiners"]
    head = "".join(f"<th>{escape(n)}</th>" for n in ("masks", *SCALARS, *comparison["classes"]))
    rows = [_row("raw (network)", comparison["raw"], comparison["raw_per_class_iou"], None)]
    for kind, part in kinds.items():
        link = f" <a href='{escape(part['report'] or '')}'>report</a>" if part.get("report") else ""
        rows.append(_row(f"{kind}{link}", part["scores"], part["per_class_iou"], comparison["raw_per_class_iou"], part["gain"]))
    body = [f"<h1>segflow: refiners compared</h1><p>{escape(title)}: every refiner scored against the same raw masks; "
            "scores in %, gains over raw in brackets.</p>",
            f"<table><tr>{head}</tr>{''.join(rows)}</table>"]
    return page("refiner comparison", title, body)


def _row(name: str, scores: dict, per_class: list, raw_per_class: list | None, gain: dict | None = None) -> str:
    cells = [f"<td>{name}</td>"]
    for key in SCALARS:
        cells.append(f"<td>{pct(scores.get(key), 2)}{_gain((gain or {}).get(key))}</td>")
    for i, value in enumerate(per_class):
        cells.append(f"<td>{pct(value, 2)}{_gain(minus(value, raw_per_class[i]) if raw_per_class else None)}</td>")
    return f"<tr>{''.join(cells)}</tr>"


def _scores(part: dict) -> dict:
    return {name: part.get(name) for name in SCALARS}


def _gain(value) -> str:
    return "" if value is None else f" ({100 * value:+.2f})"
