"""segment and evaluate with inputs, outputs and checkpoints on a real S3 server, end to end.

The server is moto's, in a subprocess on loopback (tests/s3_fixtures.py); the engine runs
on the session's real local Ray, whose worker processes started before a test put its
AWS settings in the environment: exactly the case of a driver joining a running cluster.
Outage tests put the fault-injecting proxy between every client and the server and
switch it at the first shard commit, so the faults land mid-run.

The model is an FCN with seeded random weights: these tests check where bytes go and that
every input is accounted for, and the masks are not segmentations.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segflow.pipeline import commit as commit_module
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.errors import StorageError
from segflow.pipeline.reader import output_metadata, read_errors, read_masks, read_metrics
from segflow.pipeline.storage import read_bytes
from segflow.pipeline.verify import verify_output
from tests.prefect_home import fresh_prefect_home
from tests.s3_fixtures import FAKE_KEY

SEGFLOW = Path(sys.executable).with_name("segflow")  # the installed console script
SECRET = "SEGFLOW-TEST-SECRET-xyz"
GOOD = ("a_street.png", "b_street.jpg", "nested/c_street.png")
BROKEN = "x_not_an_image.png"
VOID = 11


# --- inputs ----------------------------------------------------------------------------------


def _street(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """(H, W, 3) uint8: a sky gradient over a grey road with one coloured block."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = np.linspace(180, 240, h // 2, dtype=np.uint8)[:, None, None]
    img[h // 2 :] = (90, 90, 95)
    y, x = rng.integers(0, h // 2), rng.integers(0, w - 12)
    img[y : y + h // 4, x : x + 12] = rng.integers(0, 255, 3)
    return img


def _encoded(array: np.ndarray, name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def _collection(count: int = len(GOOD)) -> dict[str, bytes]:
    """{relative name: bytes}: `count` good 48x64 images and one file that is not an image."""
    names = [*GOOD, *(f"more/d{i}_street.png" for i in range(count - len(GOOD)))][:count]
    files = {name: _encoded(_street(seed), name) for seed, name in enumerate(names)}
    files[BROKEN] = b"this is a text file with an image extension\n"
    return files


def _put(fs, prefix: str, files: dict[str, bytes]) -> None:
    """Write `files` under `prefix`, through `fs` (an s3fs filesystem) or onto local disk."""
    for name, data in files.items():
        if fs is None:
            Path(prefix, name).parent.mkdir(parents=True, exist_ok=True)
            Path(prefix, name).write_bytes(data)
        else:
            fs.pipe_file(f"{prefix}/{name}", data)


def _labels(files: dict[str, bytes]) -> dict[str, bytes]:
    """A class-index PNG (0..10, and 11 = void) for every image name, paired by stem."""
    rng = np.random.default_rng(7)
    return {
        name.rsplit(".", 1)[0] + ".png": _encoded(rng.integers(0, VOID + 1, (48, 64)).astype(np.uint8), "x.png")
        for name in files
    }


def _config(input: str, output: str, model: ModelRef, storage_options: dict, **kw) -> SegmentConfig:
    return SegmentConfig(input=input, output=output, model=model, progress=False, storage_options=storage_options,
                         **{"shard_size": 2, **kw})


def _assert_accounted_for(input: str, output: str, files: dict, storage_options: dict) -> None:
    """Every good input has one mask, the broken one one error row, and verify finds nothing."""
    assert verify_output(output, input, storage_options=storage_options, deep=True) == []
    base = input.rstrip("/")
    masks = read_masks(output, columns=["uri", "height", "width"], storage_options=storage_options).to_pylist()
    errors = read_errors(output, columns=["uri", "stage"], storage_options=storage_options).to_pylist()
    assert sorted(r["uri"] for r in masks) == sorted(f"{base}/{n}" for n in files if n != BROKEN)
    assert all((r["height"], r["width"]) == (48, 64) for r in masks)
    assert errors == [{"uri": f"{base}/{BROKEN}", "stage": "decode"}]


# --- segment and evaluate across stores -----------------------------------------------------------


def test_segment_from_s3_into_s3_accounts_for_every_input(ray_local, random_fcn, s3_bucket):
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)
    images, out = f"{s3_bucket.url}/images/", f"{s3_bucket.url}/out"

    summary = job.run_segment(_config(images, out, random_fcn, s3_bucket.storage_options))

    assert (summary.masks, summary.errors, summary.images_total) == (len(GOOD), 1, len(files))
    _assert_accounted_for(images, out, files, s3_bucket.storage_options)
    names = s3_bucket.fs().find(f"{s3_bucket.name}/out")
    assert names and all(n.rsplit("/", 1)[-1].startswith("shard-") for n in names)  # no staging debris


def test_segment_from_local_disk_into_s3(ray_local, random_fcn, s3_bucket, tmp_path):
    files = _collection()
    _put(None, str(tmp_path / "images"), files)
    out = f"{s3_bucket.url}/out"

    job.run_segment(_config(str(tmp_path / "images"), out, random_fcn, s3_bucket.storage_options))

    _assert_accounted_for(str(tmp_path / "images"), out, files, s3_bucket.storage_options)


def test_segment_from_s3_onto_local_disk(ray_local, random_fcn, s3_bucket, tmp_path):
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)

    job.run_segment(_config(f"{s3_bucket.url}/images", str(tmp_path / "out"), random_fcn, s3_bucket.storage_options))

    _assert_accounted_for(f"{s3_bucket.url}/images", str(tmp_path / "out"), files, s3_bucket.storage_options)


def test_credentials_only_in_the_drivers_environment_reach_running_ray_workers(ray_local, random_fcn, s3_bucket):
    # No storage_options: the endpoint and keys exist only as AWS_* variables that the
    # fixture set after this session's Ray (and so its raylet, which spawns the workers)
    # had started. (Workers reused from an earlier run of this session may hold them
    # already; the CLI tests below run fresh jobs, whose workers never do.)
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)

    summary = job.run_segment(_config(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", random_fcn, {}))

    reasons = read_errors(f"{s3_bucket.url}/out", columns=["uri", "reason"]).to_pylist()
    assert (summary.masks, summary.errors) == (len(GOOD), 1), reasons
    _assert_accounted_for(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", files, {})


def test_reader_verify_and_plan_see_shards_that_another_process_committed(s3_bucket, tmp_path):
    """fsspec keeps one filesystem, with its cached listings, per process and options."""
    from segflow.pipeline.state import read_existing

    names = ("a.png", "b.png", "c.png", "d.png")
    images = tmp_path / "images"  # local: listing the inputs does not refresh OUTPUT's filesystem
    _put(None, str(images), {name: _encoded(_street(0), name) for name in names})
    out, options = f"{s3_bucket.url}/out", s3_bucket.storage_options
    elsewhere = {**options, "skip_instance_cache": True}  # what another process's writer is

    def commit(name: str, storage_options: dict) -> None:
        shard_id = f"{ord(name[0]):016x}"
        row = {"uri": str(images / name), "key": "1-1", "shard_id": shard_id, "stage": "decode", "reason": "test row",
               "attempts": 1, "job_fingerprint": "f", "model_fingerprint": "m", "crf_fingerprint": "none"}
        commit_module.commit_shard(out, shard_id, [], [row], None, {"job_fingerprint": "f"}, storage_options)

    commit("a.png", options)
    assert len(verify_output(out, str(images), storage_options=options)) == 3  # this process lists OUTPUT

    # Each reader right after another writer's commit, with this process's listings cached.
    commit("b.png", elsewhere)
    assert len(read_existing(out, options).committed_shards) == 2
    commit("c.png", elsewhere)
    assert len(read_errors(out, storage_options=options)) == 3
    commit("d.png", elsewhere)
    assert verify_output(out, str(images), storage_options=options) == []


# --- through the CLI: an S3 checkpoint, a kill mid-run, and no secret anywhere --------------------


def _small_checkpoint(url: str, storage_options: dict) -> str:
    """An FCN-8s (MobileNetV3 backbone, random weights) with a 3-class label set; -> its sha256."""
    import torch

    from segflow.models.checkpoint import save_checkpoint
    from segflow.models.labels import LabelSet
    from segflow.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_network

    architecture = {"family": "fcn", "variant": "fcn8s", "backbone": "mobilenet_v3_large"}
    labels = LabelSet("street3", ("road", "sky", "car"), ((128, 64, 128), (70, 130, 180), (0, 0, 142)))
    torch.manual_seed(0)
    net = build_network(architecture, labels.num_classes)
    meta = {
        "architecture": architecture,
        "labels": labels.to_dict(),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "training": {"data": "none: seeded random weights for tests", "command": "tests/test_s3_end_to_end.py"},
        "metrics": {},
    }
    return save_checkpoint(url, net.state_dict(), meta, storage_options=storage_options, float_dtype=torch.float16)


def _cli(*args: str, prefect_home: Path, env: dict | None = None) -> subprocess.Popen:
    """`segflow ARGS` in its own process group, with the test's environment plus `env`.

    The CLI runs its job as a Prefect flow on a temporary API server, whose database (flow
    run parameters, logs, artifacts) lands in `prefect_home`.
    """
    env = {**os.environ, "PREFECT_HOME": str(fresh_prefect_home(prefect_home)), **(env or {})}
    return subprocess.Popen([str(SEGFLOW), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ray_address(ray) -> str:
    """The running session cluster, for a CLI driver to join (its workers predate the test's env)."""
    return ray.get_runtime_context().gcs_address


def test_killed_cli_run_leaves_only_complete_shards_and_a_rerun_with_an_s3_checkpoint_completes(ray_local, s3_bucket,
                                                                                              tmp_path):
    files = _collection(count=6)
    fs = s3_bucket.fs()
    _put(fs, f"{s3_bucket.name}/images", files)
    sha = _small_checkpoint(f"{s3_bucket.url}/model.safetensors", s3_bucket.storage_options)
    images, out = f"{s3_bucket.url}/images", f"{s3_bucket.url}/out"
    # Credentials and endpoint through the environment only (the fixture's AWS_* variables).
    args = ("segment", images, out, "--checkpoint", f"{s3_bucket.url}/model.safetensors", "--shard-size", "1",
            "--max-shards-in-flight", "1", "--ray-address", _ray_address(ray_local), "--no-progress")

    first = _cli(*args, prefect_home=tmp_path / "prefect")
    deadline = time.monotonic() + 180
    while first.poll() is None and time.monotonic() < deadline:
        fs.invalidate_cache()
        if fs.exists(f"{s3_bucket.name}/out/masks") and fs.ls(f"{s3_bucket.name}/out/masks"):
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the CLI and anything it started, at once
    _, stderr = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-3000:]}"

    # What the kill left: only complete Parquet files under their final names.
    fs.invalidate_cache()
    left = fs.find(f"{s3_bucket.name}/out")
    assert left, f"nothing was committed before the kill:\n{stderr[-3000:]}"
    for name in left:
        if name.endswith("/_segflow.lock"):  # the killed run's output lease (pipeline/lock.py): the rerun takes it over
            continue
        pq.read_metadata(io.BytesIO(fs.cat_file(name)))  # raises on a truncated file
    problems = verify_output(out, images)
    assert problems and not [p for p in problems if "no row in masks or errors" not in p
                             and "interrupted commit" not in p], problems

    second = _cli(*args, prefect_home=tmp_path / "prefect")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    # This process listed OUTPUT before the rerun, another process, wrote to it: it must
    # see what is there now, in verify, the reader and the next plan alike.
    _assert_accounted_for(images, out, files, {})
    cfg = SegmentConfig(images, out, model=ModelRef(checkpoint=f"{s3_bucket.url}/model.safetensors"), shard_size=1)
    assert job.plan_stage(cfg, job.list_stage(cfg)).up_to_date == len(files)
    meta = output_metadata(out)
    assert meta["model_fingerprint"] == sha[:16]  # the S3 checkpoint ran, nothing else
    assert meta["labels"]["classes"] == ["road", "sky", "car"]
    kept = re.search(r"(\d+) up to date", stdout)
    assert kept and int(kept.group(1)) >= 1, stdout  # the rerun kept what the killed run had committed


def test_cli_evaluate_on_s3_never_reveals_the_secret(ray_local, s3_bucket, tmp_path):
    files = _collection()
    fs = s3_bucket.fs()
    _put(fs, f"{s3_bucket.name}/images", files)
    _put(fs, f"{s3_bucket.name}/labels", _labels(files))
    out = f"{s3_bucket.url}/eval"
    # The secret is in the environment and in the storage options of a --config file: not on
    # the command line, which `ps` shows and Ray records as the job's entrypoint (docs/storage.md).
    options = {"endpoint_url": s3_bucket.endpoint_url, "key": FAKE_KEY, "secret": SECRET}
    (tmp_path / "segflow.json").write_text(json.dumps({"storage_options": options}))
    logs_before = _ray_log_sizes(ray_local)

    run = _cli("evaluate", f"{s3_bucket.url}/images", f"{s3_bucket.url}/labels", out, "--config", str(tmp_path / "segflow.json"),
               "--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11", "--ignore-index", str(VOID),
               "--shard-size", "2", "--ray-address", _ray_address(ray_local), "--no-progress",
               prefect_home=tmp_path / "prefect", env={"AWS_SECRET_ACCESS_KEY": SECRET})
    stdout, stderr = run.communicate(timeout=300)

    assert run.returncode == 0, stderr[-3000:]
    assert "mIoU raw" in stdout
    assert SECRET not in stdout and SECRET not in stderr
    assert len(read_metrics(out, columns=["uri"], storage_options=options)) == len(GOOD)
    written = fs.find(f"{s3_bucket.name}/eval")
    assert {n.rsplit("/", 1)[-1] for n in written} >= {"summary.json", "report.html"}
    for name in written:
        data = fs.cat_file(name)
        assert SECRET.encode() not in data, name
        if name.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            assert SECRET not in repr(table.schema.metadata), name
            assert SECRET not in repr(table.to_pylist()), name  # every row, every column
    assert json.loads(fs.cat_file(f"{s3_bucket.name}/eval/summary.json"))["images_scored"] == len(GOOD)
    # Prefect's database (flow run parameters, task runs, logs, artifacts), Ray's logs and job table.
    prefect_files = [p for p in (tmp_path / "prefect").rglob("*") if p.is_file()]
    assert any(out.encode() in p.read_bytes() for p in prefect_files)  # it does hold this run
    assert [p for p in prefect_files if SECRET.encode() in p.read_bytes()] == []
    assert [p for p in _ray_log_sizes(ray_local) if SECRET.encode() in _tail(p, logs_before.get(p, 0))] == []
    from ray._private.state import jobs  # `ray list jobs` needs the dashboard, which the session Ray lacks

    assert any("segflow evaluate" in str(entry.get("Entrypoint")) for entry in jobs())
    assert SECRET not in repr(jobs())


def test_cli_error_for_a_missing_bucket_names_it_in_one_line_without_the_secret(s3_bucket, tmp_path):
    options = {"endpoint_url": s3_bucket.endpoint_url, "key": FAKE_KEY, "secret": SECRET}
    run = _cli("segment", "s3://segflow-no-such-bucket/images", f"{s3_bucket.url}/out",
               "--storage-options", json.dumps(options), prefect_home=tmp_path / "prefect",
               env={"AWS_SECRET_ACCESS_KEY": SECRET})
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 2
    # Prefect logs the failed flow above it; the CLI's own verdict is one line.
    verdicts = [line for line in stderr.splitlines() if line.startswith("segflow segment: error: ")]
    assert len(verdicts) == 1 and "s3://segflow-no-such-bucket/images: does not exist" in verdicts[0], stderr[-3000:]
    assert SECRET not in stdout + stderr
    assert [p for p in (tmp_path / "prefect").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] == []


def _ray_log_sizes(ray) -> dict[Path, int]:
    """Size of every file under this Ray session's logs/ (what a run appends to is read later)."""
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_session_dir_path()) / "logs"
    return {p: p.stat().st_size for p in logs.rglob("*") if p.is_file()}


def _tail(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


@pytest.mark.parametrize("line", [
    'storage_options = {endpoint_url = "http://127.0.0.1:9000", config_kwargs = {connect_timeout = 5}}',
    """storage_options = '{"endpoint_url": "http://127.0.0.1:9000", "config_kwargs": {"connect_timeout": 5}}'""",
])
def test_storage_options_come_from_a_config_file_as_a_table_or_a_json_string(tmp_path, line):
    import argparse

    from segflow.flows.commands.options import add_engine_args, apply_config_file, config_from_args

    (tmp_path / "segflow.toml").write_text(line + "\n")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    apply_config_file(parser, str(tmp_path / "segflow.toml"))
    cfg = config_from_args(parser.parse_args([]), "s3://b/images", "s3://b/out")
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "config_kwargs": {"connect_timeout": 5}}


# --- transient errors mid-run ---------------------------------------------------------------------


@pytest.fixture
def at_first_commit(monkeypatch):
    """`at_first_commit(action)`: run `action()` right after the run's first shard commit."""
    actions: list = []
    commit_shard = commit_module.commit_shard

    def commit_then_act(*args, **kw):
        commit_shard(*args, **kw)
        while actions:
            actions.pop(0)()

    monkeypatch.setattr("segflow.pipeline.engine.commit_shard", commit_then_act)
    return actions.append


def _one_shard_at_a_time(input: str, output: str, model: ModelRef, storage_options: dict, **kw) -> SegmentConfig:
    return _config(input, output, model, storage_options, shard_size=1, max_shards_in_flight=1, **kw)


def test_a_burst_of_503s_mid_run_is_retried_and_loses_nothing(ray_local, random_fcn, s3_bucket, s3_faults,
                                                               at_first_commit):
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)
    options = s3_faults.storage_options()  # through the proxy, botocore's own retries off
    at_first_commit(lambda: s3_faults.fail_next(4))  # fewer than with_retries' 5 attempts of one call

    started = time.monotonic()
    summary = job.run_segment(_one_shard_at_a_time(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", random_fcn, options))

    assert s3_faults.failed == 4
    assert (summary.masks, summary.errors, summary.shard_retries) == (len(GOOD), 1, 0)
    _assert_accounted_for(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", files, s3_bucket.storage_options)
    assert time.monotonic() - started < 60


def test_an_outage_shorter_than_the_retries_mid_run_is_ridden_out(ray_local, random_fcn, s3_bucket, s3_faults,
                                                                  at_first_commit):
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)
    options = s3_faults.storage_options()
    back = threading.Timer(0.7, s3_faults.start)  # the retries of one call wait >= 1.5 s in all
    at_first_commit(lambda: (s3_faults.stop(), back.start()))

    try:
        summary = job.run_segment(_one_shard_at_a_time(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", random_fcn, options))
    finally:
        if back.ident is not None:
            back.join()

    assert (summary.masks, summary.errors) == (len(GOOD), 1)
    _assert_accounted_for(f"{s3_bucket.url}/images", f"{s3_bucket.url}/out", files, s3_bucket.storage_options)


def test_an_endpoint_down_for_good_fails_the_job_in_one_line_and_records_no_false_errors(
        ray_local, random_fcn, s3_bucket, s3_faults, at_first_commit, tmp_path):
    files = _collection()
    _put(s3_bucket.fs(), f"{s3_bucket.name}/images", files)
    images, out = f"{s3_bucket.url}/images", str(tmp_path / "out")  # local output: only the reads fail
    options = {**s3_faults.storage_options(), "secret": SECRET}
    at_first_commit(s3_faults.stop)
    cfg = _one_shard_at_a_time(images, out, random_fcn, options, max_shard_attempts=2)

    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        job.run_segment(cfg)
    message = str(failure.value)
    assert len(message.splitlines()) == 1 and SECRET not in message
    assert f"{images}/" in message and "storage still failing" in message
    assert time.monotonic() - started < 60
    # The outage says nothing about the images: none of them is cached as an error row.
    # (Shards run in URI order, so the broken file, which would have one, comes last.)
    assert read_errors(out).num_rows == 0 and 1 <= read_masks(out, columns=["uri"]).num_rows < len(GOOD)

    s3_faults.start()
    summary = job.run_segment(cfg)
    assert summary.up_to_date >= 1
    _assert_accounted_for(images, out, files, options)


def test_missing_credentials_fail_the_read_instead_of_becoming_an_error_row(s3_bucket, monkeypatch):
    # What a worker without the driver's AWS_* settings used to record for every image,
    # as a "read" error row that a rerun then skipped.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3_bucket.fs().pipe_file(f"{s3_bucket.name}/a.png", b"x")
    with pytest.raises(StorageError, match=r"/a\.png: no credentials for this location \(NoCredentialsError\)"):
        read_bytes(f"{s3_bucket.url}/a.png", {"endpoint_url": s3_bucket.endpoint_url})
