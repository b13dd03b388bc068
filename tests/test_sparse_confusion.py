"""Sparse confusion matrices: the same numbers as the dense lists they replace, and older
outputs (dense lists in Parquet) still read, summarise and rescore.

Rows are real computed confusions: CamVid val labels against shifted predictions, at
CamVid's 11 classes and with the class ids spread over ADE20K's 150.
"""

from __future__ import annotations

import datetime as _dt

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow.pipeline import commit
from segflow.pipeline.commit import METRICS, commit_shard, metrics_schema, shard_file_url
from segflow.pipeline.config import LabelPairing
from segflow.pipeline.evaluation.groundtruth import decode_label
from segflow.pipeline.evaluation.metrics import MetricTotals, aggregate, image_metrics, metric_schema
from segflow.pipeline.evaluation.sparse import MATRICES, dense_row, dense_schema, to_dense
from segflow.pipeline.evaluation.summary import summarise_metrics
from segflow.pipeline.history import history_url
from segflow.pipeline.reader import read_metrics

K_CAMVID, VOID = 11, 11
K_ADE = 150


@pytest.fixture(scope="module")
def scenes(camvid):
    """(label, raw prediction, CRF prediction) of 6 CamVid val images: the label shifted, the next image's label."""
    pairing = LabelPairing(labels=str(camvid / "valannot"), ignore_index=VOID)
    paths = sorted((camvid / "valannot").glob("*.png"))[:6]
    labels = [decode_label(p.read_bytes(), str(p), pairing, K_CAMVID) for p in paths]
    raw = [np.where(s == VOID, 8, s) for s in (np.roll(lab, (3, 7), axis=(0, 1)) for lab in labels)]
    crf = [np.where(labels[(i + 1) % 6] == VOID, 0, labels[(i + 1) % 6]) for i in range(6)]
    return labels, raw, crf


def ade_ids(classes: np.ndarray) -> np.ndarray:
    """CamVid ids spread over 150 classes (0 -> 3, 1 -> 16, ...), void kept as void."""
    return np.where(classes == VOID, 255, classes.astype(np.int64) * 13 + 3)


def metric_rows(scenes, k: int, spread=lambda a: a, void: int = VOID) -> list[dict]:
    labels, raw, crf = scenes
    rows = [image_metrics(spread(lab), spread(r), spread(c) if i % 3 else None, k, void)  # every third image: no CRF
            for i, (lab, r, c) in enumerate(zip(labels, raw, crf))]
    return [{"uri": f"img{i}.png", "label_uri": f"img{i}.label.png", "shard_id": "s", **row} for i, row in enumerate(rows)]


def legacy_schema() -> pa.Schema:
    """What metrics files held before the sparse form: each matrix one dense K*K list<int64>."""
    return dense_schema(metrics_schema())


@pytest.mark.parametrize("k, spread, void", [(K_CAMVID, lambda a: a, VOID), (K_ADE, ade_ids, 255)], ids=["camvid-11", "ade-150"])
def test_sparse_rows_aggregate_exactly_as_the_dense_rows_they_replace(scenes, k, spread, void):
    rows = metric_rows(scenes, k, spread, void)
    sparse = pa.Table.from_pylist(rows, schema=metrics_schema())
    dense = pa.Table.from_pylist([dense_row(r, k) for r in rows], schema=legacy_schema())
    expected = aggregate(dense)
    assert expected["images_scored"] == 6 and expected["images_with_crf"] == 4
    assert aggregate(sparse) == expected  # every score, per-class list and summed matrix, exactly
    mixed = MetricTotals()  # an output with old and new shards: batch by batch, either form
    mixed.process(dense.slice(0, 3))
    mixed.process(sparse.slice(3))
    assert mixed.compute() == expected
    # the dense matrices are the independent bincount of label against prediction
    labels, raw, _ = scenes
    for row, lab, r in zip(rows, labels, raw):
        lab, r = spread(lab), spread(r)
        keep = (lab >= 0) & (lab < k)
        reference = np.bincount(k * lab[keep].astype(np.int64) + r[keep], minlength=k * k).reshape(k, k)
        assert np.array_equal(to_dense(row["raw_confusion_cells"], row["raw_confusion_counts"], k), reference)


def test_a_row_grows_with_the_classes_it_shows_not_with_k(scenes):
    small, large = metric_rows(scenes, K_CAMVID), metric_rows(scenes, K_ADE, ade_ids, 255)
    labels, raw, _ = scenes
    for a, b, lab, r in zip(small, large, labels, raw):
        present = set(np.unique(lab[lab != VOID]).tolist()) | set(np.unique(r).tolist())
        for m in ("raw_confusion", "raw_trimap_confusion"):
            assert len(a[f"{m}_cells"]) == len(b[f"{m}_cells"]) <= len(present) ** 2  # the same cells, renumbered
            assert a[f"{m}_counts"] == b[f"{m}_counts"] and all(n > 0 for n in a[f"{m}_counts"])
        # the per-class lists: one value per class shown, the same values at 11 and at 150 classes
        assert a["raw_classes"] == sorted(present) and b["raw_classes"] == ade_ids(np.array(sorted(present))).tolist()
        for name in ("class_iou", "class_boundary_pred", "class_boundary_pred_matched", "class_boundary_gt", "class_boundary_gt_matched"):
            assert a[f"raw_{name}"] == b[f"raw_{name}"] and len(a[f"raw_{name}"]) == len(present)
        assert (a["num_classes"], b["num_classes"]) == (K_CAMVID, K_ADE)
        sizes = [sum(len(v) for v in row.values() if isinstance(v, list)) for row in (a, b)]
        assert sizes[0] == sizes[1]  # every list value of the row: nothing is K long


def test_an_output_committed_with_dense_matrices_still_reads_and_summarises(scenes, tmp_path, monkeypatch):
    rows = metric_rows(scenes, K_CAMVID)
    new, old = tmp_path / "new", tmp_path / "old"
    commit_shard(str(new), "a" * 16, [], [], rows[:3], {})
    commit_shard(str(new), "b" * 16, [], [], rows[3:], {})
    commit_shard(str(old), "b" * 16, [], [], rows[3:], {})  # one shard of today's form beside an older one
    with monkeypatch.context() as m:  # an older segflow: commit_shard wrote dense lists
        m.setattr(commit, "metrics_schema", legacy_schema)
        commit_shard(str(old), "a" * 16, [], [], [dense_row(r, K_CAMVID) for r in rows[:3]], {})
    assert "raw_confusion" in pq.read_schema(shard_file_url(str(old), METRICS, "a" * 16)).names

    assert summarise_metrics(str(old)) == summarise_metrics(str(new))
    # read_metrics gives one form for every row: cells and counts
    assert read_metrics(str(old)).sort_by("uri").to_pylist() == read_metrics(str(new)).sort_by("uri").to_pylist()
    # and the dense lists of old, asked for by name, from either form
    columns = ["uri", *MATRICES]
    expected = sorted(({c: dense_row(r, K_CAMVID)[c] for c in columns} for r in rows), key=lambda r: r["uri"])
    for output in (old, new):
        assert read_metrics(str(output), columns=columns).sort_by("uri").to_pylist() == expected
    assert read_metrics(str(old), columns=["uri", "crf_confusion_counts"]).column_names == ["uri", "crf_confusion_counts"]


def test_rescoring_in_an_older_file_keeps_the_other_rows_numbers(scenes, tmp_path, monkeypatch):
    from segflow.pipeline.evaluation.rescore import _replace_rows

    rows = metric_rows(scenes, K_CAMVID)
    output = str(tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(commit, "metrics_schema", legacy_schema)
        commit_shard(output, "a" * 16, [], [], [dense_row(r, K_CAMVID) for r in rows], {})
    before = summarise_metrics(output)
    fs = fsspec.filesystem("file")
    stamp = _dt.datetime.now(_dt.timezone.utc)
    # img0 rescored against the same label: the same row comes back, in today's form
    _replace_rows(fs, output, METRICS, "a" * 16, ["img0.png"], [rows[0]], stamp, "fp", history_url(output, METRICS), None)
    stored = pq.read_table(shard_file_url(output, METRICS, "a" * 16))
    assert "raw_confusion" not in stored.column_names and stored.column("raw_confusion_cells").null_count == 0
    assert summarise_metrics(output) == before
    assert stored.schema.names == metrics_schema().names


def test_rows_that_disagree_on_k_are_refused():
    gt = np.array([[0, 0, 1, 1]] * 4)
    two, three = image_metrics(gt, gt, None, 2, None), image_metrics(gt, gt, None, 3, None)
    with pytest.raises(ValueError, match="earlier rows"):
        aggregate([pa.Table.from_pylist([two], schema=metric_schema()), pa.Table.from_pylist([three], schema=metric_schema())])
    broken = {**two, "raw_confusion_cells": [0, 4]}  # cell 4 lies outside a 2x2 matrix
    with pytest.raises(ValueError, match="outside a 2x2"):
        aggregate(pa.Table.from_pylist([broken], schema=metric_schema()))
