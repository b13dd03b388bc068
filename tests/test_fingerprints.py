"""Fingerprints cover what changes a mask: autocast precision (when it is not the CPU default's).

Planning only: no Ray, no inference. tests/test_no_change.py checks that milestone 1's
fingerprints stay byte-identical on the CPU defaults.
"""

from __future__ import annotations

from segflow.pipeline import job
from segflow.pipeline.cluster import cluster_has_gpus
from segflow.pipeline.config import SegmentConfig
from tests.collection import write_scenes


def _plan(tmp_path, random_fcn, **kw) -> job.Plan:
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=random_fcn, progress=False, **kw)
    return job.plan_stage(cfg, job.list_stage(cfg))


def test_autocast_precision_is_in_the_fingerprint_unless_full_precision(random_fcn, tmp_path, monkeypatch):
    write_scenes(tmp_path / "in", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine as a CPU-only one, whatever it has
    default = _plan(tmp_path, random_fcn)
    assert default.precision == "off"
    assert _plan(tmp_path, random_fcn, autocast="off").job_fingerprint == default.job_fingerprint
    assert _plan(tmp_path, random_fcn, device="cpu").job_fingerprint == default.job_fingerprint

    bf16 = _plan(tmp_path, random_fcn, autocast="bf16")
    fp16 = _plan(tmp_path, random_fcn, autocast="fp16")
    assert (bf16.precision, fp16.precision) == ("bf16", "fp16")
    assert len({default.job_fingerprint, bf16.job_fingerprint, fp16.job_fingerprint}) == 3
    assert {s.shard_id for s in bf16.shards}.isdisjoint(s.shard_id for s in default.shards)

    # auto means bf16 on a GPU: planning for a cluster with GPUs takes that into the fingerprint
    on_gpu = _plan(tmp_path, random_fcn, device="cuda")
    assert on_gpu.precision == "bf16" and on_gpu.job_fingerprint == bf16.job_fingerprint
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert _plan(tmp_path, random_fcn).job_fingerprint == bf16.job_fingerprint


def test_cluster_has_gpus_counts_as_ray_does(monkeypatch):
    for visible, expected in (("", False), ("-1", False), ("0", True), ("1,2", True)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cluster_has_gpus(None) is expected, visible
