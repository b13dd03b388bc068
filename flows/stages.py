"""The Prefect tasks: one per engine stage, never one per image or shard.

A flow run records five or six task runs however large the collection: list, plan,
run shards, summarise, (aggregate metrics), publish. What happened to each image and
shard lives in segflow's own Parquet outputs, where reprocessing reads it back; the
Prefect database stays small and the UI readable. (This is also why segflow does not
use prefect-ray's RayTaskRunner: see docs/flows.md.)

Retries are declared here, where the side effects are known:

- listing, planning and aggregating read (and, for aggregation, rewrite) storage and
  are idempotent, so they retry with exponential backoff on errors that can heal
  (network, storage); a bad option or an empty input fails at once;
- running shards does not retry as a task: the engine already retries each shard
  (`max_shard_attempts`), and a rerun of the flow resumes from the committed shards.

No task caches or persists results (`NO_CACHE`, `persist_result=False`): whether work
is up to date is the engine's decision, made from fingerprints stored beside the
masks, not Prefect's.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.logging import get_run_logger

from segflow.flows.artifacts import publish_evaluation, publish_plan, publish_run
from segflow.flows.locking import output_lock
from segflow.pipeline import job
from segflow.pipeline.cluster import connect
from segflow.pipeline.config import SegmentConfig
from segflow.errors import IncompleteRunError
from segflow.pipeline.storage import redact



@dataclass
class JobResult:
    plan: job.Plan
    summary: job.RunSummary | None  # None for a dry run
    evaluation: dict | None  # finish_evaluation's summary when cfg.evaluation is set


def run_job(cfg: SegmentConfig, flow: str, wait_for_output_seconds: float | None = None, dry_run: bool = False) -> JobResult:
    """list -> plan -> run -> summarise [-> aggregate] -> publish, as task runs of the calling flow.

    Everything that reads or writes OUTPUT happens under its lock (flows/locking.py).
    A dry run only lists and plans, publishes the plan, and takes no lock.

    Raises IncompleteRunError, once the report is published, when some images failed for
    reasons not their own (their rows do not count as done), so that the flow run ends
    Failed, not Completed; a job that stopped early has raised already.
    """
    if dry_run:
        plan = plan_work(cfg, list_inputs(cfg))
        publish_plan(plan.describe(), cfg.output, flow)
        return JobResult(plan, None, None)
    with output_lock(cfg.output, wait_for_output_seconds, cfg.storage_options):
        plan = plan_work(cfg, list_inputs(cfg))
        stats = run_shards(cfg, plan)
        summary = summarise_run(cfg, plan, stats)
        evaluation = aggregate_metrics(cfg, plan) if cfg.evaluation is not None else None
    publish_report(summary, cfg.output, flow, plan, evaluation)
    if summary.errors_to_retry:
        raise IncompleteRunError(
            f"{summary.errors_to_retry} of {summary.images_total} images failed for reasons that are not theirs "
            f"(see errors/ in {redact(cfg.output)}, stage shard/infer/refine); rerun the same command to retry them",
            summary=summary,
        )
    return JobResult(plan, summary, evaluation)


# No task retries: every storage call inside these tasks is already retried by
# segflow.storage.with_retries (the one retry layer; a StorageError means it gave up), and
# segflow's other errors do not change on retry.
_storage_task = task(cache_policy=NO_CACHE, persist_result=False)
_plain_task = task(cache_policy=NO_CACHE, persist_result=False)


@_storage_task
def list_inputs(cfg: SegmentConfig):
    """The manifest: one row per input image (uri, size, version, key[, label_uri])."""
    manifest = job.list_stage(cfg)
    get_run_logger().info("%d images under %s", len(manifest), redact(cfg.input))
    return manifest


@_storage_task
def plan_work(cfg: SegmentConfig, manifest) -> job.Plan:
    """Compare the manifest with what OUTPUT holds; cut what is new, changed or refingerprinted into shards."""
    plan = job.plan_stage(cfg, manifest)
    get_run_logger().info("plan: %s", plan.describe())
    return plan


@_plain_task
def run_shards(cfg: SegmentConfig, plan: job.Plan):
    """Join Ray (cfg.ray_address, or a local Ray), run the planned shards, commit each as it finishes.

    Cancelling the flow run ends here. Prefect's runner sends the flow-run process
    SIGTERM, which Prefect turns into a `TerminationSignal` raised in the main thread,
    where the engine waits on Ray; we then shut the Ray driver down before the
    exception propagates: a local Ray started for this run stops with it, and on a
    remote cluster Ray kills the actors and tasks this driver owns. Shards that had
    not committed leave no file that looks complete (commits are atomic renames/PUTs).

    `ray.init` installs its own SIGTERM handler (`sys.exit(15)`), which would turn a
    cancellation into a crash: Prefect recognises only its TerminationSignal. So the
    handler Prefect installed is put back once Ray is connected, and a SIGTERM that
    lands while `ray.init` runs (SystemExit(15)) is re-raised as TerminationSignal.
    During those few seconds Prefect's runner cannot deliver its cancel intent (the
    child only acknowledges it while Prefect's handler is installed), so a cancel that
    lands then ends the run Crashed rather than Cancelled; Ray is stopped and the
    OUTPUT lock released all the same.
    """
    try:
        if plan.shards:  # the engine starts no Ray when there is nothing to run; neither do we
            with _sigterm_handler_kept():
                connect(cfg.ray_address)
        return job.run_stage(cfg, plan)
    except BaseException as exc:
        if not isinstance(exc, Exception):  # TerminationSignal (cancel), KeyboardInterrupt, SystemExit
            stop_ray_driver()
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            raise TerminationSignal(signal.SIGTERM) from None
        raise


@_plain_task
def summarise_run(cfg: SegmentConfig, plan: job.Plan, stats) -> job.RunSummary:
    summary = job.summarise_stage(cfg, plan, stats)
    get_run_logger().info("%s", summary.describe())
    return summary


@_storage_task
def aggregate_metrics(cfg: SegmentConfig, plan: job.Plan) -> dict:
    """Merge OUTPUT/metrics into summary.json/.parquet and report.html (idempotent: rewrites them)."""
    return job.finish_evaluation(cfg, plan)


@_plain_task
def publish_report(summary: job.RunSummary, output: str, flow: str, plan: job.Plan, evaluation: dict | None = None) -> None:
    """The run's artifacts: counts and throughput; for evaluations mIoU raw vs CRF and the report link."""
    publish_run(summary.to_dict(), output, flow, plan.describe())
    if evaluation is not None:
        publish_evaluation(evaluation, list(plan.labels.get("classes", [])), output)


def stop_ray_driver() -> None:
    """Disconnect this process from Ray, stopping a local Ray it started, even half-started.

    `ray.shutdown` also kills the node processes of an interrupted `ray.init`, which
    `ray.is_initialized()` does not report yet. A no-op if Ray was never imported.
    """
    ray = sys.modules.get("ray")
    if ray is not None:
        ray.shutdown()


@contextlib.contextmanager
def _sigterm_handler_kept():
    """Restore the SIGTERM handler that was installed before the block (signals live in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
