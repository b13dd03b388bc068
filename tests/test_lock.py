"""One writer per OUTPUT, held by the engine: through the engine API, the CLI, and on S3.

Two real runs started at once into one OUTPUT: the second waits for the first and then
finds nothing to do (it planned after the first had committed everything), and OUTPUT
ends with one row per image. On S3 (a real moto server) the lease object is created with a
conditional PUT, so a second holder waits, and an expired lease is taken over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segflow.pipeline.lock import LEASE_NAME, OutputBusyError, output_lock
from segflow.pipeline.verify import verify_output
from tests.cli import RANDOM_FCN_FLAGS
from tests.collection import write_scenes
from tests.prefect_home import fresh_prefect_home
from tests.ray_cluster import RayCluster

REPO = Path(__file__).resolve().parents[1]

_ENGINE_DRIVER = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
cfg = SegmentConfig(input=sys.argv[1], output=sys.argv[2], shard_size=2, progress=False, ray_address=sys.argv[3],
                    model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0))
summary = job.run_segment(cfg, on_plan=lambda plan: print("plan:", plan.describe(), flush=True))
print("masks:", summary.masks, flush=True)
"""


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _two_runs_at_once(start, tmp_path: Path) -> tuple[str, str]:
    """Start run one; once it holds the lock (its plan printed), start run two; -> both outputs."""
    first = start(tmp_path / "first.log")
    _wait_for(lambda: "plan:" in (tmp_path / "first.log").read_text() or first.poll() is not None, "the first run's plan")
    second = start(tmp_path / "second.log")
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    return (tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text()


def test_two_engine_runs_into_one_output_take_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGFLOW_LOCK_DIR", str(tmp_path / "locks"))
    write_scenes(tmp_path / "in", 6)
    cluster = RayCluster()
    env = cluster.env | {"SEGFLOW_LOCK_DIR": str(tmp_path / "locks")}

    def start(log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _ENGINE_DRIVER, str(tmp_path / "in"), str(tmp_path / "out"), cluster.address],
                                env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    try:
        cluster.start_head(num_cpus=2)
        first, second = _two_runs_at_once(start, tmp_path)
    finally:
        cluster.stop()
    assert "plan: 6 of 6 images to process" in first and "masks: 6" in first
    assert "another segflow run" in second and "waiting for it to end" in second
    assert "plan: nothing to do: all 6 images are up to date" in second and "masks: 0" in second
    assert verify_output(str(tmp_path / "out"), str(tmp_path / "in")) == []


def test_two_cli_runs_into_one_output_take_turns(tmp_path):
    write_scenes(tmp_path / "in", 12)
    cluster = RayCluster()
    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_URL"} | {"SEGFLOW_LOCK_DIR": str(tmp_path / "locks")}

    def start(log: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path / "in"), str(tmp_path / "out"),
                   "--shard-size", "2", "--ray-address", cluster.address, *RANDOM_FCN_FLAGS,
                   "--crf-iterations", "4000"]  # 48x64 images: ~2 s each, so the first run still holds the lock while the second starts (~10 s)
        home = {"PREFECT_HOME": str(fresh_prefect_home(tmp_path / f"prefect-{log.stem}"))}
        return subprocess.Popen(command, env=env | home, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    try:
        cluster.start_head(num_cpus=2)
        # the CLI prints its plan before running shards, under the lock
        first, second = _two_runs_at_once(start, tmp_path)
    finally:
        cluster.stop()
    assert "12 of 12 images to process" in first
    assert "waiting for it to end" in second and "nothing to do: all 12 images are up to date" in second
    assert verify_output(str(tmp_path / "out"), str(tmp_path / "in")) == []


def test_s3_lease_is_created_conditionally_waited_for_and_taken_over_when_expired(s3_bucket):
    from tests.s3_fixtures import make_s3fs

    out = f"s3://{s3_bucket.name}/runs/a"
    fs = make_s3fs(s3_bucket.storage_options)
    with output_lock(out, s3_bucket.storage_options) as where:
        assert where == f"{out}/{LEASE_NAME}"
        lease = json.loads(fs.cat_file(f"{s3_bucket.name}/runs/a/{LEASE_NAME}"))
        assert lease["holder"].endswith(f"pid {os.getpid()}") and lease["expires"] > time.time()
        with pytest.raises(OutputBusyError, match=r"another segflow run \(.* pid \d+, lease until .*\) is writing this output"):
            with output_lock(out, s3_bucket.storage_options, timeout_seconds=1):
                pass
        with output_lock(f"s3://{s3_bucket.name}/runs/b", s3_bucket.storage_options, timeout_seconds=1):  # other outputs are free
            pass
    assert not fs.exists(f"{s3_bucket.name}/runs/a/{LEASE_NAME}")  # released

    # a holder killed without releasing: its lease blocks until it expires, then is taken over
    stale = {"token": "dead", "holder": "elsewhere pid 1", "expires": time.time() - 1}
    fs.pipe_file(f"{s3_bucket.name}/runs/a/{LEASE_NAME}", json.dumps(stale).encode())
    with output_lock(out, s3_bucket.storage_options, timeout_seconds=5):
        assert json.loads(fs.cat_file(f"{s3_bucket.name}/runs/a/{LEASE_NAME}"))["token"] != "dead"


def test_s3_lease_of_a_killed_run_on_this_machine_is_taken_over_at_once(s3_bucket):
    from tests.s3_fixtures import make_s3fs

    fs = make_s3fs(s3_bucket.storage_options)
    holder = subprocess.Popen([sys.executable, "-c", "pass"])
    holder.wait()  # a pid that existed on this machine and is gone
    import socket
    lease = {"token": "killed", "holder": "x", "host": socket.gethostname(), "pid": holder.pid, "expires": time.time() + 300}
    fs.pipe_file(f"{s3_bucket.name}/runs/k/{LEASE_NAME}", json.dumps(lease).encode())
    started = time.monotonic()
    with output_lock(f"s3://{s3_bucket.name}/runs/k", s3_bucket.storage_options, timeout_seconds=5):
        assert time.monotonic() - started < 5
