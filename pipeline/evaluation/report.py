"""OUTPUT/report.html: one self-contained page that shows what an evaluate run found.

Everything is inline (CSS, pictures as base64 JPEG data URIs, the heatmap as a coloured HTML
table), so the file can be mailed, attached to a Prefect artifact or opened offline, and it
makes no network request. Top to bottom: headline mIoU raw -> CRF; raw vs CRF for every
dataset score; a per-class table; the row-normalised confusion matrix; a gallery of the worst
and best images by per-image mIoU.
"""

from __future__ import annotations

from html import escape

from segflow.models.labels import LabelSet
from segflow.pipeline.config import LabelPairing
from segflow.pipeline.evaluation.gallery import GalleryRow, build_gallery
from segflow.pipeline.evaluation.summary import commit_bytes

REPORT_HTML = "report.html"

SCORES = (  # (summary key, label, what it measures)
    ("miou", "mean IoU", "mean over classes of intersection / union"),
    ("pixel_accuracy", "pixel accuracy", "correct labelled pixels / labelled pixels"),
    ("mean_class_accuracy", "mean class accuracy", "mean over classes of per-class recall"),
    ("fw_iou", "frequency-weighted IoU", "IoU weighted by each class's share of pixels"),
    ("bf", "boundary F-score", "Csurka et al. 2013, per class, mean over classes"),
    ("trimap_miou", "trimap mIoU", "mean IoU within the band around ground-truth edges"),
    ("trimap_pixel_accuracy", "trimap pixel accuracy", "pixel accuracy within that band"),
)


def write_report(
    output_url: str,
    summary: dict,
    labels: LabelSet,
    *,
    pairing: LabelPairing | None = None,
    storage_options: dict | None = None,
    gallery_size: int = 4,
    thumb_width: int = 400,
) -> str:
    """Render `summary` (from `summary.summarise_metrics`) to OUTPUT/report.html; -> its URL.

    `labels` is the label set (class names, palette). The gallery shows up to `gallery_size`
    of summary["worst_images"] and ["best_images"], reading only their rows of OUTPUT/masks/
    plus their image and label files; `pairing` (the job's LabelPairing) decodes the labels,
    default index PNGs with the label set's ignore index, and gives the boundary tolerance and
    trimap width the page quotes.
    """
    def gallery(rows: list[dict]) -> list[GalleryRow]:
        return build_gallery(output_url, rows[:gallery_size], labels, pairing, storage_options, thumb_width)

    worst, best = gallery(summary.get("worst_images", [])), gallery(summary.get("best_images", []))
    page = render_report(summary, labels, worst, best, title=output_url, pairing=pairing)
    url = f"{output_url.rstrip('/')}/{REPORT_HTML}"
    commit_bytes(url, page.encode("utf-8"), storage_options or {})
    return url


def render_report(summary: dict, label_set: LabelSet, worst: list[GalleryRow], best: list[GalleryRow], *,
                  title: str = "", pairing: LabelPairing | None = None) -> str:
    """The page as a string; pure, so it can be tested and previewed without storage."""
    raw, crf = summary.get("raw"), summary.get("crf")
    body = [f"<header><h1>segflow evaluation</h1><p class=sub>{escape(title)}</p>{_counts(summary)}</header>"]
    if raw is None:
        body.append("<p class=empty>No image was scored: every row in metrics/ is an error row. See errors/ for the reasons.</p>")
    else:
        body += [_headline(summary, pairing), _scores_table(summary), _class_table(summary, label_set),
                 _confusion(crf or raw, label_set, "CRF" if crf else "raw")]
    body += [_gallery("Worst images", worst, label_set), _gallery("Best images", best, label_set)]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>segflow evaluation {escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _counts(summary: dict) -> str:
    """Scored, rejected and unpaired images with example reasons, then what produced the report."""
    failed = summary["rows"] - summary["images_scored"]
    parts = [f"{summary['images_scored']} images scored", f"{summary['images_with_crf']} with CRF"]
    if failed:
        parts.append(f"{failed} without metrics (error rows)")
    parts.append(f"{summary.get('images_rejected', 0)} rejected (label refused)")
    parts.append(f"{summary.get('images_unpaired', 0)} unpaired (no label)")
    parts.append(f"{len(summary.get('unpaired_labels') or [])} labels without an image")
    reasons = [*summary.get("rejected_examples", []), *summary.get("unpaired_examples", [])]
    listed = "".join(f"<li>{escape(r)}</li>" for r in reasons)
    html = f"<p class=counts>{' · '.join(parts)}</p>" + (f"<ul class=reasons>{listed}</ul>" if listed else "")
    return html + _provenance(summary.get("provenance"))


def _provenance(p: dict | None) -> str:
    if not p:
        return ""
    params = p.get("refinement_parameters")
    shown = ", ".join(f"{k}={v}" for k, v in params.items()) if params else "none"
    rows = [("model", f"{p['model']} (weights {p.get('weights') or 'default'}), fingerprint {p['model_fingerprint']}"),
            ("refinement", f"{p['refinement']} ({shown}), fingerprint {p['refinement_fingerprint']}"),
            ("precision", p.get("precision", "off")), ("job fingerprint", p["job_fingerprint"]),
            ("images", p["images"]), ("labels", p["labels"]), ("date", p["date"])]
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class=provenance>{cells}</table>"


def _headline(summary: dict, pairing: LabelPairing | None) -> str:
    raw, crf, delta = summary["raw"], summary.get("crf"), summary.get("delta")
    tol = f" ({pairing.boundary_tolerance} px)" if pairing else ""
    width = f" ({pairing.trimap_width} px band)" if pairing else ""
    cards = []
    shown = (("miou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"),
             ("bf", "boundary F" + tol), ("trimap_miou", "trimap mIoU" + width))
    for key, label in shown:
        after = f"<span class=arrow>→</span><b>{_pct(crf[key])}</b>{_delta(delta[key])}" if crf else ""
        cards.append(f"<div class='card{' main' if key == 'miou' else ''}'><div class=k>{escape(label)}</div>"
                     f"<div class=v><span class=rawv>{_pct(raw[key])}</span>{after}</div>"
                     f"<div class=what>{'raw → CRF' if crf else 'raw (CRF off)'}</div></div>")
    return f"<section class=cards>{''.join(cards)}</section>"


def _scores_table(summary: dict) -> str:
    raw, crf, delta = summary["raw"], summary.get("crf"), summary.get("delta")
    rows = "".join(
        f"<tr><th>{escape(label)}<div class=what>{escape(what)}</div></th><td class=num>{_pct(raw[key])}</td>"
        f"<td class=num>{_pct(crf[key]) if crf else '—'}</td><td class=num>{_delta(delta[key]) if delta else '—'}</td></tr>"
        for key, label, what in SCORES
    )
    note = "" if summary["images_with_crf"] in (0, summary["images_scored"]) else \
        f"<p class=what>Δ compares CRF with raw on the {summary['images_with_crf']} images that have both.</p>"
    return (f"<section><h2>Raw vs CRF</h2><p class=what>All scores come from confusion matrices and boundary counts summed "
            f"over the dataset, in %.</p><table class=scores><thead><tr><th></th><th>raw</th><th>CRF</th><th>Δ</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{note}</section>")


def _class_table(summary: dict, label_set: LabelSet) -> str:
    raw, crf, delta = summary["raw"], summary.get("crf"), summary.get("delta")
    k = summary["num_classes"]
    total = sum(raw["per_class"]["gt_pixels"]) or 1
    rows = []
    for c in range(k):
        name = summary["classes"][c] if c < len(summary["classes"]) else f"class {c}"
        absent = c in raw["absent"] and (crf is None or c in crf["absent"])
        badge = " <span class=badge>absent</span>" if absent else ""
        cells = [f"<td>{_swatch(label_set, c)}</td><th>{escape(name)}{badge}</th>",
                 f"<td class=num>{raw['per_class']['gt_pixels'][c] / total * 100:.2f}</td>"]
        for score in ("iou", "bf", "trimap_iou"):
            r = raw["per_class"][score][c]
            v = crf["per_class"][score][c] if crf else None
            d = delta["per_class"][score][c] if delta else None
            bar = score == "iou"
            crf_cell = _score_cell(v, bar) if crf else "<td class=num>—</td>"
            cells += [_score_cell(r, bar), crf_cell, f"<td class=num>{_delta(d)}</td>"]
        rows.append(f"<tr{' class=absent' if absent else ''}>{''.join(cells)}</tr>")
    head = ("<tr><th></th><th>class</th><th>GT %</th><th>IoU raw</th><th>IoU CRF</th><th>Δ</th><th>BF raw</th><th>BF CRF</th>"
            "<th>Δ</th><th>trimap raw</th><th>trimap CRF</th><th>Δ</th></tr>")
    return (f"<section><h2>Per class</h2><p class=what>IoU, boundary F (BF) and trimap IoU in %. <em>absent</em>: "
            f"the class is in neither the ground truth nor any prediction, so it has no score (not 0).</p>"
            f"<table id=per-class class=classes><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></section>")


def _confusion(scores: dict, label_set: LabelSet, which: str) -> str:
    cm = scores["confusion"]
    k = len(cm)
    names = list(label_set.classes) + [f"class {i}" for i in range(len(label_set.classes), k)]
    head = "".join(f"<th class=col title='{escape(n)}'>{_swatch(label_set, j)}<span>{escape(n[:6])}</span></th>"
                   for j, n in enumerate(names[:k]))
    rows = []
    for i in range(k):
        total = sum(cm[i])
        cells = []
        for j in range(k):
            if not total:
                cells.append("<td class=none></td>")
                continue
            share = cm[i][j] / total
            ink = "#fff" if share > 0.55 else "#1f2328"
            cells.append(f"<td class='{'diag' if i == j else ''}' style='background:rgba(31,94,168,{share:.3f});color:{ink}' "
                         f"title='{escape(names[i])} → {escape(names[j])}: {cm[i][j]} px'>{share * 100:.0f}</td>")
        rows.append(f"<tr><th class=row>{_swatch(label_set, i)}{escape(names[i])}</th>{''.join(cells)}</tr>")
    return (f"<section><h2>Confusion ({which} masks)</h2><p class=what>Rows are ground truth, columns predictions; "
            f"each row is normalised to 100 %. The diagonal is per-class recall.</p><table id=confusion class=heat>"
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _gallery(title: str, rows: list[GalleryRow], label_set: LabelSet) -> str:
    if not rows:
        return ""
    legend = "".join(f"<span class=legend>{_swatch(label_set, c)}{escape(n)}</span>" for c, n in enumerate(label_set.classes))
    items = []
    for row in rows:
        name = row.uri.rsplit("/", 1)[-1]
        score = f"mIoU raw {_pct(row.raw_miou)}" + (f" → CRF {_pct(row.crf_miou)}" if row.crf_miou is not None else "")
        figures = "".join(
            f"<figure>{_picture(p)}<figcaption>{escape(p.title)}</figcaption></figure>" for p in row.panels
        )
        items.append(f"<div class=item><div class=caption><b title='{escape(row.uri)}'>{escape(name)}</b> {score}</div>"
                     f"<div class=strip>{figures}</div></div>")
    return f"<section class=gallery><h2>{escape(title)}</h2><div class=legends>{legend}</div>{''.join(items)}</section>"


def _picture(panel) -> str:
    if panel.data_uri:
        return f"<img src='{panel.data_uri}' alt='{escape(panel.title)}'>"
    return f"<div class=missing>{escape(panel.note or 'not available')}</div>"


def _score_cell(value: float | None, bar: bool) -> str:
    if value is None:
        return "<td class='num none'>—</td>"
    fill = f"<i style='width:{value * 100:.1f}%'></i>" if bar else ""
    return f"<td class='num{' bar' if bar else ''}'>{fill}<span>{value * 100:.1f}</span></td>"


def _swatch(label_set: LabelSet, c: int) -> str:
    if c >= len(label_set.palette):
        return "<span class=swatch></span>"
    r, g, b = label_set.palette[c]
    return f"<span class=swatch style='background:rgb({r},{g},{b})'></span>"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}"


def _delta(value: float | None) -> str:
    if value is None:
        return "<span class=d>—</span>"
    points = value * 100
    kind = "up" if points >= 0.05 else "down" if points <= -0.05 else "flat"
    return f"<span class='d {kind}'>{points:+.1f}</span>"


CSS = """
:root{--ink:#1f2328;--mute:#656d76;--line:#d0d7de;--up:#1a7f37;--down:#cf222e;--bg:#f6f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);margin:0 auto;max-width:1360px;padding:24px 32px;background:#fff}
h1{margin:0;font-size:26px}
h2{font-size:18px;margin:28px 0 6px}
.sub{color:var(--mute);margin:2px 0;font-family:ui-monospace,monospace;font-size:12px}
.counts{margin:4px 0 0;color:var(--mute)}
.what{color:var(--mute);font-size:12px;font-weight:400}
.cards{display:flex;gap:14px;margin-top:18px;flex-wrap:wrap}
.card{flex:1 1 220px;border:1px solid var(--line);border-radius:10px;padding:14px 16px;background:var(--bg)}
.card.main{background:#eef4fb;border-color:#9cc0e6}
.card .k{font-weight:600;color:var(--mute)}
.card .v{font-size:28px;margin:4px 0}
.card.main .v{font-size:36px}
.rawv{color:var(--mute)}
.arrow{margin:0 8px;color:var(--mute)}
.card .d{font-size:16px;margin-left:10px}
.d.up{color:var(--up);font-weight:600}
.d.down{color:var(--down);font-weight:600}
.d.flat{color:var(--mute)}
table{border-collapse:collapse}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left}
thead th{font-size:12px;color:var(--mute);font-weight:600;border-bottom:2px solid var(--line)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.scores th{font-weight:600}
table.scores td{min-width:80px}
.classes td.bar{position:relative;min-width:110px}
.classes td.bar i{position:absolute;left:0;top:3px;bottom:3px;background:#dbe8f6;z-index:0}
.classes td.bar span{position:relative;z-index:1}
.classes tr.absent{color:var(--mute);background:repeating-linear-gradient(45deg,#fff,#fff 6px,#f3f3f3 6px,#f3f3f3 12px)}
.badge{font-size:11px;font-weight:600;color:#9a6700;background:#fff8c5;border:1px solid #d4a72c;border-radius:8px;padding:0 6px;margin-left:6px}
.swatch{display:inline-block;width:14px;height:14px;border-radius:3px;border:1px solid rgba(0,0,0,.25);vertical-align:-2px;margin-right:6px}
.heat td{width:46px;height:30px;text-align:center;border:1px solid #fff;font-size:12px;font-variant-numeric:tabular-nums}
.heat td.diag{outline:2px solid #1f2328;outline-offset:-2px}
.heat td.none{background:repeating-linear-gradient(45deg,#fff,#fff 4px,#eee 4px,#eee 8px)}
.heat th.col{font-size:11px;text-align:center;font-weight:500;vertical-align:bottom}
.heat th.col span{display:block}
.heat th.col .swatch{margin:0}
.heat th.row{white-space:nowrap;font-weight:500}
.legends{margin:6px 0 10px}
.legend{display:inline-block;margin-right:14px;font-size:12px}
.item{margin:14px 0 22px}
.caption{margin-bottom:6px}
.strip{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:8px;max-width:1300px}
figure{margin:0}
figure img{display:block;width:100%;height:auto;border-radius:4px}
figcaption{font-size:12px;color:var(--mute);text-align:center}
.missing{width:100%;aspect-ratio:4/3;display:flex;align-items:center;justify-content:center;text-align:center;padding:8px;background:var(--bg);border:1px dashed var(--line);color:var(--mute);font-size:12px}
.empty{padding:20px;background:#fff8c5}
"""
