"""End to end on a real local Ray: every input accounted for, determinism, reruns, errors.

These runs use an FCN-8s with seeded random weights (the `random_fcn` fixture): they test
the engine's bookkeeping, and their masks are not real segmentations.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig
from segflow.pipeline.reader import load_mask, read_errors, read_masks
from tests.collection import BOMB_PIXEL_LIMIT, make_collection


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_collection(root)


def _config(input, output, model, **kw) -> SegmentConfig:
    return SegmentConfig(input=str(input), output=str(output), model=model, shard_size=4, max_pixels=BOMB_PIXEL_LIMIT, progress=False, **kw)


def test_every_input_accounted_for_with_random_weight_fcn(ray_local, random_fcn, collection, tmp_path):
    root, expected = collection
    summary = job.run_segment(_config(root, tmp_path / "out", random_fcn))

    masks = read_masks(str(tmp_path / "out"), columns=["uri", "height", "width", "mask", "raw_mask", "pixel_counts"]).to_pylist()
    errors = read_errors(str(tmp_path / "out")).to_pylist()
    mask_uris = {r["uri"] for r in masks}
    error_uris = {r["uri"] for r in errors}
    assert mask_uris.isdisjoint(error_uris)
    assert mask_uris == {str(p) for p in expected["good"]}
    assert error_uris == {str(p) for p in expected["bad"]}
    assert (summary.masks, summary.errors) == (len(expected["good"]), len(expected["bad"]))
    for row in masks:
        assert (row["height"], row["width"]) == expected["good"][next(p for p in expected["good"] if str(p) == row["uri"])]
        assert sum(row["pixel_counts"]) == row["height"] * row["width"]
        assert row["raw_mask"] is not None  # the CRF ran, so the raw mask is kept beside it
    reasons = {r["uri"].rsplit("/", 1)[-1]: r["reason"] for r in errors}
    assert "empty file" in reasons["x_empty.png"]
    assert "truncated" in reasons["x_truncated.jpg"]
    assert "not an image" in reasons["x_not_an_image.png"]
    assert "exceeds the limit" in reasons["x_bomb.png"]


def test_unreadable_listed_path_becomes_error_row(ray_local, random_fcn, collection, tmp_path):
    root, expected = collection
    listing = tmp_path / "list.txt"
    good = sorted(str(p) for p in expected["good"])[:2]
    listing.write_text("\n".join([*good, str(root / "missing" / "gone.png")]) + "\n")
    summary = job.run_segment(_config(listing, tmp_path / "out", random_fcn))
    errors = read_errors(str(tmp_path / "out")).to_pylist()
    assert summary.masks == 2 and [e["stage"] for e in errors] == ["read"]
    assert "gone.png" in errors[0]["uri"]


def test_shard_ids_are_deterministic(random_fcn, collection, tmp_path):
    root, _ = collection
    cfg = _config(root, tmp_path / "out", random_fcn)
    first = [s.shard_id for s in job.plan_stage(cfg, job.list_stage(cfg)).shards]
    again = [s.shard_id for s in job.plan_stage(cfg, job.list_stage(cfg)).shards]
    assert first == again and len(first) == len(set(first)) == 4
    other_crf = cfg.with_(crf_params=(('iterations', 3),))
    changed = [s.shard_id for s in job.plan_stage(other_crf, job.list_stage(other_crf)).shards]
    assert set(changed).isdisjoint(first)


def test_rerun_adds_no_duplicate_rows(ray_local, random_fcn, collection, tmp_path):
    root, expected = collection
    cfg = _config(root, tmp_path / "out", random_fcn)
    job.run_segment(cfg)
    files_before = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    idle = job.run_segment(cfg)
    assert idle.masks == idle.errors == 0 and idle.up_to_date == len(expected["good"]) + len(expected["bad"])
    job.run_segment(cfg.with_(force=True))
    masks = ds.dataset(str(tmp_path / "out" / "masks")).to_table(columns=["uri"]).column("uri").to_pylist()
    errors = ds.dataset(str(tmp_path / "out" / "errors")).to_table(columns=["uri"]).column("uri").to_pylist()
    assert len(masks) == len(set(masks)) == len(expected["good"])
    assert len(errors) == len(set(errors)) == len(expected["bad"])
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == files_before


def test_reader_returns_masks_as_arrays(ray_local, random_fcn, collection, tmp_path):
    root, expected = collection
    job.run_segment(_config(root, tmp_path / "out", random_fcn, refinement="none"))
    uri = str(root / "c_odd.webp")
    mask = load_mask(str(tmp_path / "out"), uri)
    assert mask.shape == (37, 53) and mask.dtype == np.uint8 and mask.max() < 11
    assert read_masks(str(tmp_path / "out"), columns=["raw_mask"]).column("raw_mask").null_count == len(expected["good"])


def test_missing_input_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


def test_bad_flag_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path), str(tmp_path / "out"), "--shard-size", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--shard-size" in result.stderr


def test_config_file_values_become_option_defaults(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("shard_size = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path), str(tmp_path / "out"), "--config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--shard-size: Input should be greater than or equal to 1, got 0" in result.stderr


def test_offline_torchvision_weights_fail_in_one_line_before_any_work(tmp_path):
    env = {**__import__("os").environ, "TORCH_HOME": str(tmp_path / "hub"), "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", "samples/street", str(tmp_path / "out"), "--model", "lraspp_mobilenet_v3_large", "--weights", "DEFAULT"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--weights none" in result.stderr
    assert not (tmp_path / "out").exists()
