"""No result is removed before its replacement exists; superseded rows move to OUTPUT/history/.

Real runs on real Ray over a few 48x64 pictures; the kills are real SIGKILLs of a real
driver process at chosen points of its commits (after its k-th file write). The model is an
FCN-8s with seeded random weights: its masks are not segmentations, only the bookkeeping is
tested.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.history import history_dataset, pending_records
from segflow.pipeline.reader import read_errors, read_masks
from segflow.pipeline.verify import verify_output
from tests.collection import write_scenes
from tests.ray_cluster import RayCluster

REPO = Path(__file__).resolve().parents[1]


def _config(input, output, model, **kw) -> SegmentConfig:
    return SegmentConfig(input=str(input), output=str(output), model=model, **{"shard_size": 2, "progress": False, **kw})


def _one_row_each(output) -> dict[str, dict]:
    """uri -> its one row through the reader (masks or errors); fails on a duplicate."""
    columns = ["uri", "job_fingerprint"]
    rows = read_masks(str(output), columns=columns).to_pylist() + read_errors(str(output), columns=columns).to_pylist()
    by_uri = {r["uri"]: r for r in rows}
    assert len(by_uri) == len(rows), f"an image has two rows: {sorted(r['uri'] for r in rows)}"
    return by_uri


def test_model_change_moves_superseded_rows_to_history(ray_local, random_fcn, tmp_path):
    images = write_scenes(tmp_path / "in", 4)
    out = tmp_path / "out"
    first = job.run_segment(_config(tmp_path / "in", out, random_fcn))
    old = {r["uri"]: r for r in read_masks(str(out)).to_pylist()}
    assert first.masks == 4

    other = _config(tmp_path / "in", out, ModelRef(**{**random_fcn.__dict__, "seed": 1}))
    plans = []
    job.run_segment(other, on_plan=plans.append)
    new_fingerprint = plans[0].job_fingerprint

    # plain pyarrow readers of the datasets see only current rows
    current = ds.dataset(str(out / "masks"), format="parquet").to_table(columns=["uri", "job_fingerprint"]).to_pylist()
    assert sorted(r["uri"] for r in current) == sorted(str(p) for p in images)
    assert {r["job_fingerprint"] for r in current} == {new_fingerprint}
    # the previous masks are in history, whole, with when and by what they were superseded
    history = history_dataset(str(out)).to_table().to_pylist()
    assert sorted(r["uri"] for r in history) == sorted(old)
    for row in history:
        assert row["superseded_by"] == new_fingerprint and row["superseded_at"] is not None
        assert row["mask"] == old[row["uri"]]["mask"] and row["job_fingerprint"] == old[row["uri"]]["job_fingerprint"]
    assert pending_records(str(out)) == []
    assert verify_output(str(out), str(tmp_path / "in")) == []


def test_a_run_failing_on_every_image_keeps_the_previous_masks(ray_local, random_fcn, tmp_path):
    from tests.test_faults import TaskKiller

    write_scenes(tmp_path / "in", 3)
    out = tmp_path / "out"
    cfg = _config(tmp_path / "in", out, random_fcn, shard_size=4, max_shard_attempts=1)
    job.run_segment(cfg)
    before = {r["uri"]: r for r in read_masks(str(out), columns=["uri", "mask", "job_fingerprint"]).to_pylist()}

    changed = cfg.with_(crf_params=(("iterations", 2),))
    plan = job.plan_stage(changed, job.list_stage(changed))
    assert plan.to_process == 3 and len(plan.shards) == 1
    with TaskKiller([f"infer_shard shard-{plan.shards[0].shard_id}"], limit=None) as killer:
        summary = job.summarise_stage(changed, plan, job.run_stage(changed, plan))
    assert killer.killed, "the model actor was never seen serving the shard"
    assert summary.errors == 3  # the run says it failed on them ...
    after = {r["uri"]: r for r in read_masks(str(out), columns=["uri", "mask", "job_fingerprint"]).to_pylist()}
    assert after == before  # ... and every image keeps its previous mask, not an error row
    assert len(read_errors(str(out))) == 0
    assert verify_output(str(out), str(tmp_path / "in")) == []
    assert job.plan_stage(changed, job.list_stage(changed)).to_process == 3  # and the next run tries them again


# A driver for the engine API that runs jobs one after another, each "OUTPUT:SEED:K", and
# SIGKILLs itself right after a job's K-th file write (K = 0: never). Every commit, history
# copy and rewrite goes through storage._replace_local. Jobs without a kill share one
# process (a Python start, imports and a Ray connection each fewer).
_KILLED_DRIVER = """
import os, signal, sys
from segflow.pipeline import job, storage
from segflow.pipeline.config import ModelRef, SegmentConfig
replace = storage._replace_local
writes, kill_after = [0], [0]
def counted(path, data):
    replace(path, data)
    writes[0] += 1
    if writes[0] == kill_after[0]:
        os.kill(os.getpid(), signal.SIGKILL)
storage._replace_local = counted
for spec in sys.argv[3:]:
    output, seed, kill = spec.rsplit(":", 2)
    writes[0], kill_after[0] = 0, int(kill)
    # one model actor: the jobs are tiny, and a second would only cost another torch import
    cfg = SegmentConfig(input=sys.argv[1], output=output, shard_size=2, progress=False, ray_address=sys.argv[2], model_actors=1,
                        model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=int(seed)))
    summary = job.run_segment(cfg)
    print(output, "writes", writes[0], "masks", summary.masks, flush=True)
"""

# Writes of a 4-image reprocess in 2 shards, each superseding one old shard of 2 masks (its errors
# file is empty, so it is not rewritten): staged rows, record.json, errors, masks (the commit),
# history copy, old masks file rewritten; 6 per shard. Without the fix, the first writes were
# the old files rewritten without their rows, and a kill there lost those images' rows.
_WRITES = 12
_KILL_POINTS = {
    2: "record staged, its shard not committed",
    4: "first new shard committed, nothing moved yet",
    5: "history written, old files untouched",
    6: "old masks file rewritten, record not yet removed",
}


def test_sigkill_during_a_reprocess_never_loses_or_duplicates_a_row(tmp_path):
    images = write_scenes(tmp_path / "in", 4)
    uris = sorted(str(p) for p in images)
    base = tmp_path / "base"
    cluster = RayCluster()
    env = cluster.env

    def drive(*jobs: tuple[Path, int, int]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _KILLED_DRIVER, str(tmp_path / "in"), cluster.address, *(f"{o}:{s}:{k}" for o, s, k in jobs)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )

    try:
        cluster.start_head(num_cpus=2)
        made = drive((base, 0, 0))
        assert made.returncode == 0, made.stderr
        old_fingerprint = {r["job_fingerprint"] for r in _one_row_each(base).values()}
        shutil.copytree(base, tmp_path / "full")
        outputs = {kill_after: tmp_path / f"out-{kill_after}" for kill_after in _KILL_POINTS}
        for out in outputs.values():
            shutil.copytree(base, out)
        for kill_after, where in _KILL_POINTS.items():
            out = outputs[kill_after]
            killed = drive((out, 1, kill_after))
            assert killed.returncode == -signal.SIGKILL, f"not killed after write {kill_after} ({where}): {killed.stdout}{killed.stderr}"
            rows = _one_row_each(out)
            assert sorted(rows) == uris, f"killed after write {kill_after} ({where}): images lost their row"
            if kill_after == 2:
                assert {r["job_fingerprint"] for r in rows.values()} == old_fingerprint

        # the reprocess without a kill, to count its writes; then each killed reprocess, run again
        resumed = drive((tmp_path / "full", 1, 0), *((out, 1, 0) for out in outputs.values()))
        assert resumed.returncode == 0, resumed.stderr
        assert f"{tmp_path / 'full'} writes {_WRITES} masks 4" in resumed.stdout, resumed.stdout  # the kill points hold
        for kill_after, where in _KILL_POINTS.items():
            out = outputs[kill_after]
            assert verify_output(str(out), str(tmp_path / "in")) == [], f"after the kill at write {kill_after} ({where})"
            current = ds.dataset(str(out / "masks"), format="parquet").to_table(columns=["uri"]).column("uri").to_pylist()
            assert sorted(current) == uris  # the plain Parquet dataset: exactly one row per image
            history = history_dataset(str(out)).to_table(columns=["uri"]).column("uri").to_pylist()
            assert sorted(history) == uris, f"after the kill at write {kill_after} ({where}): history {sorted(history)}"
            assert not (out / "_replacing").exists() or not any((out / "_replacing").iterdir())
    finally:
        cluster.stop()


def test_verify_repair_finishes_an_interrupted_replacement_without_a_run(tmp_path):
    """`segflow verify --repair`: what the next run would do first, with no model and no Ray."""
    from segflow.pipeline.commit import commit_shard
    from segflow.pipeline.history import Replacer
    from segflow.pipeline.state import read_existing

    out = str(tmp_path / "out")
    row = {"uri": "/x/a.png", "key": "1-1", "height": 1, "width": 1, "job_fingerprint": "old"}
    commit_shard(out, "a" * 16, [{**row, "shard_id": "a" * 16}], [], None, {})
    replacer = Replacer(out, read_existing(out), "new")
    new = {**row, "shard_id": "b" * 16, "job_fingerprint": "new"}

    def commit_then_die(masks, errors, metrics):
        commit_shard(out, "b" * 16, masks, errors, metrics, {})
        raise KeyboardInterrupt  # stands in for the kill between the commit and the move to history

    with pytest.raises(KeyboardInterrupt):
        replacer.commit("b" * 16, [new], [], None, commit_then_die)
    assert [r["job_fingerprint"] for r in read_masks(out).to_pylist()] == ["new"]  # the reader: one row, the new one
    assert len(ds.dataset(f"{out}/masks", format="parquet").to_table()) == 2  # plain files: both, until repaired
    assert any("interrupted replacement" in p for p in verify_output(out))

    cli = subprocess.run([sys.executable, "-m", "segflow.flows.cli", "verify", out, "--repair"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "finished 1 interrupted replacement" in cli.stdout
    assert ds.dataset(f"{out}/masks", format="parquet").to_table(columns=["job_fingerprint"]).column(0).to_pylist() == ["new"]
    assert history_dataset(out).to_table(columns=["uri", "superseded_by"]).to_pylist() == [{"uri": "/x/a.png", "superseded_by": "new"}]

    cli = subprocess.run([sys.executable, "-m", "segflow.flows.cli", "verify", out, "--prune-history"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 0 and "deleted 1 history file" in cli.stdout, cli.stdout + cli.stderr
    assert history_dataset(out) is None
