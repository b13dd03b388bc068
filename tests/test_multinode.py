"""A real two-node Ray cluster on this machine: model actors spread, every input accounted for.

Two `ray start` nodes (head and worker, one CPU each, token auth on) and drivers in
subprocesses, so the session's local Ray is not involved. The model is an FCN-8s with
seeded random weights: its masks are not segmentations, only placement is tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.pipeline.cluster import cpu_shares, size_cluster
from segflow.errors import ConfigError
from segflow.pipeline.reader import read_masks
from segflow.pipeline.verify import verify_output
from tests.collection import write_scenes
from tests.ray_cluster import RayCluster

REPO = Path(__file__).resolve().parents[1]

_DRIVER = """
import json, sys
import ray
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
cfg = SegmentConfig(input=sys.argv[1], output=sys.argv[2], ray_address=sys.argv[3], model_actors=2, shard_size=2,
                    progress=False, model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0))
summary = job.run_segment(cfg)
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
print(json.dumps({"masks": summary.masks, "errors": summary.errors, "shard_retries": summary.shard_retries, "nodes": nodes}))
"""


@pytest.fixture(scope="module")
def two_nodes():
    """Head and worker node, one CPU each; stopped (only its own processes) after the module."""
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        survivors = cluster.stop()
        assert not survivors, f"Ray processes of the test cluster survived: {survivors}"


def test_model_actors_spread_over_two_nodes_and_output_is_complete(two_nodes, tmp_path):
    write_scenes(tmp_path / "in", 8)
    driver = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(tmp_path / "in"), str(tmp_path / "out"), two_nodes.address],
        env=two_nodes.env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2
    assert (report["masks"], report["errors"]) == (8, 0)

    node_ids = read_masks(str(tmp_path / "out"), columns=["node_id"]).column("node_id").to_pylist()
    assert set(node_ids) == set(report["nodes"]), "shards did not run on both nodes"
    assert verify_output(str(tmp_path / "out"), str(tmp_path / "in")) == []


def test_a_job_from_a_user_folder_shadowing_segflows_folders_gives_every_image_a_mask(two_nodes, tmp_path):
    """The driver's working directory holds its own models/, pipeline/ and flows/ (raising
    ImportError on import); Ray puts that directory on both nodes' worker paths."""
    from tests.test_user_folder import make_user_project

    write_scenes(tmp_path / "in", 4)
    project = make_user_project(tmp_path / "project")
    driver = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(tmp_path / "in"), str(tmp_path / "out"), two_nodes.address],
        env=two_nodes.env, cwd=project, capture_output=True, text=True, timeout=240,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert (report["masks"], report["errors"]) == (4, 0)
    assert verify_output(str(tmp_path / "out"), str(tmp_path / "in")) == []


_CONNECT = """
import sys
from segflow.pipeline.cluster import connect
try:
    connect(sys.argv[1])
    print("connected")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


@pytest.mark.parametrize("token", ["wrong", "missing"])
def test_driver_without_the_cluster_token_gets_one_line_naming_the_fix(two_nodes, tmp_path, token):
    env = {k: v for k, v in two_nodes.env.items() if k != "RAY_AUTH_TOKEN"}
    if token == "wrong":
        env["RAY_AUTH_TOKEN"] = "0" * 64
        # Ray retries a refused connection about once a second, 20 times by default; this
        # operator knob (ray/_private/node.py) makes it 3, with the same failure at the end
        env["RAY_gcs_server_port_wait_time_s"] = "3"
    else:
        env["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    result = subprocess.run([sys.executable, "-c", _CONNECT, two_nodes.address], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"ConfigError: --ray-address {two_nodes.address}: "), line
    assert "RAY_AUTH_TOKEN" in line and "`ray get-auth-token`" in line


def _units(cpus: float) -> int:
    return round(cpus * 10_000)  # Ray accounts resources in fixed point, 1/10000 of a CPU


@pytest.mark.parametrize("node_cpus, actors", [([1, 1], 2), ([1], 1), ([1, 1, 1], 3), ([2], 2), ([1, 3], 4), ([2], 1), ([8, 8], 2)])
def test_cpu_shares_leave_room_for_a_crf_task_beside_every_model_actor(node_cpus, actors):
    cpus = sum(node_cpus)
    workers = max(1, cpus)  # plan_cluster's default on CPU
    model, crf = _units(cpu_shares(cpus, actors, workers)[0]), _units(cpu_shares(cpus, actors, workers)[1])
    assert actors * model + workers * crf <= _units(cpus)
    # Ray SPREADs the actors over the nodes; a CRF task must still fit beside them
    free = [_units(n) for n in node_cpus]
    for _ in range(actors):
        node = max(range(len(free)), key=free.__getitem__)
        assert free[node] >= model, "a model actor does not fit"
        free[node] -= model
    assert all(f >= crf for f in free), "a node cannot run a CRF task (with one CPU per node the job would hang)"


def test_a_gpu_cluster_gives_each_gpu_a_model_actor_and_every_other_cpu_to_the_crf():
    """On a GPU the network is ~100x faster and the CRF sets the pace: it gets all the CPUs the
    model actors do not hold, and the actors the GPU-side decode threads and autocast."""
    one = size_cluster("auto", None, None, cpus=16, gpus=1)
    assert (one.device, one.model_actors, one.model_num_gpus, one.crf_workers) == ("cuda", 1, 1.0, 15)
    assert one.model_num_cpus + one.crf_workers * one.crf_num_cpus <= 16
    eight = size_cluster("auto", None, None, cpus=128, gpus=8, nodes=2)
    assert (eight.model_actors, eight.crf_workers, eight.nodes) == (8, 120, 2)
    assert eight.decode_threads > 1  # decoding must keep a GPU fed too


def test_a_cpu_only_cluster_runs_one_refining_model_actor_per_core():
    plan = size_cluster("auto", None, None, cpus=2, gpus=0)
    assert (plan.device, plan.model_actors, plan.model_num_cpus, plan.model_threads, plan.crf_workers) == ("cpu", 2, 1.0, 1, 0)


def test_device_cpu_leaves_gpus_alone_and_device_cuda_needs_one():
    assert size_cluster("cpu", None, None, cpus=16, gpus=2).device == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: the Ray cluster has no GPUs"):
        size_cluster("cuda", None, None, cpus=16, gpus=0)
