"""The pieces the diff and review pages share with the evaluation report: page shell, swatches, picture strips.

The look (CSS, overlay colours, thumbnails) is evaluation/report.py's and gallery.py's, so
every segflow page reads the same; pages stay self-contained (inline CSS, JPEG data URIs).
"""

from __future__ import annotations

from html import escape

from segflow.models.labels import LabelSet
from segflow.pipeline.evaluation.gallery import Panel
from segflow.pipeline.evaluation.report import CSS

EXTRA_CSS = """
.why{font-size:12px;color:var(--mute);margin:2px 0 6px}
.why b{color:var(--ink)}
.rank{display:inline-block;min-width:28px;font-weight:700;color:var(--mute)}
"""


def page(kind: str, title: str, body: list[str]) -> str:
    """A whole HTML document: `kind` names the page ("diff", "review queue"), `title` the location."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>segflow {escape(kind)} {escape(title)}</title>"
            f"<style>{CSS}{EXTRA_CSS}</style></head><body>{''.join(body)}</body></html>")


def swatch(label_set: LabelSet, c: int) -> str:
    if c >= len(label_set.palette):
        return "<span class=swatch></span>"
    r, g, b = label_set.palette[c]
    return f"<span class=swatch style='background:rgb({r},{g},{b})'></span>"


def legend(label_set: LabelSet) -> str:
    return "<div class=legends>" + "".join(
        f"<span class=legend>{swatch(label_set, c)}{escape(n)}</span>" for c, n in enumerate(label_set.classes)) + "</div>"


def strip(panels: list[Panel]) -> str:
    """Up to four pictures side by side, each with its caption (or the reason it is missing)."""
    figures = []
    for p in panels:
        picture = (f"<img src='{p.data_uri}' alt='{escape(p.title)}'>" if p.data_uri
                   else f"<div class=missing>{escape(p.note or 'not available')}</div>")
        figures.append(f"<figure>{picture}<figcaption>{escape(p.title)}</figcaption></figure>")
    return f"<div class=strip>{''.join(figures)}</div>"


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}"
