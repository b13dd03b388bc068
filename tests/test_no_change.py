"""Refactors change no result: milestone 1's bundled model still gives milestone 1's masks and fingerprints.

tests/fixtures/milestone1_masks.json was written by segflow at ac3ba4b (before the
refinement registry, the configuration model and the package moves) from
`segflow segment` on samples/street and on the first 20 CamVid val images. Every mask,
raw mask and fingerprint must come out byte-identical, and an OUTPUT written then must
still be up to date. The model is milestone 1's bundled checkpoint, found by its sha256
among the bundled files: once a retrained default shipped, it stayed bundled beside it
(outputs made with it can still be reprocessed), and a checkpoint's fingerprint is its content's, not
its path's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow.models.catalog import bundled_checkpoint_with_sha256
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.listing import list_inputs
from segflow.pipeline.reader import read_masks

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "street"
EXPECTED = json.loads((FIXTURES / "milestone1_masks.json").read_text())["outputs"]
MILESTONE1_SHA256 = "b780e20ccf6c7cf52806d451b868c4e8fd8860f803cc34909a1af84a46160254"
assert bundled_checkpoint_with_sha256(MILESTONE1_SHA256) is not None, "milestone 1's bundled model is missing"
MILESTONE1_MODEL = ModelRef(checkpoint=str(bundled_checkpoint_with_sha256(MILESTONE1_SHA256)))


def _results(output: Path) -> dict:
    rows = read_masks(str(output)).to_pylist()
    return {
        Path(r["uri"]).name: {
            "mask_sha256": hashlib.sha256(r["mask"]).hexdigest(),
            "raw_mask_sha256": hashlib.sha256(r["raw_mask"]).hexdigest() if r["raw_mask"] else None,
            "pixel_counts": r["pixel_counts"],
            "job_fingerprint": r["job_fingerprint"],
            "model_fingerprint": r["model_fingerprint"],
            "crf_fingerprint": r["crf_fingerprint"],
        }
        for r in rows
    }


def _segment(input: str, output: Path) -> None:
    summary = job.run_segment(SegmentConfig(input=input, output=str(output), model=MILESTONE1_MODEL, device="cpu", progress=False))
    assert summary.errors == 0


def test_bundled_model_masks_and_fingerprints_on_samples_are_milestone_1s(ray_local, tmp_path):
    _segment(str(SAMPLES), tmp_path / "out")
    assert _results(tmp_path / "out") == EXPECTED["street"]


def test_bundled_model_masks_and_fingerprints_on_camvid_val_are_milestone_1s(ray_local, camvid, tmp_path):
    listing = tmp_path / "val20.txt"
    listing.write_text("\n".join(str(camvid / "val" / name) for name in sorted(EXPECTED["camvid_val20"])) + "\n")
    _segment(str(listing), tmp_path / "out")
    assert _results(tmp_path / "out") == EXPECTED["camvid_val20"]


def test_an_output_written_by_milestone_1_has_nothing_to_do(tmp_path):
    """The stored OUTPUT is milestone 1's files, with uri and key moved to this checkout's samples.

    Only where the samples live and their mtimes differ from the machine that wrote it;
    every other column and the schema metadata (label set, fingerprints, CRF) are as written.
    """
    output = tmp_path / "old"
    shutil.copytree(FIXTURES / "milestone1_street_output", output)
    current = {Path(u).name: (u, k) for u, k in zip(*list_inputs(str(SAMPLES)).select(["uri", "key"]).to_pydict().values())}
    for path in (output / "masks").glob("*.parquet"):
        table = pq.read_table(path)
        names = [Path(u).name for u in table.column("uri").to_pylist()]
        for column, i in (("uri", 0), ("key", 1)):
            index = table.schema.get_field_index(column)
            table = table.set_column(index, table.schema.field(column), pa.array([current[n][i] for n in names], pa.string()))
        pq.write_table(table, path)
    cfg = SegmentConfig(input=str(SAMPLES), output=str(output), model=MILESTONE1_MODEL, device="cpu", progress=False)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    assert plan.images_total == 4
    assert plan.up_to_date == 4 and not plan.shards, plan.describe()
