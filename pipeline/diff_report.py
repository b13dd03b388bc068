"""DIFF/report.html: what the new model changed, on one self-contained page.

Top to bottom: headline (share of pixels changed, images changed by more than 1/5/20 %),
a per-class table (pixels gained and lost, IoU of old vs new), the old -> new change matrix
(row-normalised), and the most changed images as image | old | new | changed pixels. Only
the shown images' rows are read (gallery.read_mask_rows for the new side,
diff.read_old_masks for the old), plus their photos.
"""

from __future__ import annotations

import io
from html import escape

import numpy as np
from PIL import Image

from segflow.models.labels import LabelSet
from segflow.pipeline.previous import read_old_masks
from segflow.pipeline.evaluation.gallery import Panel, image_panel, overlay, read_mask_rows, read_rgb, thumb_size
from segflow.pipeline.html_page import legend, page, pct, strip, swatch
from segflow.pipeline.storage import commit_file

REPORT_HTML = "report.html"
CHANGED_RGB = (255, 0, 160)  # magenta: on no label set's palette here, and it reads on grey


def write_diff_report(diff: str, summary: dict, output: str, against: str | None = None,
                      storage_options: dict | None = None, shown: int = 8, thumb_width: int = 320) -> str:
    """Render `summary` (diff.diff_outputs's) to DIFF/report.html with the `shown` most changed images; -> its URL."""
    options = storage_options or {}
    labels = LabelSet.from_dict(summary["label_set"])
    images = [r for r in summary["most_changed"] if r["changed_fraction"] > 0][:shown]
    uris = {r["uri"] for r in images}
    new = {u: r["mask"] for u, r in read_mask_rows(output, uris, options).items()}
    old = read_old_masks(output, uris, against, options)
    rows = [(r, change_panels(r["uri"], old.get(r["uri"]), new.get(r["uri"]), labels, options, thumb_width)) for r in images]
    html = render_diff_report(summary, labels, rows, title=summary.get("new", ""))
    url = f"{diff.rstrip('/')}/{REPORT_HTML}"
    commit_file(url, html.encode("utf-8"), storage_options=options)
    return url


def change_panels(uri: str, old_png: bytes | None, new_png: bytes | None, labels: LabelSet, options: dict,
                  thumb_width: int) -> list[Panel]:
    """image | old | new | changed: masks over the photo; changed pixels magenta over the greyed photo."""
    palette = np.array(labels.palette, dtype=np.float32)
    photo, why = read_rgb(uri, options)
    small = None
    if photo is not None:
        small = np.asarray(Image.fromarray(photo).resize(thumb_size(photo.shape[1::-1], thumb_width), Image.BILINEAR))
    old = _decode(old_png)
    new = _decode(new_png)
    panels = [image_panel("image", small, why),
              image_panel("old", overlay(small, old, palette, thumb_width), "no old mask"),
              image_panel("new", overlay(small, new, palette, thumb_width), "no new mask")]
    if old is None or new is None or old.shape != new.shape:
        panels.append(Panel("changed", note="old and new masks differ in size" if old is not None and new is not None else "nothing to compare"))
    else:
        panels.append(image_panel("changed pixels", highlight(small, old != new, thumb_width), None))
    return panels


def highlight(photo: np.ndarray | None, changed: np.ndarray, width: int) -> np.ndarray:
    """(h, w, 3) thumbnail and (H, W) bool -> the photo in faded grey with changed pixels in magenta."""
    size = (photo.shape[1], photo.shape[0]) if photo is not None else thumb_size(changed.shape[::-1], width)
    # Any changed source pixel under a thumbnail pixel marks it: a max filter, not nearest sampling,
    # so one-pixel-wide changes stay visible.
    small = np.asarray(Image.fromarray(changed.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
    grey = photo.mean(axis=-1, keepdims=True) if photo is not None else np.full((size[1], size[0], 1), 128.0)
    base = np.repeat(grey * 0.45 + 140, 3, axis=-1)
    out = np.where(small[..., None], np.array(CHANGED_RGB, np.float32), base)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def render_diff_report(summary: dict, labels: LabelSet, rows: list[tuple[dict, list[Panel]]], *, title: str = "") -> str:
    """The page as a string; pure, so it can be tested without storage."""
    over = summary["images_changed_over"]
    counts = [f"{summary['images_compared']} images compared", f"old: {escape(summary['old'])}"]
    for key, what in (("images_size_changed", "changed size (not compared)"), ("images_without_old", "without an old version"),
                      ("images_only_old", "only in the old output")):
        if summary.get(key):
            counts.append(f"{summary[key]} {what}")
    cards = [("pixels changed", pct(summary["changed_fraction"], 2) + " %", "of all compared pixels (summed, not averaged)")]
    cards += [(f"images > {float(t) * 100:g} %", str(n), "changed pixels") for t, n in over.items()]
    body = [f"<header><h1>segflow diff</h1><p class=sub>{escape(title)}</p><p class=counts>{' · '.join(counts)}</p></header>",
            "<section class=cards>" + "".join(
                f"<div class='card{' main' if i == 0 else ''}'><div class=k>{escape(k)}</div><div class=v>{v}</div>"
                f"<div class=what>{escape(w)}</div></div>" for i, (k, v, w) in enumerate(cards)) + "</section>",
            _class_table(summary, labels), _matrix(summary, labels), _gallery(rows, labels)]
    return page("diff", title, body)


def _class_table(summary: dict, labels: LabelSet) -> str:
    p = summary["per_class"]
    total = summary["pixels"] or 1
    rows = []
    for c, name in enumerate(summary["classes"]):
        iou = p["iou"][c]
        rows.append(f"<tr><td>{swatch(labels, c)}</td><th>{escape(name)}</th>"
                    f"<td class=num>{p['old_pixels'][c] / total * 100:.2f}</td><td class=num>{p['new_pixels'][c] / total * 100:.2f}</td>"
                    f"<td class=num>{p['gained'][c]:,}</td><td class=num>{p['lost'][c]:,}</td><td class=num>{pct(iou)}</td></tr>")
    return ("<section><h2>Per class</h2><p class=what>Share of pixels in the old and new masks (%), pixels gained and lost, "
            "and the IoU of the class's old and new masks (100 = unchanged; — = in neither).</p>"
            "<table id=per-class class=classes><thead><tr><th></th><th>class</th><th>old %</th><th>new %</th><th>gained</th>"
            f"<th>lost</th><th>IoU old/new</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _matrix(summary: dict, labels: LabelSet) -> str:
    m = summary["change"]
    names = summary["classes"]
    head = "".join(f"<th class=col title='{escape(n)}'>{swatch(labels, j)}<span>{escape(n[:6])}</span></th>" for j, n in enumerate(names))
    rows = []
    for i, name in enumerate(names):
        total = sum(m[i])
        cells = []
        for j in range(len(names)):
            if not total:
                cells.append("<td class=none></td>")
                continue
            share = m[i][j] / total
            ink = "#fff" if share > 0.55 else "#1f2328"
            cells.append(f"<td class='{'diag' if i == j else ''}' style='background:rgba(31,94,168,{share:.3f});color:{ink}' "
                         f"title='{escape(name)} → {escape(names[j])}: {m[i][j]} px'>{share * 100:.0f}</td>")
        rows.append(f"<tr><th class=row>{swatch(labels, i)}{escape(name)}</th>{''.join(cells)}</tr>")
    return ("<section><h2>Old → new</h2><p class=what>Rows are the old masks' classes, columns the new ones; each row is "
            "normalised to 100 %. The diagonal is what stayed.</p><table id=change class=heat>"
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _gallery(rows: list[tuple[dict, list[Panel]]], labels: LabelSet) -> str:
    if not rows:
        return "<section class=gallery><h2>Most changed images</h2><p class=what>No image changed.</p></section>"
    items = "".join(
        f"<div class=item><div class=caption><b title='{escape(r['uri'])}'>{escape(r['uri'].rsplit('/', 1)[-1])}</b> "
        f"{pct(r['changed_fraction'], 2)} % of pixels changed</div>{strip(panels)}</div>" for r, panels in rows)
    return f"<section class=gallery><h2>Most changed images</h2>{legend(labels)}{items}</section>"


def _decode(png: bytes | None) -> np.ndarray | None:
    if png is None:
        return None
    return np.asarray(Image.open(io.BytesIO(png)))
