"""Faults: a killed driver resumes, killed workers are survived, a hopeless shard is recorded.

All faults are real SIGKILLs of real processes. Worker processes are found by their
title: segflow names its Ray tasks after their shard ("ray::infer_shard shard-<id>",
"ray::refine_item shard-<id>"), and shard ids hash this test's own paths, so only
processes of this test can match. The model is an FCN-8s with seeded random weights:
its masks are not segmentations, only the bookkeeping is tested.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig
from segflow.pipeline.reader import read_errors, read_masks
from segflow.pipeline.verify import verify_output
from tests.cli import start_segment
from tests.collection import write_scene, write_scenes
from tests.prefect_home import fresh_prefect_home
from tests.ray_cluster import ProcessWatcher, RayCluster, descendants, is_alive, process_table

REPO = Path(__file__).resolve().parents[1]
SHARD_FILE = re.compile(r"^shard-[0-9a-f]{16}\.parquet$")


def _config(input, output, model, **kw) -> SegmentConfig:
    return SegmentConfig(input=str(input), output=str(output), model=model, **{"shard_size": 2, "progress": False, **kw})


# --- a killed driver resumes --------------------------------------------------------------


def _segment_command(input: Path, output: Path, address: str) -> list[str]:
    return [
        sys.executable, "-m", "segflow.flows.cli", "segment", str(input), str(output), "--shard-size", "2",
        "--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11", "--ray-address", address, "--no-progress",
    ]


def _committed(output: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime ns) of each committed shard file, masks and errors."""
    files = {}
    for dataset in ("masks", "errors"):
        for p in sorted((output / dataset).glob("shard-*.parquet")):
            st = p.stat()
            files[f"{dataset}/{p.name}"] = (st.st_ino, st.st_mtime_ns)
    return files


def _row_identities(output: Path) -> list[tuple[str, str, str, str]]:
    masks = read_masks(str(output), columns=["uri", "key", "shard_id"]).to_pylist()
    errors = read_errors(str(output), columns=["uri", "key", "shard_id"]).to_pylist()
    return sorted([("masks", r["uri"], r["key"], r["shard_id"]) for r in masks] + [("errors", r["uri"], r["key"], r["shard_id"]) for r in errors])


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if is_alive(pid)}


def test_rerun_after_driver_sigkill_commits_only_the_missing_shards(tmp_path):
    write_scenes(tmp_path / "in", 12)
    out, clean_out = tmp_path / "out", tmp_path / "clean"
    # The CLI joins a cluster of our own (--ray-address): killing the driver then leaves
    # Ray daemons that only this test owns, and stops them at the end.
    cluster = RayCluster()
    # A Prefect home of its own: the CLI's ephemeral Prefect API keeps its database there.
    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect"))}
    try:
        cluster.start_head(num_cpus=2)
        command = _segment_command(tmp_path / "in", out, cluster.address)
        driver = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not list((out / "masks").glob("shard-*.parquet")):
            assert driver.poll() is None, f"the first run ended before any commit: {driver.stderr.read()}"
            assert time.monotonic() < deadline, "no shard committed in 300 s"
            time.sleep(0.01)
        started = {driver.pid} | descendants({driver.pid}, process_table())  # e.g. Prefect's API server
        os.killpg(driver.pid, signal.SIGKILL)  # the whole process group: the driver and what it started
        driver.wait(timeout=30)
        driver.stderr.close()
        assert driver.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(started), f"processes of the killed driver survived: {_alive(started)}"
        before = _committed(out)
        committed_masks = [name for name in before if name.startswith("masks/")]
        assert 1 <= len(committed_masks) < 6, f"the kill came too late to test a resume: {committed_masks}"

        resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        left = 6 - len(committed_masks)
        assert f"{2 * left} of 12 images to process in {left} shards, {12 - 2 * left} up to date" in resumed.stderr

        clean = subprocess.run(_segment_command(tmp_path / "in", clean_out, cluster.address),
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert clean.returncode == 0, clean.stderr
    finally:
        survivors = cluster.stop()
    assert not survivors, f"Ray processes of the test cluster survived: {survivors}"

    after = _committed(out)
    for name, identity in before.items():
        if name.startswith("masks/") or name.replace("errors/", "masks/") in before:
            assert after[name] == identity, f"{name} was rewritten by the resumed run"
    assert sorted(after) == sorted(_committed(clean_out))  # the same shards, under the same names
    assert _row_identities(out) == _row_identities(clean_out)  # the same (uri, key, shard_id) rows, no duplicates
    assert len(_row_identities(out)) == 12
    for output in (out, clean_out):
        assert verify_output(str(output), str(tmp_path / "in")) == []
        leftovers = [p.name for d in ("masks", "errors") for p in (output / d).iterdir() if not SHARD_FILE.match(p.name)]
        assert leftovers == [], f"staging or partial files left in {output}: {leftovers}"


def _session_members(session: int) -> set[int]:
    """Live processes of a session (a driver started with start_new_session and all it started)."""
    members = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == session:
                    members.add(int(name))
            except OSError:
                continue  # exited meanwhile
    return members


def test_ctrl_c_on_the_embedded_default_ends_promptly_and_stops_everything_it_started(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, Prefect's ephemeral
    API server and the local Ray included. segflow must still end (it once hung, retrying
    against the stopped server), say how to resume, and leave no process behind."""
    write_scenes(tmp_path / "in", 120)
    out = tmp_path / "out"
    driver = start_segment(tmp_path / "in", out, tmp_path / "prefect", "--shard-size", "2")
    deadline = time.monotonic() + 300
    while not list((out / "masks").glob("shard-*.parquet")):
        assert driver.poll() is None, f"the run ended before any commit: {driver.stderr.read()}"
        assert time.monotonic() < deadline, "no shard committed in 300 s"
        time.sleep(0.01)
    os.killpg(driver.pid, signal.SIGINT)
    try:
        _, stderr = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        raise AssertionError("segflow was still running 60 s after Ctrl-C") from None
    assert driver.returncode == 130, stderr
    assert "interrupted; committed shards are kept, rerun the same command to resume" in stderr
    deadline = time.monotonic() + 15
    while _session_members(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _session_members(driver.pid)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes started by the interrupted segflow survived: {survivors}"
    assert verify_output(str(out)) == []  # what was committed is whole: the rest is simply not done yet
    leftovers = [p.name for d in ("masks", "errors") if (out / d).exists() for p in (out / d).iterdir() if not SHARD_FILE.match(p.name)]
    assert leftovers == [], f"staging or partial files left: {leftovers}"


# --- killed workers ----------------------------------------------------------------------


class TaskKiller(ProcessWatcher):
    """A thread that SIGKILLs each new process whose Ray task title is one of `task_names`.

    At most `limit` processes (None: every one, e.g. each restart of an actor that takes the
    task up again), each `after_s` seconds after it was first seen on the task. `killed`
    lists (pid, title) in order.
    """

    def __init__(self, task_names: list[str], limit: int | None = 1, poll_s: float = 0.005, after_s: float = 0.0):
        super().__init__(poll_s)
        self.titles = {f"ray::{name}" for name in task_names}
        self.limit = limit
        self.after_s = after_s
        self.first_seen: dict[int, float] = {}
        self.killed: list[tuple[int, str]] = []

    def done(self) -> bool:
        return self.limit is not None and len(self.killed) >= self.limit

    def poll(self) -> None:
        for pid, title in _processes_titled(self.titles).items():
            if pid not in {p for p, _ in self.killed}:
                if time.monotonic() - self.first_seen.setdefault(pid, time.monotonic()) < self.after_s:
                    continue
                os.kill(pid, signal.SIGKILL)
                self.killed.append((pid, title))
                break


def _processes_titled(titles: set[str]) -> dict[int, str]:
    """pid -> title of the processes whose title (`ray::<task name>` while Ray runs a task) is in `titles`."""
    hits = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    title = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue  # exited meanwhile
            if title in titles:
                hits[int(name)] = title
    return hits


def test_model_actor_killed_mid_shard_job_still_completes(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 8)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    target = plan.shards[1].shard_id
    with TaskKiller([f"infer_shard shard-{target}"]) as killer:
        stats = job.run_stage(cfg, plan)
    assert len(killer.killed) == 1, "the model actor was never seen serving the shard"
    assert stats.shard_retries >= 1
    assert (stats.masks, stats.errors, stats.shards_committed) == (8, 0, 4)
    assert verify_output(cfg.output, cfg.input) == []


def test_crf_worker_killed_mid_task_job_still_completes(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 6)
    # more mean-field iterations than usual: each CRF task then runs long enough to be caught;
    # CRF workers asked for: on a CPU-only cluster the model actors refine by default (no CRF tasks)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn, crf_params=(('iterations', 40),), crf_workers=2)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    with TaskKiller([f"refine_item shard-{s.shard_id}" for s in plan.shards]) as killer:
        stats = job.run_stage(cfg, plan)
    assert len(killer.killed) == 1
    assert (stats.masks, stats.errors) == (6, 0)  # Ray retried the CRF task; no image lost
    assert verify_output(cfg.output, cfg.input) == []


def test_shard_failing_every_attempt_becomes_error_rows_and_the_job_goes_on(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 6)
    # one shard in flight: each kill then hits only the doomed shard, never a bystander
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn, max_shard_attempts=2, max_shards_in_flight=1)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    doomed = plan.shards[1]
    with TaskKiller([f"infer_shard shard-{doomed.shard_id}"], limit=None) as killer:
        stats = job.run_stage(cfg, plan)
    assert killer.killed, "the model actor was never seen serving the doomed shard"

    errors = read_errors(cfg.output).to_pylist()
    assert sorted(e["uri"] for e in errors) == sorted(doomed.uris)
    for e in errors:
        assert (e["stage"], e["attempts"], e["shard_id"]) == ("shard", 2, doomed.shard_id)
        assert e["image_fault"] is False  # the run failed the images, not the other way round: not done
        # Ray reports a SIGKILLed actor with the kernel's OOM killer as the likely cause; without
        # that, the cause inside Ray's wrapper in plain text (ActorDiedError, ActorUnavailableError)
        assert re.match(r"(out of memory on this image: |not segmented: its shard failed 2 times because the model actor ran "
                        r"out of memory on |shard failed 2 times, last: Actor\w+Error: The actor )", e["reason"]), e["reason"]
        assert "\x1b" not in e["reason"]
    masks = read_masks(cfg.output, columns=["uri"]).column("uri").to_pylist()
    assert sorted(masks) == sorted(u for s in plan.shards if s is not doomed for u in s.uris)
    assert (stats.masks, stats.errors, stats.errors_to_retry, stats.shards_committed) == (4, 2, 2, 3)
    assert verify_output(cfg.output, cfg.input) == []
    replan = job.plan_stage(cfg, job.list_stage(cfg))
    assert [u for s in replan.shards for u in s.uris] == list(doomed.uris)  # a plain rerun retries them


def test_shards_after_a_lost_actor_wait_for_its_restart(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 6)
    # One attempt each: a shard sent to the actor while it restarts would fail without
    # running and become error rows at once.
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn, max_shard_attempts=1, max_shards_in_flight=1)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    doomed = plan.shards[0]
    with TaskKiller([f"infer_shard shard-{doomed.shard_id}"]) as killer:
        stats = job.run_stage(cfg, plan)
    assert len(killer.killed) == 1
    assert sorted(read_errors(cfg.output, columns=["uri"]).column("uri").to_pylist()) == sorted(doomed.uris)
    assert (stats.masks, stats.errors) == (4, 2)
    assert verify_output(cfg.output, cfg.input) == []


def test_an_actor_killed_on_one_image_names_memory_the_image_and_the_fix_and_keeps_other_reasons(ray_local, random_fcn, tmp_path):
    """Ray's report of a killed actor names the OOM killer; the rows say so, on the right image, with the fix.

    The shard holds an empty file, then a 2400x1800 photo segmented at full size (seconds on
    a CPU). Each attempt's actor is SIGKILLed, as the kernel's OOM killer does, 1.5 s into
    the shard: after it answered for the empty file, while it runs the network on the photo.
    """
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_empty.png").write_bytes(b"")
    big = tmp_path / "in" / "b_photo.png"
    write_scene(big, 0, (1800, 2400))
    cfg = _config(tmp_path / "in", tmp_path / "out", dataclasses.replace(random_fcn, working_size="full"), max_shard_attempts=2,
                  max_shards_in_flight=1, crf_params=(("iterations", 1),))
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    (shard,) = plan.shards
    with TaskKiller([f"infer_shard shard-{shard.shard_id}"], limit=None, after_s=1.5) as killer:
        stats = job.run_stage(cfg, plan)
    assert len(killer.killed) == 2

    rows = {Path(e["uri"]).name: e for e in read_errors(cfg.output).to_pylist()}
    assert set(rows) == {"a_empty.png", "b_photo.png"} and stats.masks == 0
    # the empty file keeps its own reason: the shard's failure is not laid over it
    assert rows["a_empty.png"]["image_fault"] is True and "empty" in rows["a_empty.png"]["reason"].lower()
    photo = rows["b_photo.png"]
    assert photo["image_fault"] is False  # a rerun, after the fix, retries it
    assert photo["reason"].startswith("out of memory on this image: the model actor was killed (SIGKILL), most likely by "
                                      "the kernel's OOM killer (out of memory) while segmenting it, in 2 of 2 attempts;"), photo["reason"]
    assert "--working-size" in photo["reason"] and "--tiles" in photo["reason"]
    assert verify_output(cfg.output, cfg.input) == []
