"""The HTML report, from a tiny metrics + masks dataset built here (no Ray engine), and rendered
by headless Chromium when it is installed."""

from __future__ import annotations

import io
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segflow.models.labels import CAMVID
from segflow.pipeline.config import LabelPairing
from segflow.pipeline.evaluation.metrics import image_metrics, metric_schema
from segflow.pipeline.evaluation.report import write_report
from segflow.pipeline.evaluation.summary import summarise_metrics

VOID = CAMVID.ignore_index
H, W = 72, 96


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def palette_png(mask: np.ndarray) -> bytes:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(CAMVID.flat_palette())
    return png_bytes(image)


def street(i: int) -> np.ndarray:
    """A toy street label: sky, building, road, a car whose position depends on i, a void strip."""
    label = np.full((H, W), 0, np.uint8)  # sky
    label[18:40] = 1  # building
    label[40:] = 3  # road
    label[34:56, 10 + 12 * i: 40 + 12 * i] = 8  # car
    label[:, W - 4:] = VOID
    return label


@pytest.fixture
def evaluated_output(tmp_path):
    """OUTPUT with metrics/ (two shards) and masks/ as the engine writes them, plus the images and labels."""
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    metrics, masks = [], []
    for i in range(5):
        label = street(i)
        colours = np.array(CAMVID.palette + ((0, 0, 0),), np.float32)[label]
        photo = np.clip(colours * 0.8 + rng.normal(0, 18, colours.shape) + 20, 0, 255).astype(np.uint8)
        image_uri = (tmp_path / "images" / f"frame{i}.png").as_uri()
        label_uri = (tmp_path / "labels" / f"frame{i}.png").as_uri()
        Image.fromarray(photo).save(tmp_path / "images" / f"frame{i}.png")
        Image.fromarray(label, mode="L").save(tmp_path / "labels" / f"frame{i}.png")
        truth = np.where(label == VOID, 3, label)
        raw = np.roll(truth, 2 * i + 1, axis=1)  # worse the larger i
        crf = np.roll(truth, i, axis=1)
        metrics.append({"uri": image_uri, "label_uri": label_uri, **image_metrics(label, raw, crf, CAMVID.num_classes, VOID)})
        masks.append({"uri": image_uri, "mask": palette_png(crf), "raw_mask": palette_png(raw)})
    for name, rows in (("metrics", metrics), ("masks", masks)):
        (tmp_path / name).mkdir()
        schema = pa.schema([("uri", pa.string()), ("label_uri", pa.string()), *metric_schema()]) if name == "metrics" else None
        pq.write_table(pa.Table.from_pylist(rows[:3], schema=schema), tmp_path / name / f"shard-{'0' * 16}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[3:], schema=schema), tmp_path / name / f"shard-{'1' * 16}.parquet")
    return tmp_path


def write(output, gallery_size=2):
    summary = summarise_metrics(output.as_uri(), label_set=CAMVID, extremes=3)
    pairing = LabelPairing(labels=(output / "labels").as_uri(), ignore_index=VOID)
    url = write_report(output.as_uri(), summary, labels=CAMVID, pairing=pairing, gallery_size=gallery_size)
    assert url == output.as_uri() + "/report.html"
    return summary, (output / "report.html").read_text()


def test_report_is_self_contained_with_table_heatmap_and_gallery(evaluated_output):
    summary, html = write(evaluated_output)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I), "the page must make no network request"
    assert "<link" not in html and "<script" not in html and "@import" not in html
    assert 'id=per-class' in html and 'id=confusion' in html
    # Classes the toy street never shows (Pole, Tree, ...) are marked absent, not scored 0.
    assert html.count("class=badge>absent") == len(summary["crf"]["absent"]) == 7
    # Worst 2 and best 2 images, four panels each: image | ground truth | raw | CRF.
    assert html.count("src='data:image/jpeg;base64,") == 16
    assert [r["uri"].rsplit("/", 1)[1] for r in summary["worst_images"]] == ["frame4.png", "frame3.png", "frame2.png"]
    assert html.index("frame4.png") < html.index("Best images") < html.index("frame0.png", html.index("Best images"))
    assert f"{summary['raw']['miou'] * 100:.1f}" in html and f"{summary['delta']['miou'] * 100:+.1f}" in html


def test_gallery_reports_missing_rows_instead_of_failing(evaluated_output):
    for f in (evaluated_output / "masks").iterdir():
        table = pq.read_table(f)
        pq.write_table(table.filter(pa.compute.invert(pa.compute.match_substring(table["uri"], "frame4"))), f)
    (evaluated_output / "labels" / "frame3.png").write_bytes(b"not a png")
    _, html = write(evaluated_output)
    assert "no row in masks/" in html
    assert "label unreadable" in html and "frame3.png: not a decodable label image" in html


@pytest.mark.skipif(shutil.which("chromium") is None and not __import__("os").path.exists("/usr/bin/chromium"),
                    reason="chromium is not installed (apt-get install -y chromium) so the page cannot be rendered")
def test_report_renders_in_headless_chromium(evaluated_output, tmp_path_factory):
    write(evaluated_output)
    shot_dir = tmp_path_factory.mktemp("shot")
    shot = shot_dir / "report.png"
    command = [
        shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={shot_dir / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2000",
        (evaluated_output / "report.html").as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1400)
    distinct = len(np.unique(pixels.reshape(-1, 3) @ np.array([65536, 256, 1])))
    non_white = (pixels.min(axis=-1) < 235).mean()
    assert distinct > 500, f"only {distinct} colours: the page looks blank"
    assert non_white > 0.08, f"only {non_white:.1%} of the page is not white"
    # The per-class table and heatmap sit in the top half: it must carry ink, and the heatmap's blue.
    top = pixels[:1000]
    assert (top.min(axis=-1) < 200).mean() > 0.03
    blue = (top[..., 2] > top[..., 0] + 60) & (top[..., 2] > 120)
    assert blue.sum() > 500
