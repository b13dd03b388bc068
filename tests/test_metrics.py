"""Metrics: confusion totals against torchvision's reference on real CamVid labels, boundary
F-score and trimap on hand-made masks worked out on paper, absent classes, aggregation."""

from __future__ import annotations

import json
import uuid
from fractions import Fraction

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from segflow.models.labels import CAMVID
from segflow.pipeline.evaluation.boundary import boundary_counts, boundary_map, dilate_disk, trimap_band
from segflow.pipeline.config import LabelPairing
from segflow.errors import InputError, LabelError
from segflow.pipeline.evaluation.groundtruth import decode_label
from segflow.pipeline.evaluation.metrics import MetricTotals, aggregate, boundary_f1, image_metrics, metric_schema
from segflow.pipeline.evaluation.sparse import dense_row, to_dense
from segflow.pipeline.schema import MASKS_SCHEMA
from segflow.pipeline.evaluation.summary import summarise_metrics

K_CAMVID, VOID_CAMVID = 11, 11


def torchvision_confusion(label: np.ndarray, pred: np.ndarray, n: int) -> torch.Tensor:
    """torchvision references/segmentation/utils.py ConfusionMatrix.update, verbatim in spirit."""
    a, b = torch.from_numpy(label.ravel()), torch.from_numpy(pred.ravel())
    k = (a >= 0) & (a < n)
    inds = n * a[k].to(torch.int64) + b[k].to(torch.int64)
    return torch.bincount(inds, minlength=n**2).reshape(n, n)


def dense(row: dict, matrix: str, k: int) -> list[int]:
    """A row's stored (sparse) matrix as the flat row-major K*K list."""
    return to_dense(row[f"{matrix}_cells"], row[f"{matrix}_counts"], k).ravel().tolist()


def rows_table(rows: list[dict], uris: list[str] | None = None) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=metric_schema())
    if uris is not None:
        table = table.append_column("uri", pa.array(uris)).append_column("label_uri", pa.array([u + ".label" for u in uris]))
    return table


# --- real data: CamVid val labels ------------------------------------------------------------


@pytest.fixture(scope="module")
def camvid_labels(camvid):
    pairing = LabelPairing(labels=str(camvid / "valannot"), ignore_index=VOID_CAMVID)
    paths = sorted((camvid / "valannot").glob("*.png"))[:6]
    return [decode_label(p.read_bytes(), str(p), pairing, K_CAMVID) for p in paths]


def perturbed_predictions(labels: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """raw: each label shifted 3 px down and 7 px right; crf: the next image's label. Void -> a real class."""
    raw = [np.where(s == VOID_CAMVID, 8, s) for s in (np.roll(lab, (3, 7), axis=(0, 1)) for lab in labels)]
    crf = [np.where(labels[(i + 1) % len(labels)] == VOID_CAMVID, 0, labels[(i + 1) % len(labels)]) for i in range(len(labels))]
    return raw, crf


def test_camvid_confusion_matches_torchvision_reference_to_the_pixel(camvid_labels, tmp_path):
    raw, crf = perturbed_predictions(camvid_labels)
    rows = [image_metrics(lab, r, c, K_CAMVID, VOID_CAMVID, tolerance=2, trimap_width=8)
            for lab, r, c in zip(camvid_labels, raw, crf)]
    ref_raw = sum(torchvision_confusion(lab, r, K_CAMVID) for lab, r in zip(camvid_labels, raw))
    ref_crf = sum(torchvision_confusion(lab, c, K_CAMVID) for lab, c in zip(camvid_labels, crf))

    for row, lab, r in zip(rows, camvid_labels, raw):  # per image, flat, rows = ground truth
        assert dense(row, "raw_confusion", K_CAMVID) == torchvision_confusion(lab, r, K_CAMVID).ravel().tolist()

    # Through Parquet, two shard files, streamed by summarise_metrics.
    uris = [f"img{i}.png" for i in range(len(rows))]
    fs = fsspec.filesystem("file")
    commit_metrics_shard(fs, str(tmp_path), "a" * 16, rows_table(rows[:4], uris[:4]))
    commit_metrics_shard(fs, str(tmp_path), "b" * 16, rows_table(rows[4:], uris[4:]))
    summary = summarise_metrics(tmp_path.as_uri(), label_set=CAMVID)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["images_scored"] == summary["images_with_crf"] == 6

    for variant, ref in (("raw", ref_raw), ("crf", ref_crf)):
        assert summary[variant]["confusion"] == ref.tolist()
        h = ref.double()
        iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
        ours = torch.tensor([np.nan if v is None else v for v in summary[variant]["per_class"]["iou"]], dtype=torch.float64)
        torch.testing.assert_close(ours, iu, equal_nan=True, rtol=0, atol=1e-12)
        assert summary[variant]["miou"] == pytest.approx(float(iu[~iu.isnan()].mean()), abs=1e-12)
        assert summary[variant]["pixel_accuracy"] == pytest.approx(float(torch.diag(h).sum() / h.sum()), abs=1e-12)
        acc = torch.diag(h) / h.sum(1)
        assert summary[variant]["mean_class_accuracy"] == pytest.approx(float(acc[~acc.isnan()].mean()), abs=1e-12)
    assert summary["delta"]["miou"] == pytest.approx(summary["crf"]["miou"] - summary["raw"]["miou"])
    # The dataset mIoU comes from the summed matrix, not from a mean of per-image mIoUs.
    assert summary["raw"]["miou"] != pytest.approx(np.mean([r["raw_miou"] for r in rows]), abs=1e-6)
    assert pq.read_table(tmp_path / "summary.parquet").column("class").to_pylist() == list(CAMVID.classes)


def test_camvid_aggregate_merges_by_addition(camvid_labels):
    raw, crf = perturbed_predictions(camvid_labels)
    rows = [image_metrics(lab, r, c, K_CAMVID, VOID_CAMVID) for lab, r, c in zip(camvid_labels, raw, crf)]
    whole = aggregate(rows_table(rows))
    left, right = MetricTotals(), MetricTotals()
    left.process(rows_table(rows[:2]))
    right.process(rows_table(rows[2:]))
    left.merge(right)
    assert left.compute() == whole
    assert 0 < whole["raw"]["bf"] < 1 and 0 < whole["raw"]["trimap_miou"] < whole["raw"]["miou"]


def test_camvid_perfect_prediction_scores_one(camvid_labels):
    lab = camvid_labels[0]
    perfect = np.where(lab == VOID_CAMVID, 0, lab)
    row = image_metrics(lab, perfect, None, K_CAMVID, VOID_CAMVID)
    assert row["raw_miou"] == row["raw_pixel_accuracy"] == row["raw_bf"] == 1.0
    counts = [dense_row(row, K_CAMVID)[f"raw_boundary_{name}"] for name in ("pred", "pred_matched", "gt", "gt_matched")]
    assert all(c == counts[0] for c in counts) and sum(counts[0]) > 0
    assert row["crf_confusion_cells"] is None and row["crf_confusion_counts"] is None and row["crf_miou"] is None


# --- boundary F-score on paper ----------------------------------------------------------------

# 6 x 8 ground truth: class 0 in columns 0-3, class 1 in columns 4-7.
# Prediction: rows 0-2 equal the ground truth; in rows 3-5 the edge moves 2 px right (class 0 in
# columns 0-5, class 1 in columns 6-7).
#
#        GT            pred
#   00001111       00001111
#   00001111       00001111
#   00001111       00001111
#   00001111       00000011
#   00001111       00000011
#   00001111       00000011
#
# GT boundary (labelled pixel with a 4-neighbour of another class):
#   class 0: (r,3) r=0..5 -> 6 px;  class 1: (r,4) r=0..5 -> 6 px.
# Pred boundary:
#   class 0: (0,3) (1,3) (2,3), (3,4) [its upper neighbour (2,4) is 1], (3,5) (4,5) (5,5) -> 7 px
#   class 1: (0,4) (1,4) (2,4), (2,5) [its lower neighbour (3,5) is 0], (3,6) (4,6) (5,6) -> 7 px
# d = 0 (same pixel): class 0 pred matched (0..2,3) = 3, gt matched 3 -> P 3/7, R 3/6,
#   F = 2PR/(P+R) = (3/7)/(13/14) = 6/13; class 1 the same by symmetry -> BF 6/13.
# d = 1 (disk: self + 4-neighbours): class 0 adds pred (3,4) (1 px from (3,3)) -> 4/7;
#   gt adds (3,3) (1 px from (3,4)); (4,3) is √2 from (3,4) and 2 from (4,5): not within 1 -> 4/6;
#   F = 2·(4/7)(2/3)/(4/7 + 2/3) = 8/13. Class 1: pred adds (2,5) (1 px from (2,4)) -> 4/7,
#   gt adds (3,4) (1 px from (2,4)) -> 4/6; F = 8/13 -> BF 8/13.
#   (A 3x3 square instead of a disk would match (4,3) with (3,4) and give gt 5/6: this case
#   tells a disk from a square.)
# d = 2: every displaced pixel is exactly 2 px from its counterpart -> 7/7 and 6/6, F = 1.

GT_STEP = np.array([[0] * 4 + [1] * 4] * 6)
PRED_STEP = GT_STEP.copy()
PRED_STEP[3:, 4:6] = 0


@pytest.mark.parametrize(
    "tolerance, matched_pred, matched_gt, bf",
    [(0, 3, 3, Fraction(6, 13)), (1, 4, 4, Fraction(8, 13)), (2, 7, 6, Fraction(1))],
)
def test_boundary_f_score_matches_paper_derivation(tolerance, matched_pred, matched_gt, bf):
    valid = np.ones(GT_STEP.shape, bool)
    counts = boundary_counts(GT_STEP, PRED_STEP, valid, num_classes=2, tolerance=tolerance)
    assert counts.tolist() == [[7, 7], [matched_pred] * 2, [6, 6], [matched_gt] * 2]
    precision, recall, f1 = boundary_f1(counts)
    assert f1.tolist() == pytest.approx([float(bf)] * 2, abs=1e-12)
    row = image_metrics(GT_STEP, PRED_STEP, None, 2, None, tolerance=tolerance, trimap_width=1)
    assert row["raw_bf"] == pytest.approx(float(bf), abs=1e-12)


def test_boundary_pixels_of_the_step():
    edge = boundary_map(PRED_STEP, np.ones(PRED_STEP.shape, bool))
    expected = {(0, 3), (1, 3), (2, 3), (3, 4), (3, 5), (4, 5), (5, 5), (0, 4), (1, 4), (2, 4), (2, 5), (3, 6), (4, 6), (5, 6)}
    assert set(zip(*np.nonzero(edge))) == expected


def test_void_creates_no_boundary():
    # 0 0 0 V 1 1 1 with a void column between the classes, and a void 2x2 hole inside class 0.
    gt = np.array([[0, 0, 0, 9, 1, 1, 1]] * 6)
    gt[1:3, 0:2] = 9
    pred = np.where(gt == 9, 0, gt)  # the prediction has no void; its 0|1 edge runs along the void column
    row = image_metrics(gt, pred, None, num_classes=2, ignore_index=9, tolerance=0, trimap_width=2)
    assert row["raw_class_boundary_gt"] == row["raw_class_boundary_pred"] == [0, 0]  # both classes held, no edge
    assert dense_row(row, 2)["raw_boundary_gt"] == [0, 0]
    assert row["raw_bf"] is None  # nothing to judge, not 0 and not 1
    assert dense(row, "raw_trimap_confusion", 2) == [0, 0, 0, 0]


def test_boundary_only_on_one_side_scores_zero():
    gt = np.array([[0, 0, 1, 1]] * 3)
    pred = np.zeros_like(gt)  # the edge is missed entirely
    counts = boundary_counts(gt, pred, np.ones(gt.shape, bool), 2, tolerance=2)
    assert counts.tolist() == [[0, 0], [0, 0], [3, 3], [0, 0]]
    assert boundary_f1(counts)[2].tolist() == [0.0, 0.0]


def test_disk_dilation_equals_brute_force_euclidean_distance():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) < 0.03
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[:23, :31]
    dist2 = ((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(-1)
    for radius in (0, 1, 2, 3, 8):
        assert np.array_equal(dilate_disk(mask, radius), dist2 <= radius * radius), radius


# --- trimap ----------------------------------------------------------------------------------


def test_trimap_band_membership():
    # 5 x 9: class 0 in columns 0-3, class 1 in columns 4-8; ground-truth boundary = columns 3 and 4.
    gt = np.array([[0] * 4 + [1] * 5] * 5)
    gt[0, 2] = 7  # a void pixel inside the band stays out of it
    valid = gt != 7
    for width, columns in ((0, {3, 4}), (1, {2, 3, 4, 5}), (2, {1, 2, 3, 4, 5, 6})):
        expected = np.zeros(gt.shape, bool)
        expected[:, sorted(columns)] = True
        expected &= valid
        assert np.array_equal(trimap_band(gt, valid, width), expected), width
    # Predicting class 0 everywhere, width 1: band = columns 2-5 less the void pixel.
    # Class 0 in the band: columns 2, 3 -> 10 - 1 void = 9 px, all right; class 1: columns 4, 5 -> 10 px, all wrong.
    row = image_metrics(gt, np.zeros_like(gt), None, 2, 7, tolerance=2, trimap_width=1)
    assert dense(row, "raw_trimap_confusion", 2) == [9, 0, 10, 0]
    assert aggregate(rows_table([row]))["raw"]["trimap_miou"] == pytest.approx((9 / 19 + 0) / 2)


# --- absent classes, sizes, crf-less runs ---------------------------------------------------


def test_absent_classes_are_reported_absent_not_zero():
    gt = np.array([[0, 0, 1, 1]] * 4)
    pred = np.array([[0, 2, 1, 1]] * 4)  # class 2 only predicted (IoU 0), class 3 nowhere (absent)
    row = image_metrics(gt, pred, pred, num_classes=4, ignore_index=None)
    assert row["raw_classes"] == [0, 1, 2] and row["raw_class_iou"] == [0.5, 1.0, 0.0]  # class 3 is nowhere: not listed
    assert dense_row(row, 4)["raw_iou"] == [0.5, 1.0, 0.0, None]
    summary = aggregate(rows_table([row]))
    assert summary["raw"]["per_class"]["iou"][3] is None and summary["raw"]["absent"] == [3]
    assert summary["raw"]["per_class"]["iou"][2] == 0.0
    assert summary["raw"]["miou"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3: the absent class is not averaged
    assert summary["delta"]["per_class"]["iou"][3] is None


def test_size_mismatch_raises_label_error_naming_the_label():
    label = np.zeros((360, 480), np.uint8)
    with pytest.raises(LabelError, match=r"labels/x\.png: label is 480x360 \(WxH\) but the crf mask is 480x352"):
        image_metrics(label, np.zeros((360, 480), np.uint8), np.zeros((352, 480), np.uint8), 11, 11, uri="labels/x.png")


def test_rows_without_crf_or_metrics_are_counted_apart():
    gt = np.array([[0, 0, 1, 1]] * 4)
    good = image_metrics(gt, gt, np.array([[0, 1, 1, 1]] * 4), 2, None)
    raw_only = image_metrics(gt, np.zeros_like(gt), None, 2, None)
    error_row = {f.name: None for f in metric_schema()}
    summary = aggregate([rows_table([good, raw_only]), rows_table([error_row])])
    assert (summary["rows"], summary["images_scored"], summary["images_with_crf"]) == (3, 2, 1)
    # raw covers both images; delta compares crf with raw on the one image that has both.
    assert summary["raw"]["miou"] == pytest.approx((16 / 24 + 8 / 16) / 2)  # summed [[16, 0], [8, 8]]
    assert summary["crf"]["miou"] == pytest.approx((4 / 8 + 8 / 12) / 2)  # [[4, 4], [0, 8]]
    assert summary["delta"]["miou"] == pytest.approx(summary["crf"]["miou"] - 1.0)


# --- summarise_metrics over storage -----------------------------------------------------------


def test_summary_streams_shards_written_without_a_schema_on_any_fsspec_store():
    """A shard whose rows all lack a CRF, written by pa.Table.from_pylist without a schema, has
    crf columns of type null; the summary must still read it beside a shard that has them."""
    gt = np.array([[0, 0, 1, 1]] * 4)
    with_crf = image_metrics(gt, np.zeros_like(gt), gt, 2, None)  # final (CRF) mIoU 1.0
    without = image_metrics(gt, np.zeros_like(gt), None, 2, None)  # final (raw) mIoU (0.5 + 0) / 2
    output = f"memory://segflow-test-{uuid.uuid4().hex}/out"
    fs, root = fsspec.core.url_to_fs(output)
    for name, row in (("a", with_crf), ("b", without)):
        table = pa.Table.from_pylist([{"uri": f"{name}.png", "label_uri": f"{name}.label.png", **row, "junk": b"x" * 1000}])
        commit_metrics_shard(fs, root, name * 16, table)
    assert pq.read_schema(fs.open(f"{root}/metrics/shard-{'b' * 16}.parquet")).field("crf_confusion_cells").type == pa.null()
    # an interrupted commit's metrics (no masks file for its shard) are not results
    fs.pipe(f"{root}/metrics/shard-{'c' * 16}.parquet", fs.cat(f"{root}/metrics/shard-{'a' * 16}.parquet"))
    try:
        summary = summarise_metrics(output, extremes=1)
        assert (summary["images_scored"], summary["images_with_crf"]) == (2, 1)
        assert summary["raw"]["confusion"] == [[16, 0], [16, 0]] and summary["crf"]["confusion"] == [[8, 0], [0, 8]]
        assert [r["uri"] for r in summary["worst_images"]] == ["b.png"]
        assert [r["uri"] for r in summary["best_images"]] == ["a.png"]
        assert json.loads(fs.cat(f"{root}/summary.json")) == summary
        assert pq.read_table(fs.open(f"{root}/summary.parquet")).column("iou_crf").to_pylist() == [1.0, 1.0]
    finally:
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


def commit_metrics_shard(fs, root: str, shard_id: str, metrics: pa.Table) -> None:
    """A committed shard as summarise_metrics reads it: its metrics file and its (empty) masks file, the marker."""
    for dataset, table in (("metrics", metrics), ("masks", MASKS_SCHEMA.empty_table())):
        fs.makedirs(f"{root}/{dataset}", exist_ok=True)
        with fs.open(f"{root}/{dataset}/shard-{shard_id}.parquet", "wb") as f:
            pq.write_table(table, f)


def test_summary_without_metrics_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="metrics: no metrics of committed shards here; `segflow evaluate` writes them"):
        summarise_metrics(tmp_path.as_uri())
