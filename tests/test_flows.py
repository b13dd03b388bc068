"""The Prefect flows against a real Prefect server (tests/prefect_server.py) and a real Ray.

Flow runs here use an FCN-8s with seeded random weights (`random_fcn`): they test the
orchestration and bookkeeping, and their masks are not real segmentations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segflow.flows.artifacts import artifact_key
from segflow.flows.deploy import deployment_name
from segflow.flows.locking import OutputBusyError, output_limit_name, output_lock
from segflow.flows.parameters import JobSpec, flow_parameters, storage_options_scope
from segflow.pipeline.config import LabelPairing, ModelRef, SegmentConfig
from tests.prefect_server import prefect_server, wait_for  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-sentinel-value"
RANDOM_FCN_ARGS = ["--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11"]


def make_images(root: Path, n: int, start: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rgb = np.random.default_rng(i).integers(0, 255, (32, 48, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"img{i:03d}.png")
        paths.append(root / f"img{i:03d}.png")
    return paths


def make_labels(root: Path, images: list[Path]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for p in images:
        label = np.random.default_rng(len(p.name)).integers(0, 11, (32, 48), dtype=np.uint8)
        Image.fromarray(label).save(root / p.name)


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_run_named(name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])), sort=FlowRunSort.START_TIME_DESC)
    assert runs, f"no flow run named {name!r} on the server"
    return runs


def artifacts_with_key(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client() as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


# --- parameters: no server needed ---------------------------------------------------------


def _every_field_changed() -> SegmentConfig:
    return SegmentConfig(
        input="/in", output="/out", model=ModelRef("fcn8s_resnet18", "/ckpt.safetensors", "none", 11, 3),
        refinement="none", crf_params=(('bilateral_sxy', 40.0), ('iterations', 2)), shard_size=7, batch_size=3,
        max_pixels=1000, ray_address="auto", model_actors=2, crf_workers=3, max_shards_in_flight=4,
        max_shard_attempts=5, force=True, prune=True, retry_errors=True, content_hash=True, device="cpu",
        autocast="off", channels_last=False, compile=True, progress=False, storage_options={"key": SECRET},
        evaluation=LabelPairing(labels="/labels", image_suffix="_x", label_suffix="_L", format="rgb",
                                colors=(((1, 2, 3), 0),), remap=((7, 1),), ignore_index=255, boundary_tolerance=3, trimap_width=5),
    )


def test_flow_parameters_rebuild_every_config_field_without_credentials():
    cfg = _every_field_changed()
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(SegmentConfig) if f.name not in ("input", "output")}
    assert [name for name, value in defaults.items() if getattr(cfg, name) == value] == [], "the fixture must change every field"

    params = flow_parameters(cfg)
    assert SECRET not in json.dumps(params, default=str)
    with storage_options_scope(cfg.storage_options):
        rebuilt = _config_of(params)
    assert rebuilt == cfg
    assert rebuilt.storage_options == {"key": SECRET}


def test_deployment_parameters_survive_json_and_flow_validation():
    """What a deployment stores (JSON) validates back into the same config."""
    from pydantic_core import to_jsonable_python

    from segflow.flows.evaluate import evaluate_flow
    from segflow.flows.reprocess import reprocess_flow

    cfg = _every_field_changed().with_(storage_options={})
    stored = to_jsonable_python(flow_parameters(cfg))
    stored["images"] = stored.pop("input")
    validated = evaluate_flow.validate_parameters(stored)
    validated["input"] = validated.pop("images")
    validated.pop("wait_for_output_seconds")
    assert _config_of(validated) == cfg

    plain = cfg.with_(evaluation=None)
    validated = reprocess_flow.validate_parameters(to_jsonable_python(flow_parameters(plain)))
    assert (validated.pop("dry_run"), validated.pop("wait_for_output_seconds")) == (False, None)
    assert _config_of(validated) == plain


def _config_of(params: dict) -> SegmentConfig:
    """The engine config that flow parameters describe, as the flows build it."""
    from segflow.flows.parameters import Evaluation

    params = dict(params)
    if "labels" in params:
        params["evaluation"] = Evaluation(labels=params.pop("labels"), pairing=params.pop("pairing"))
    return JobSpec(**params).to_config()


def test_one_lock_name_per_output_location(tmp_path):
    from prefect.types.names import BANNED_CHARACTERS

    out = tmp_path / "masks"
    names = {output_limit_name(u) for u in (str(out), f"{out}/", f"file://{out}", f"{out}//")}
    assert len(names) == 1
    name = names.pop()
    assert name.startswith("segflow-output-") and name.endswith("-masks")
    assert not set(name) & set(BANNED_CHARACTERS)
    assert output_limit_name(str(tmp_path / "other")) != name
    assert output_limit_name("s3://bucket/masks") != output_limit_name("s3://bucket/masks2")


def test_schedule_refuses_bad_cron_credentials_and_missing_server(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from segflow.flows.cli import main

    base = ["schedule", str(tmp_path / "in"), str(tmp_path / "out"), *RANDOM_FCN_ARGS]
    assert main([*base, "--cron", "every night"]) == 2
    assert "--cron 'every night'" in capsys.readouterr().err
    assert main([*base, "--cron", "0 2 * * *", "--storage-options", json.dumps({"secret": SECRET})]) == 2
    err = capsys.readouterr().err
    assert "--storage-secret" in err and SECRET not in err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main([*base, "--cron", "0 2 * * *"]) == 2
    assert "needs a Prefect server" in capsys.readouterr().err


# --- flow runs against the server ---------------------------------------------------------


def test_segment_flow_with_random_weights_records_stage_tasks_and_artifact(prefect_server, ray_local, random_fcn, tmp_path):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from segflow.flows.segment import run_segment_flow

    make_images(tmp_path / "in", 4)
    out = tmp_path / "seg-out"
    # a sentinel "credential" (LocalFileSystem ignores unknown options) must not reach the server
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(out), model=random_fcn, shard_size=2, progress=False,
                        storage_options={"sentinel": SECRET})
    t0 = time.perf_counter()
    first = run_segment_flow(cfg)
    t1 = time.perf_counter()
    second = run_segment_flow(cfg)
    t2 = time.perf_counter()
    print(f"\nsegment_flow against a server: first run {t1 - t0:.1f} s, rerun {t2 - t1:.1f} s")
    APILogWorker.drain_all()

    assert (first.masks, first.errors, first.shards_run) == (4, 0, 2)
    assert (second.masks, second.up_to_date) == (0, 4)
    runs = flow_run_named("segment-seg-out")
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    run = runs[-1]  # the first run
    assert "storage_options" not in run.parameters and run.parameters["execution"]["shard_size"] == 2
    # Task runs reach the server as events, recorded asynchronously: flush them, then wait
    # until the server has recorded all five (under load, or behind earlier tests' events,
    # the first read can come back before it has).
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)

    def recorded_tasks():
        with client() as c:
            found = c.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
        return found if len(found) >= 5 and all(t.state is not None and t.state.is_final() for t in found) else None

    tasks = wait_for(recorded_tasks, 60, "the first run's five stage task runs on the server")
    with client() as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    stages = sorted(t.name.rsplit("-", 1)[0] for t in tasks)
    assert stages == ["list_inputs", "plan_work", "publish_report", "run_shards", "summarise_run"]  # stages, not images
    assert all(t.state.is_completed() for t in tasks)

    versions = artifacts_with_key(artifact_key("run", str(out)))
    assert len(versions) == 2  # one history per OUTPUT
    table = {row["measure"]: row["value"] for row in json.loads(next(a for a in versions if a.flow_run_id == run.id).data)}
    assert table["masks written"] == 4 and table["images in input"] == 4 and table["images per second"] > 0
    everything = json.dumps([run.model_dump(mode="json") for run in runs] + [a.model_dump(mode="json") for a in versions]
                            + [t.model_dump(mode="json") for t in tasks] + [log.message for log in logs])
    assert SECRET not in everything
    assert any("plan: 4 of 4 images to process in 2 shards" in log.message for log in logs)


def test_evaluate_flow_with_random_weights_publishes_miou_raw_vs_crf_and_report(prefect_server, ray_local, random_fcn, tmp_path):
    from segflow.flows.evaluate import run_evaluate_flow

    images = make_images(tmp_path / "images", 4)
    make_labels(tmp_path / "labels", images)
    out = tmp_path / "eval-out"
    cfg = SegmentConfig(input=str(tmp_path / "images"), output=str(out), model=random_fcn, shard_size=2, progress=False,
                        evaluation=LabelPairing(labels=str(tmp_path / "labels")))
    summary, evaluation = run_evaluate_flow(cfg)

    assert summary.masks == 4
    assert evaluation["raw"]["miou"] is not None and evaluation["crf"]["miou"] is not None
    rows = json.loads(artifacts_with_key(artifact_key("evaluation", str(out)))[0].data)
    assert rows[0]["class"] == "mIoU (all classes)"
    assert rows[0]["IoU raw"] == round(evaluation["raw"]["miou"], 4) and rows[0]["IoU CRF"] == round(evaluation["crf"]["miou"], 4)
    assert len(rows) == 1 + 11
    link = artifacts_with_key(artifact_key("report", str(out)))[0]
    report = Path(evaluation["report"])
    assert report.is_file() and f"(file://{report})" in link.data
    assert artifacts_with_key(artifact_key("evaluation-summary", str(out)))


def test_reprocess_dry_run_publishes_plan_and_writes_nothing(prefect_server, random_fcn, tmp_path):
    from segflow.flows.reprocess import reprocess_flow

    make_images(tmp_path / "in", 4)
    out = tmp_path / "dry-out"
    assert reprocess_flow(str(tmp_path / "in"), str(out), model=random_fcn, dry_run=True) is None
    assert not out.exists()
    plan = artifacts_with_key(artifact_key("plan", str(out)))[0]
    assert "4 of 4 images to process" in plan.data


def test_second_run_into_same_output_waits_for_the_lock_then_fails(prefect_server, random_fcn, tmp_path):
    from segflow.flows.locking import ensure_output_limit
    from segflow.flows.segment import segment_flow

    make_images(tmp_path / "in", 2)
    out = tmp_path / "locked-out"
    with output_lock(str(out)) as name:
        assert name == output_limit_name(str(out))
        with client() as c:
            held = c.read_global_concurrency_limit_by_name(name)
        assert (held.limit, held.active_slots) == (1, 1)
        # written another way, same location: blocked, fails without listing or writing
        state = segment_flow(str(tmp_path / "in"), f"file://{out}/", model=random_fcn, wait_for_output_seconds=2, return_state=True)
        assert state.is_failed()
        with pytest.raises(OutputBusyError, match="another segflow run is writing this output"):
            state.result()
        assert not out.exists()
        with output_lock(str(tmp_path / "elsewhere"), timeout_seconds=10):  # other outputs are not blocked
            pass
    with client() as c:
        assert c.read_global_concurrency_limit_by_name(name).active_slots == 0
        # someone raising the limit would let two writers in: the next run puts it back to 1
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        c.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=3))
        ensure_output_limit(name)
        assert c.read_global_concurrency_limit_by_name(name).limit == 1


_HOLD_LOCK = """
import sys, time
from segflow.flows.locking import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_without_a_prefect_server_one_run_per_output_on_this_machine_and_a_killed_holder_frees_it(tmp_path, monkeypatch):
    """The CLI's default (ephemeral API): an flock on this machine, which the kernel drops with its holder."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("SEGFLOW_LOCK_DIR", str(tmp_path / "locks"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    # no server in this process either (this module's prefect_server fixture may have set one)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(OutputBusyError, match=rf"another segflow run \(pid {holder.pid}\) on this machine is writing"):
                with output_lock(f"file://{out}/", timeout_seconds=1):  # the same location, written another way
                    pass
            with output_lock(str(tmp_path / "elsewhere"), timeout_seconds=1):  # other outputs are not blocked
                pass
        finally:
            holder.kill()  # SIGKILL: no exit handler runs, the kernel releases the lock
            holder.wait()
        with output_lock(str(out), timeout_seconds=5) as path:
            assert Path(path).parent == tmp_path / "locks"


def test_prefect_yaml_deploys_nightly_reprocess_with_cron_and_limit(prefect_server, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate

    with client() as c:
        c.create_work_pool(WorkPoolCreate(name="segflow", type="process"))
    env = prefect_server.env(SEGFLOW_INPUT=str(tmp_path / "in"), SEGFLOW_OUTPUT=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "segflow-nightly-reprocess"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with client() as c:
        d = c.read_deployment_by_name("segflow-reprocess/segflow-nightly-reprocess")
    assert d.entrypoint == "segflow.flows.reprocess.reprocess_flow" and d.work_pool_name == "segflow"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [("0 2 * * *", "UTC", True)]
    assert d.global_concurrency_limit.limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE"
    assert d.parameters == {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}


# --- `segflow schedule`: a served deployment, its runs, cancellation ----------------------


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`segflow schedule IN OUT --cron ...` running in a subprocess, as a user would start it."""
    root = tmp_path_factory.mktemp("served")
    make_images(root / "in", 4)
    out = root / "out"
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "segflow.flows.cli", "schedule", str(root / "in"), str(out), "--cron", "0 2 * * *",
         "--timezone", "Europe/Paris", *RANDOM_FCN_ARGS, "--shard-size", "2", "--max-shards-in-flight", "1", "--no-progress"],
        cwd=REPO, env=prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="1"), stdout=log, stderr=subprocess.STDOUT,
    )
    name = f"segflow-reprocess/{deployment_name(str(out))}"

    def registered():
        from prefect.exceptions import ObjectNotFound

        assert proc.poll() is None, (root / "serve.log").read_text()[-3000:]
        try:
            with client() as c:
                return c.read_deployment_by_name(name)
        except ObjectNotFound:
            return None

    try:
        wait_for(registered, 180, f"deployment {name}")
        yield {"proc": proc, "name": name, "root": root, "out": out, "log": root / "serve.log"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def test_schedule_registers_cron_deployment_limited_to_one_run_per_output(served):
    with client() as c:
        d = c.read_deployment_by_name(served["name"])
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [("0 2 * * *", "Europe/Paris", True)]
    assert d.global_concurrency_limit.limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE"
    assert output_limit_name(str(served["out"])) in d.tags
    assert d.parameters["input"] == str(served["root"] / "in") and d.parameters["output"] == str(served["out"])
    assert d.parameters["model"]["weights"] == "none" and d.parameters["execution"]["shard_size"] == 2


def test_served_runs_process_new_images_one_at_a_time(served):
    from prefect.deployments import run_deployment

    first, second = (run_deployment(served["name"], timeout=0) for _ in range(2))
    runs = [_wait_final(r.id, 300, served["log"]) for r in (first, second)]
    assert all(r.state.is_completed() for r in runs), [r.state.message for r in runs]
    assert len(pq.read_table(served["out"] / "masks")) == 4  # once, not twice
    early, late = sorted(runs, key=lambda r: r.start_time)
    assert early.end_time <= late.start_time  # the deployment's limit of 1 queued the second run
    with client() as c:
        assert "AwaitingConcurrencySlot" in [s.name for s in c.read_flow_run_states(late.id)]


def test_cancelling_a_served_run_stops_ray_and_releases_the_output(served):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    wait_for(lambda: not _ray_processes_under(served["proc"].pid), 60, "the previous run's Ray to exit")
    make_images(served["root"] / "in", 16, start=100)  # 8 new shards of 2, one at a time: time to cancel mid-run
    committed_before = len(list((served["out"] / "masks").iterdir()))

    run = run_deployment(served["name"], timeout=0)

    def running_shards():
        with client() as c:
            tasks = c.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
        # a task run can be listed before it has its first state
        return any(t.name.startswith("run_shards") and t.state is not None and t.state.is_running() for t in tasks)

    wait_for(running_shards, 240, "the served run to reach run_shards")
    ray_pids = wait_for(lambda: _ray_processes_under(served["proc"].pid), 120, "the served run to start Ray", interval=0.2)
    # cancel once shards are committing (a cancel during `ray.init` itself ends Crashed: see flows/stages.py)
    wait_for(lambda: len(list((served["out"] / "masks").iterdir())) > committed_before, 120, "a shard of this run to commit", interval=0.2)
    with client() as c:
        c.set_flow_run_state(run.id, Cancelling(), force=True)
    final = _wait_final(run.id, 120, served["log"])

    assert final.state.is_cancelled(), final.state.message
    wait_for(lambda: not any(_alive(p) for p in ray_pids), 60, f"Ray processes {ray_pids} of the cancelled run to exit")
    masks = sorted((served["out"] / "masks").iterdir())
    assert committed_before < len(masks) < committed_before + 8, "the cancelled run should have stopped part way"
    files = [p for p in served["out"].rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")], "staging files left behind"
    for p in files:
        pq.read_table(p)  # every file there is complete
    with client() as c:
        assert c.read_global_concurrency_limit_by_name(output_limit_name(str(served["out"]))).active_slots == 0


def test_stopping_schedule_pauses_it(served):
    served["proc"].send_signal(signal.SIGINT)
    served["proc"].wait(60)
    with client() as c:
        assert c.read_deployment_by_name(served["name"]).paused


def _wait_final(flow_run_id, timeout: float, log: Path):
    def final():
        with client() as c:
            run = c.read_flow_run(flow_run_id)
        return run if run.state and run.state.is_final() else None

    try:
        return wait_for(final, timeout, f"flow run {flow_run_id} to finish")
    except AssertionError:
        print(log.read_text()[-4000:])
        raise


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return children


def _ray_processes_under(pid: int) -> list[int]:
    """Ray's gcs_server/raylet started by a flow-run process below `pid`, once both exist."""
    children, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            todo.append(c)
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            except OSError:
                continue
            if b"gcs_server" in cmd or b"raylet" in cmd:
                found.append(c)
    return found if len(found) >= 2 else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
