"""What the CLI and README promise: a resumed run re-cuts the same shards; `segflow reprocess` exists.

Planning only (no Ray): shards are committed the way the engine commits them, from rows
made up for the purpose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow.pipeline import job
from segflow.pipeline.commit import commit_shard
from segflow.pipeline.config import SegmentConfig
from tests.collection import write_scenes

REPO = Path(__file__).resolve().parents[1]


def test_resume_at_the_default_shard_size_recuts_exactly_the_uncommitted_shards(random_fcn, tmp_path):
    n = 500
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({
        "uri": [f"/data/street/img_{i:05d}.png" for i in range(n)],
        "size": pa.array([40_000 + i for i in range(n)], pa.int64()),
        "mtime": pa.array([1_700_000_000_000_000_000 + i for i in range(n)], pa.int64()),
    }), manifest)
    cfg = SegmentConfig(input=str(manifest), output=str(tmp_path / "out"), model=random_fcn, progress=False)
    assert cfg.shard_size == 64  # the default, which ramps 4, 8, 16, 32, 64, ..., 32, 16, 8, 4
    first = job.plan_stage(cfg, job.list_stage(cfg))
    assert len({len(s) for s in first.shards}) > 2, "the ramp is what this test is about"

    # the killed run committed every other shard, in the order the engine happened to finish them
    fingerprints = {"job_fingerprint": first.job_fingerprint, "model_fingerprint": first.model_fingerprint,
                    "crf_fingerprint": first.refinement.fingerprint()}
    for shard in first.shards[1::2]:
        rows = [{"uri": u, "key": k, "shard_id": shard.shard_id, "height": 48, "width": 64, **fingerprints}
                for u, k in zip(shard.uris, shard.keys)]
        commit_shard(cfg.output, shard.shard_id, rows, [], None, fingerprints)

    resumed = job.plan_stage(cfg, job.list_stage(cfg))
    assert [(s.shard_id, s.uris) for s in resumed.shards] == [(s.shard_id, s.uris) for s in first.shards[0::2]]


def test_segflow_reprocess_is_a_command_and_dry_run_writes_nothing(tmp_path):
    write_scenes(tmp_path / "in", 3)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "reprocess", str(tmp_path / "in"), str(out), "--dry-run",
         "--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "3 of 3 images to process in 1 shards (dry run: nothing written)" in done.stdout
    assert not out.exists()


def test_a_command_that_cannot_be_imported_is_an_error_not_a_missing_command(monkeypatch):
    from segflow.flows import cli

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "no_such_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()
