"""Evaluation says what it did not score: an image without a label, or with a label of another
size, keeps its mask and gets one error row at stage `label` naming both files; the summary,
the terminal and report.html count scored, rejected and unpaired images and say what produced them.

A real evaluation on the session's Ray over four 48x64 pictures (seeded random FCN-8s).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from segflow.pipeline import job
from segflow.pipeline.config import LabelPairing, SegmentConfig
from segflow.pipeline.reader import read_errors, read_masks, read_metrics
from segflow.pipeline.verify import verify_output
from tests.collection import write_scenes


def _label(path, shape):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(shape[0] * shape[1]) % 11).reshape(shape).astype(np.uint8), mode="L").save(path)


def test_missing_and_wrong_size_labels_keep_the_mask_and_are_counted(ray_local, random_fcn, tmp_path):
    images = write_scenes(tmp_path / "in", 4)
    labels = tmp_path / "labels"
    _label(labels / "img_00.png", (48, 64))
    _label(labels / "img_01.png", (32, 32))  # another size
    _label(labels / "img_03.png", (48, 64))  # img_02 has none
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=random_fcn, shard_size=4,
                        progress=False, evaluation=LabelPairing(labels=str(labels)))
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    summary = job.summarise_stage(cfg, plan, job.run_stage(cfg, plan))
    evaluation = job.finish_evaluation(cfg, plan)

    assert sorted(read_masks(cfg.output, columns=["uri"]).column("uri").to_pylist()) == [str(p) for p in images]
    errors = {r["uri"]: r for r in read_errors(cfg.output).to_pylist()}
    assert set(errors) == {str(images[1]), str(images[2])} and {r["stage"] for r in errors.values()} == {"label"}
    wrong = errors[str(images[1])]["reason"]
    assert str(labels / "img_01.png") in wrong and str(images[1]) in wrong and "32x32" in wrong and "64x48" in wrong
    assert str(images[2]) in errors[str(images[2])]["reason"] and "no label file" in errors[str(images[2])]["reason"]
    assert sorted(read_metrics(cfg.output, columns=["uri"]).column("uri").to_pylist()) == [str(images[0]), str(images[3])]
    assert summary.masks == 4

    assert (evaluation["images_scored"], evaluation["images_rejected"], evaluation["images_unpaired"]) == (2, 1, 1)
    provenance = evaluation["provenance"]
    assert provenance["model"] == "fcn8s_resnet18" and provenance["model_fingerprint"] == plan.model_fingerprint
    assert provenance["images"] == cfg.input and provenance["labels"] == str(labels) and provenance["refinement"] == "dense"
    report = (tmp_path / "out" / "report.html").read_text()
    for text in ("2 images scored", "1 rejected (label refused)", "1 unpaired (no label)", plan.model_fingerprint,
                 str(labels), "iterations=", "32x32"):
        assert text in report, text

    assert verify_output(cfg.output, cfg.input) == []  # a mask with its `label` row is one result
    again = job.plan_stage(cfg, job.list_stage(cfg))
    assert again.to_process == 0  # and counts as done


def test_relabelled_ground_truth_is_rescored_from_the_stored_masks_without_the_model(ray_local, random_fcn, tmp_path):
    from segflow.pipeline.history import history_dataset

    images = write_scenes(tmp_path / "in", 3)
    labels = tmp_path / "labels"
    _label(labels / "img_00.png", (48, 64))
    _label(labels / "img_01.png", (48, 64))  # img_02 has none yet
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=random_fcn, shard_size=4,
                        progress=False, evaluation=LabelPairing(labels=str(labels)))
    job.run_segment(cfg)
    before = {r["uri"]: r for r in read_metrics(cfg.output).to_pylist()}
    masks = read_masks(cfg.output, columns=["uri", "mask", "job_fingerprint"]).to_pylist()
    assert set(before) == {str(images[0]), str(images[1])} and all(r["label_key"] for r in before.values())

    Image.fromarray(np.zeros((48, 64), np.uint8), mode="L").save(labels / "img_01.png")  # relabelled: all class 0
    _label(labels / "img_02.png", (48, 64))  # and a label for the unpaired one
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    assert plan.shards == [] and sum(len(r.uris) for r in plan.rescore) == 2
    assert "2 to rescore from their stored masks" in plan.describe()
    summary = job.summarise_stage(cfg, plan, job.run_stage(cfg, plan))
    assert summary.masks == 0  # no model ran

    after = {r["uri"]: r for r in read_metrics(cfg.output).to_pylist()}
    assert set(after) == {str(p) for p in images}
    assert after[str(images[0])] == before[str(images[0])]
    assert after[str(images[1])]["label_key"] != before[str(images[1])]["label_key"]
    matrix = ("raw_confusion_cells", "raw_confusion_counts")
    assert [after[str(images[1])][c] for c in matrix] != [before[str(images[1])][c] for c in matrix]
    assert len(read_errors(cfg.output)) == 0  # img_02's "no label" row is replaced by its score
    assert read_masks(cfg.output, columns=["uri", "mask", "job_fingerprint"]).to_pylist() == masks  # masks untouched
    assert history_dataset(cfg.output, "metrics").to_table(columns=["uri"]).column("uri").to_pylist() == [str(images[1])]
    assert history_dataset(cfg.output, "errors").to_table(columns=["uri"]).column("uri").to_pylist() == [str(images[2])]
    assert verify_output(cfg.output, cfg.input) == []
    assert job.plan_stage(cfg, job.list_stage(cfg)).describe() == "nothing to do: all 3 images are up to date"
