"""Model actors started before the plan (pipeline/prestart.py): the job runs on them, or stops them.

The CLI starts a first run's model actors as soon as its local Ray is up, while Prefect's
server boots and the flow plans; the job must then take those actors over instead of
starting a second set, and must never run on actors built for another model.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from segflow.pipeline import engine, job, prestart
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.reader import read_masks
from tests.cli import start_segment
from tests.collection import write_scenes
from tests.ray_cluster import ProcessWatcher


def _config(input, output, model) -> SegmentConfig:
    return SegmentConfig(input=str(input), output=str(output), model=model, shard_size=4, model_actors=1, progress=False)


def test_the_job_runs_on_the_model_actors_started_before_its_plan(ray_local, random_fcn, tmp_path, monkeypatch):
    write_scenes(tmp_path / "in", 6)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    prestart.begin(lambda: job._actor_spec(cfg), lambda: None)  # Ray is already up (ray_local)

    def no_second_set(spec):
        raise AssertionError("the job started model actors of its own beside the early ones")

    monkeypatch.setattr(engine, "start_model_actors", no_second_set)
    summary = job.run_segment(cfg)

    assert (summary.masks, summary.errors) == (6, 0)
    assert len(read_masks(str(tmp_path / "out"), columns=["uri"])) == 6


def test_model_actors_started_for_another_model_are_stopped_not_used(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 4)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    other_model = ModelRef(model=random_fcn.model, weights="none", num_classes=11, seed=1)
    other = _config(tmp_path / "in", tmp_path / "out", other_model)
    _, early_actors = prestart.begin(lambda: job._actor_spec(other), lambda: None).result()
    assert early_actors

    summary = job.run_segment(cfg)

    assert (summary.masks, summary.errors) == (4, 0)
    for actor in early_actors:  # stopped by the job, so they ran none of its shards
        with pytest.raises(ray_local.exceptions.RayActorError):
            ray_local.get(actor.pid.remote(), timeout=60)


def test_a_first_run_on_the_command_line_starts_one_set_of_model_actors(tmp_path):
    """The CLI path: flags -> config -> Prefect flow parameters -> config again must give the
    spec the early actors were started from, or every first run would start its actors twice."""
    write_scenes(tmp_path / "in", 8)
    out = tmp_path / "out"
    driver = start_segment(tmp_path / "in", out, tmp_path / "prefect", "--model-actors", "1", stdout=subprocess.PIPE)
    watcher = ModelActorWatcher(session=driver.pid)
    with watcher:
        stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert "8 masks, 0 errors" in stdout
    assert len(watcher.pids) == 1, f"model actor processes: {watcher.pids}"


class ModelActorWatcher(ProcessWatcher):
    """Records the pid of every model actor process of a session while the block runs."""

    def __init__(self, session: int):
        super().__init__()
        self.session, self.pids = session, set()

    def poll(self) -> None:
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in self.pids:
                try:
                    title = Path(f"/proc/{name}/cmdline").read_bytes()
                    in_session = os.getsid(int(name)) == self.session
                except OSError:
                    continue
                # an actor's title is its class while idle and its task's name while busy
                if in_session and title.startswith((b"ray::ModelWorker", b"ray::infer_shard")):
                    self.pids.add(int(name))
