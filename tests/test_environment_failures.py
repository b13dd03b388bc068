"""Failures that are not the images' stop the job, blame no image, and are retried by a rerun.

A model actor that cannot be constructed or a refinement worker that cannot import is a
fault of the environment: the job stops with one line naming the cause and exit code 3,
and writes no error rows. Error rows blaming the run itself (a shard that failed, old
outputs' shard/infer/refine rows) do not count as done: the run exits 1, its Prefect flow
run ends Failed, and a plain rerun tries those images again.

The broken environments are real: a user's working directory holding a package that
shadows torch or pydensecrf (Ray puts the driver's working directory on its workers'
path), and a checkpoint that disappears between planning and the model actors' start.
The model is an FCN-8s with seeded random weights: its masks are not segmentations.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from segflow.errors import JobStoppedError
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.reader import read_errors, read_masks
from segflow.pipeline.verify import verify_output
from tests.cli import RANDOM_FCN_FLAGS
from tests.collection import write_scenes
from tests.prefect_home import fresh_prefect_home
from tests.ray_cluster import ProcessWatcher, descendants, process_table

REPO = Path(__file__).resolve().parents[1]
VERDICT = "segflow segment: error: "


def _shadowing_folder(root: Path, package: str) -> Path:
    """A user's project folder with its own `package`, which fails on import as theirs might."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(f'raise ImportError("{package} here is the user\'s own package")\n')
    return root


def _segment(input: Path, output: Path, cwd: Path, prefect_home: Path, *flags: str) -> subprocess.CompletedProcess:
    """`segflow segment` run from `cwd` on the embedded default (local Ray, Prefect's ephemeral API)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(prefect_home))}
    command = [sys.executable, "-m", "segflow.flows.cli", "segment", str(input), str(output), *flags, *RANDOM_FCN_FLAGS]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _flow_run_states(prefect_home: Path) -> list[str]:
    """State types of the flow runs in the database of the CLI's ephemeral Prefect API."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run")]


def _verdicts(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(VERDICT)]


@pytest.mark.parametrize("package, flags", [("torch", ()), ("pydensecrf", ("--crf-workers", "1"))],
                         ids=["model-actor-cannot-import-torch", "crf-worker-cannot-import-pydensecrf"])
def test_a_worker_that_cannot_import_stops_the_job_with_exit_3_and_no_error_rows(tmp_path, package, flags):
    write_scenes(tmp_path / "in", 4)
    cwd = _shadowing_folder(tmp_path / "project", package)
    out = tmp_path / "out"
    run = _segment(tmp_path / "in", out, cwd, tmp_path / "prefect", *flags)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-3000:]
    verdicts = _verdicts(run.stderr)
    assert len(verdicts) == 1, run.stderr[-3000:]
    assert "cannot" in verdicts[0] and f"ImportError: {package} here is the user's own package" in verdicts[0], verdicts[0]
    assert read_errors(str(out)).num_rows == 0  # no image was at fault, so none is recorded as failed
    assert read_masks(str(out), columns=["uri"]).num_rows == 0
    assert _flow_run_states(tmp_path / "prefect") == ["FAILED"]


def test_weights_missing_on_the_workers_stop_the_job_naming_the_checkpoint(ray_local, tmp_path):
    write_scenes(tmp_path / "in", 4)
    bundled = REPO / "models" / "bundled" / "camvid_fcn8s_resnet18.safetensors"
    checkpoint = tmp_path / "weights" / "m.safetensors"
    checkpoint.parent.mkdir()
    shutil.copy(bundled, checkpoint)
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=ModelRef(checkpoint=str(checkpoint)),
                        shard_size=2, progress=False)
    plan = job.plan_stage(cfg, job.list_stage(cfg))  # the driver read the checkpoint's header here
    checkpoint.unlink()  # gone before the model actors load it (a node without the file looks the same)
    with pytest.raises(JobStoppedError) as stopped:
        job.run_stage(cfg, plan)
    line = str(stopped.value)
    assert "\n" not in line and "a model actor cannot start" in line and str(checkpoint) in line, line
    assert read_errors(cfg.output).num_rows == 0
    assert read_masks(cfg.output, columns=["uri"]).num_rows == 0


def _rewrite_as_older_output(output: Path, move_to_errors: str, stage: str) -> None:
    """Make OUTPUT look written before `image_fault` existed, with `move_to_errors`'s mask row as an error row of `stage`.

    Older segflow recorded every failure as done; this is what its outputs held after a
    shard failed (stage shard) or the model or CRF raised (infer, refine).
    """
    for masks_file in sorted((output / "masks").glob("shard-*.parquet")):
        errors_file = output / "errors" / masks_file.name
        masks, errors = pq.read_table(masks_file), pq.read_table(errors_file)
        errors = errors.drop_columns(["image_fault"])
        moved = masks.filter(pc.equal(masks.column("uri"), move_to_errors))
        if len(moved):
            row = {c: moved.column(c)[0].as_py() for c in errors.column_names if c in moved.column_names}
            row.update(stage=stage, reason="shard failed 3 times, last: ActorDiedError: The actor died", attempts=3)
            errors = pa.concat_tables([errors, pa.Table.from_pylist([row], schema=errors.schema)])
            masks = masks.filter(pc.not_equal(masks.column("uri"), move_to_errors))
        pq.write_table(errors, errors_file)
        pq.write_table(masks, masks_file)


@pytest.mark.parametrize("stage", ["shard", "infer", "refine"])
def test_an_older_outputs_error_rows_not_blaming_the_image_are_retried_by_a_plain_rerun(ray_local, random_fcn, tmp_path, stage):
    images = write_scenes(tmp_path / "in", 3)
    (tmp_path / "in" / "x_truncated.png").write_bytes(images[0].read_bytes()[:40])  # the image's own fault
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=random_fcn, shard_size=2, progress=False)
    first = job.run_segment(cfg)
    assert (first.masks, first.errors) == (3, 1)
    _rewrite_as_older_output(tmp_path / "out", str(images[1]), stage)
    assert "image_fault" not in pq.read_schema(next((tmp_path / "out" / "errors").glob("*.parquet"))).names
    faults = dict(zip(*read_errors(cfg.output, columns=["uri", "image_fault"]).to_pydict().values()))
    assert faults == {str(tmp_path / "in" / "x_truncated.png"): True, str(images[1]): False}

    plan = job.plan_stage(cfg, job.list_stage(cfg))
    assert [u for s in plan.shards for u in s.uris] == [str(images[1])]  # the truncated file counts as done
    rerun = job.summarise_stage(cfg, plan, job.run_stage(cfg, plan))
    assert (rerun.masks, rerun.errors, rerun.up_to_date) == (1, 0, 3)
    assert sorted(read_masks(cfg.output, columns=["uri"]).column("uri").to_pylist()) == sorted(map(str, images))
    assert verify_output(cfg.output, cfg.input) == []


class _FirstModelActorKiller(ProcessWatcher):
    """SIGKILLs, once, the first process of `driver`'s process tree that runs a shard (its local Ray's model actor)."""

    def __init__(self, driver: int):
        super().__init__(poll_s=0.005)
        self.driver = driver
        self.killed: list[int] = []

    def done(self) -> bool:
        return bool(self.killed)

    def poll(self) -> None:
        running = set(_processes_titled_like("ray::infer_shard shard-"))
        if not running:  # the whole process table only when a shard runs somewhere (polled every 5 ms)
            return
        ours = running & descendants({self.driver}, process_table())
        for pid in ours:
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
            return


def _processes_titled_like(prefix: str) -> dict[int, str]:
    hits = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    title = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if title.startswith(prefix):
                hits[int(name)] = title
    return hits


def test_a_shard_lost_to_a_dead_actor_exits_1_fails_the_flow_run_and_a_plain_rerun_retries_it(tmp_path):
    write_scenes(tmp_path / "in", 4)
    out, home = tmp_path / "out", tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(home))}
    # one attempt per shard and one shard in flight: the killed actor's shard becomes error rows
    flags = ["--shard-size", "2", "--max-shard-attempts", "1", "--max-shards-in-flight", "1"]
    command = [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path / "in"), str(out), *flags, *RANDOM_FCN_FLAGS]
    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _FirstModelActorKiller(driver.pid) as killer:
        stdout, stderr = driver.communicate(timeout=300)
    assert killer.killed, "no model actor was seen running a shard"
    assert driver.returncode == 1, stdout[-2000:] + stderr[-3000:]
    assert "2 masks, 2 errors (2 not the images' fault: a rerun retries them)" in stdout, stdout
    verdicts = _verdicts(stderr)
    assert len(verdicts) == 1 and "rerun the same command to retry them" in verdicts[0], stderr[-3000:]
    errors = read_errors(str(out), columns=["stage", "image_fault"]).to_pylist()
    assert errors == [{"stage": "shard", "image_fault": False}] * 2
    assert _flow_run_states(home) == ["FAILED"]  # a scheduled run would end Failed too, not Completed

    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "2 masks, 0 errors, 2 up to date" in rerun.stdout, rerun.stdout
    assert read_errors(str(out)).num_rows == 0
    assert verify_output(str(out), str(tmp_path / "in")) == []
    assert sorted(_flow_run_states(home)) == ["COMPLETED", "FAILED"]
