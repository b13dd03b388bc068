"""`reprocess_flow`: bring an existing OUTPUT up to date with INPUT; the flow that runs nightly.

It runs the same stages as `segment_flow`; the engine's plan decides what is stale:
images added or changed since the last run, images whose masks were made with another
model or CRF fingerprint, and (with `prune`) rows of images deleted from INPUT. What
this flow adds is the scheduled-job surface: a `dry_run` that only publishes the plan,
and defaults suited to unattended runs (no progress bars, wait for a run still writing
OUTPUT instead of failing). `flows/deploy.py` puts it on a cron schedule.
"""

from datetime import datetime, timezone

from prefect import flow

from segflow.flows.changes import report_changes
from segflow.flows.parameters import Execution, Incremental, JobSpec, Refinement, Storage, run_name
from segflow.flows.stages import run_job
from segflow.pipeline.config import ModelRef
from segflow.pipeline.job import RunSummary


@flow(name="segflow-reprocess", flow_run_name=run_name("reprocess"), validate_parameters=True)
def reprocess_flow(
    input: str,
    output: str,
    model: ModelRef = ModelRef(),
    refinement: Refinement = Refinement(),
    execution: Execution = Execution(),
    incremental: Incremental = Incremental(),
    storage: Storage = Storage(),
    dry_run: bool = False,
    wait_for_output_seconds: float | None = None,
) -> RunSummary | None:
    """Process what changed under `input` since `output` was last written.

    Args:
        input, output, model, refinement, execution, incremental, storage, wait_for_output_seconds:
            as for segflow-segment. Changing `model` or `refinement` here reprocesses every
            image whose masks carry the old fingerprint.
        dry_run: list and plan only; publish what would be processed, write nothing.

    After a run that replaced masks, the images it replaced are diffed against their
    previous versions in OUTPUT/history (OUTPUT/changes/, and artifacts: flows/changes.py).

    Returns the run summary, or None for a dry run.
    """
    cfg = JobSpec(input=input, output=output, model=model, refinement=refinement, execution=execution, incremental=incremental, storage=storage).to_config()
    started = datetime.now(timezone.utc)
    result = run_job(cfg, "reprocess", wait_for_output_seconds, dry_run=dry_run)
    if result.summary is not None and result.summary.masks:  # what the replaced masks were, and what changed
        report_changes(cfg, result.plan.job_fingerprint, started)
    return result.summary
