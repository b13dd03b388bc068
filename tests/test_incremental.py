"""Incremental runs into an existing OUTPUT: only what is new, changed or stale is redone.

Every run here is a real run on the session's local Ray (or, for no-op runs, on no Ray
at all) over a few 48x64 pictures, and every step ends with `verify_output(OUTPUT,
INPUT)`, the check behind `segflow verify OUTPUT INPUT`. The model is an FCN-8s with
seeded random weights: its masks are not segmentations, only the bookkeeping is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from segflow.pipeline import job
from segflow.pipeline.commit import commit_shard
from segflow.pipeline.config import CRFParams, ModelRef, SegmentConfig
from segflow.pipeline.reader import read_errors, read_masks
from segflow.pipeline.verify import verify_output
from tests.collection import write_scene, write_scenes

REPO = Path(__file__).resolve().parents[1]


def _config(input, output, model, **kw) -> SegmentConfig:
    return SegmentConfig(input=str(input), output=str(output), model=model, **{"shard_size": 2, "progress": False, **kw})


def _run(cfg: SegmentConfig) -> tuple[job.Plan, job.RunSummary]:
    plans = []
    summary = job.run_segment(cfg, on_plan=plans.append)
    return plans[0], summary


def _planned(plan: job.Plan) -> set[str]:
    return {uri for shard in plan.shards for uri in shard.uris}


def _rows(output) -> dict[str, dict]:
    """uri -> its one row (masks or errors); fails on a duplicate."""
    columns = ["uri", "key", "shard_id", "job_fingerprint", "crf_fingerprint"]
    rows = read_masks(str(output), columns=[*columns, "mask"]).to_pylist() + read_errors(str(output), columns=columns).to_pylist()
    by_uri = {r["uri"]: r for r in rows}
    assert len(by_uri) == len(rows), "an image has two rows"
    return by_uri


def _assert_consistent(output, input) -> None:
    assert verify_output(str(output), str(input)) == []


def test_rerun_processes_only_new_and_changed_images(ray_local, random_fcn, tmp_path):
    images = write_scenes(tmp_path / "in", 6)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    _, first = _run(cfg)
    assert (first.masks, first.errors) == (6, 0)
    _assert_consistent(tmp_path / "out", tmp_path / "in")
    before = _rows(tmp_path / "out")

    added = write_scene(tmp_path / "in" / "img_06.png", 200)
    changed = write_scene(images[1], 201, (40, 56))  # new bytes and a new size
    touched = images[4]  # same bytes, newer mtime: a re-upload looks like this to size+mtime keys
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    plan, second = _run(cfg)

    redone = {str(added), str(changed), str(touched)}
    assert _planned(plan) == redone
    assert (second.masks, second.errors, second.up_to_date, second.images_total) == (3, 0, 4, 7)
    _assert_consistent(tmp_path / "out", tmp_path / "in")
    after = _rows(tmp_path / "out")
    for uri in set(before) - redone:  # untouched images keep their row exactly
        assert after[uri] == before[uri]
    for uri in redone - {str(added)}:
        assert after[uri]["key"] != before[uri]["key"]

    plan, idle = _run(cfg)
    assert plan.describe() == "nothing to do: all 7 images are up to date"
    assert (idle.masks, idle.errors, idle.up_to_date) == (0, 0, 7)


def _rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """New pixels, same byte count (an uncompressed BMP of the same shape), old mtime restored."""
    st = path.stat()
    write_scene(path, seed)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_same_mtime_change_is_seen_only_with_content_hash(ray_local, random_fcn, tmp_path):
    images = write_scenes(tmp_path / "in", 4, suffix=".bmp")
    by_stat = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    _run(by_stat)

    # size+mtime keys cannot see this edit: that is what --content-hash is for
    _rewrite_keeping_size_and_mtime(images[2], 300)
    plan, _ = _run(by_stat)
    assert plan.describe() == "nothing to do: all 4 images are up to date"

    # switching the key kind redoes everything once (keys of a different kind never match)
    by_hash = by_stat.with_(content_hash=True)
    plan, summary = _run(by_hash)
    assert plan.to_process == 4 and summary.masks == 4
    assert all(r["key"].startswith("sha256:") for r in _rows(tmp_path / "out").values())
    _assert_consistent(tmp_path / "out", tmp_path / "in")

    _rewrite_keeping_size_and_mtime(images[0], 301)
    st = images[3].stat()  # and a touch: same bytes, new mtime
    os.utime(images[3], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    plan, summary = _run(by_hash)
    assert _planned(plan) == {str(images[0])}
    assert (summary.masks, summary.up_to_date) == (1, 3)
    _assert_consistent(tmp_path / "out", tmp_path / "in")


def test_model_or_crf_change_reprocesses_everything(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 4)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    plan, _ = _run(cfg)
    first_shards = {s.shard_id for s in plan.shards}

    other_crf = cfg.with_(crf_params=(('iterations', 2),))
    plan, summary = _run(other_crf)
    assert (plan.to_process, summary.masks, summary.up_to_date) == (4, 4, 0)
    assert {s.shard_id for s in plan.shards}.isdisjoint(first_shards)
    rows = _rows(tmp_path / "out")
    assert {r["crf_fingerprint"] for r in rows.values()} == {CRFParams(iterations=2).fingerprint()}
    _assert_consistent(tmp_path / "out", tmp_path / "in")  # also: no mixed fingerprints

    other_model = other_crf.with_(model=ModelRef(**{**random_fcn.__dict__, "seed": 1}))
    plan, summary = _run(other_model)
    assert (plan.to_process, summary.masks, summary.up_to_date) == (4, 4, 0)
    assert {r["job_fingerprint"] for r in _rows(tmp_path / "out").values()} == {plan.job_fingerprint}
    _assert_consistent(tmp_path / "out", tmp_path / "in")


def test_force_reprocesses_everything_into_the_same_shards(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 4)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    _run(cfg)
    files = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    plan, summary = _run(cfg.with_(force=True))
    assert (plan.to_process, summary.masks, summary.up_to_date) == (4, 4, 0)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == files
    assert len(_rows(tmp_path / "out")) == 4
    _assert_consistent(tmp_path / "out", tmp_path / "in")


def test_deleted_images_are_reported_and_removed_only_with_prune(ray_local, random_fcn, tmp_path):
    images = write_scenes(tmp_path / "in", 5)
    cfg = _config(tmp_path / "in", tmp_path / "out", random_fcn)
    _run(cfg)
    images[3].unlink()

    plan, summary = _run(cfg)
    assert plan.deleted == [str(images[3])] and summary.deleted == 1
    assert not plan.shards and "1 deleted from the source (kept; --prune removes them)" in plan.describe()
    assert str(images[3]) in _rows(tmp_path / "out")
    problems = verify_output(str(tmp_path / "out"), str(tmp_path / "in"))
    assert problems == [f"{images[3]}: has a row but is no longer in INPUT (rerun with --prune to remove it)"]

    plan, summary = _run(cfg.with_(prune=True))
    assert "1 deleted from the source (pruning)" in plan.describe()
    assert (summary.masks, summary.pruned, summary.up_to_date) == (0, 1, 4)
    assert set(_rows(tmp_path / "out")) == {str(p) for p in images if p != images[3]}
    _assert_consistent(tmp_path / "out", tmp_path / "in")

    plan, _ = _run(cfg.with_(prune=True))
    assert plan.deleted == [] and plan.describe() == "nothing to do: all 4 images are up to date"
    cli = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "verify", str(tmp_path / "out"), str(tmp_path / "in")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr


_NOOP_DRIVER = """
import json, sys, time
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
t0 = time.perf_counter()
plans = []
cfg = SegmentConfig(input=sys.argv[1], output=sys.argv[2], shard_size=2, progress=False,
                    model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0))
summary = job.run_segment(cfg, on_plan=plans.append)
ray = sys.modules.get("ray")
print(json.dumps({
    "describe": plans[0].describe(), "masks": summary.masks, "seconds": time.perf_counter() - t0,
    "ray_imported": ray is not None, "ray_initialized": bool(ray and ray.is_initialized()),
}))
"""


def test_noop_run_says_so_and_starts_no_ray(ray_local, random_fcn, tmp_path):
    write_scenes(tmp_path / "in", 3)
    _run(_config(tmp_path / "in", tmp_path / "out", random_fcn))
    # A fresh interpreter, so the session's Ray does not hide whether this run started one.
    result = subprocess.run(
        [sys.executable, "-c", _NOOP_DRIVER, str(tmp_path / "in"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["describe"] == "nothing to do: all 3 images are up to date"
    assert report["masks"] == 0
    assert not report["ray_initialized"] and not report["ray_imported"]
    assert report["seconds"] < 30  # loose: imports torch for the model fingerprint; no Ray start


_NOOP_CLI = """
import json, sys
from segflow.flows.cli import main
code = main(["segment", *sys.argv[1:], "--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11",
             "--shard-size", "2", "--no-progress"])
print(json.dumps({"code": code, "prefect_imported": "prefect" in sys.modules, "ray_imported": "ray" in sys.modules}))
"""


def test_noop_cli_rerun_decides_before_prefect_or_ray_start(ray_local, random_fcn, tmp_path):
    """`segflow segment` with nothing to do answers from the plan: no Prefect server, no flow run, no Ray."""
    images = write_scenes(tmp_path / "in", 3)
    _run(_config(tmp_path / "in", tmp_path / "out", random_fcn))
    rerun = [sys.executable, "-c", _NOOP_CLI, str(tmp_path / "in"), str(tmp_path / "out")]
    result = subprocess.run(rerun, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    *lines, report = result.stdout.strip().splitlines()
    assert json.loads(report) == {"code": 0, "prefect_imported": False, "ray_imported": False}
    assert lines[-1].startswith("segflow: 0 masks, 0 errors, 3 up to date (3 images)")

    images[0].unlink()  # a deletion is reported, and still nothing runs without --prune
    result = subprocess.run(rerun, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "1 deleted from the source (kept; --prune removes them)" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["prefect_imported"] is False


def test_noop_plan_over_20k_entry_manifest_is_fast(random_fcn, tmp_path):
    n = 20_000
    uris = [f"/data/street/{i // 1000:02d}/img_{i:05d}.png" for i in range(n)]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({
        "uri": uris,
        "size": pa.array([40_000 + i % 977 for i in range(n)], pa.int64()),
        "mtime": pa.array([1_700_000_000_000_000_000 + i for i in range(n)], pa.int64()),
    }), manifest)
    cfg = _config(manifest, tmp_path / "out", random_fcn, shard_size=256)

    # A real OUTPUT holding a row for every entry, committed shard by shard as the engine does.
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    assert plan.to_process == n
    fingerprints = {"job_fingerprint": plan.job_fingerprint, "model_fingerprint": plan.model_fingerprint,
                    "crf_fingerprint": plan.refinement.fingerprint()}
    for shard in plan.shards:
        rows = [{"uri": u, "key": k, "shard_id": shard.shard_id, "height": 48, "width": 64, **fingerprints}
                for u, k in zip(shard.uris, shard.keys)]
        commit_shard(cfg.output, shard.shard_id, rows, [], None, fingerprints)

    t0 = time.perf_counter()
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    seconds = time.perf_counter() - t0
    assert plan.describe() == f"nothing to do: all {n} images are up to date"
    assert seconds < 10, f"list+plan of a {n}-entry no-op took {seconds:.1f} s"  # 0.7 s measured on 2 busy cores
    assert verify_output(cfg.output, str(manifest)) == []


def test_has_committed_shards_sees_only_commit_markers(tmp_path):
    """It decides whether the CLI may start Ray before planning: a first run into OUTPUT always has work."""
    from segflow.pipeline.state import has_committed_shards

    out = tmp_path / "out"
    assert not has_committed_shards(str(out))
    (out / "masks").mkdir(parents=True)
    (out / "masks" / ".staging-shard-0123456789abcdef.parquet").write_bytes(b"half")
    (out / "errors").mkdir()
    (out / "errors" / "shard-0123456789abcdef.parquet").write_bytes(b"x")  # an interrupted commit: no masks marker
    assert not has_committed_shards(str(out))
    (out / "masks" / "shard-0123456789abcdef.parquet").write_bytes(b"x")
    assert has_committed_shards(str(out))


def test_readers_skip_the_files_of_an_interrupted_commit(tmp_path):
    """A run killed between a shard's errors file and its masks file (the commit marker) leaves
    an errors file whose images are not done: readers must not show its rows as results."""
    out = str(tmp_path / "out")
    row = {"uri": "a.png", "key": "1-1", "shard_id": "a" * 16, "stage": "decode", "reason": "truncated", "attempts": 1}
    commit_shard(out, "a" * 16, [], [row], None, {})
    interrupted = tmp_path / "out" / "errors" / f"shard-{'b' * 16}.parquet"
    interrupted.write_bytes((tmp_path / "out" / "errors" / f"shard-{'a' * 16}.parquet").read_bytes())

    assert read_errors(out, columns=["shard_id"]).column("shard_id").to_pylist() == ["a" * 16]
    assert any("interrupted commit" in p for p in verify_output(out))  # still reported, until the next run removes it


def test_ctrl_c_during_a_commit_lands_once_the_marker_is_written(tmp_path, monkeypatch):
    import signal

    import pytest

    from segflow.pipeline import commit

    write_table = commit._commit_table

    def interrupted_after_errors(url, *args):
        write_table(url, *args)
        if "/errors/" in url:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the errors file and the masks file
            time.sleep(0.2)  # where a handler would run

    monkeypatch.setattr(commit, "_commit_table", interrupted_after_errors)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # still delivered, after the commit
        commit_shard(str(out), "a" * 16, [], [], None, {})
    assert (out / "masks" / f"shard-{'a' * 16}.parquet").exists()
    assert verify_output(str(out)) == []
