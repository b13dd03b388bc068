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
from segflow.flows.parameters import Execution, Refinement, run_name, segment_config
from segflow.flows.stages import run_job
from segflow.pipeline.config import ModelRef
from segflow.pipeline.job import RunSummary


@flow(name="segflow-reprocess", flow_run_name=run_name("reprocess"), validate_parameters=True)
def reprocess_flow(
    input: str,
    output: str,
    model: ModelRef = ModelRef(),
    refinement: Refinement = Refinement(),
    ray_address: str | None = None,
    execution: Execution = Execution(),
    prune: bool = False,
    retry_errors: bool = False,
    content_hash: bool = False,
    force: bool = False,
    dry_run: bool = False,
    storage_secret: str | None = None,
    wait_for_output_seconds: float | None = None,
) -> RunSummary | None:
    """Process what changed under `input` since `output` was last written.

    Args:
        input, output, model, refinement, ray_address, execution, prune,
        retry_errors, content_hash, force, storage_secret, wait_for_output_seconds:
            as for segflow-segment. Changing `model` or `refinement` here reprocesses every
            image whose masks carry the old fingerprint.
        dry_run: list and plan only; publish what would be processed, write nothing.

    After a run that replaced masks, the images it replaced are diffed against their
    previous versions in OUTPUT/history (OUTPUT/changes/, and artifacts: flows/changes.py).

    Returns the run summary, or None for a dry run.
    """
    cfg = segment_config(
        input, output, model=model, refinement=refinement, ray_address=ray_address,
        execution=execution, force=force, prune=prune, retry_errors=retry_errors, content_hash=content_hash,
        storage_secret=storage_secret,
    )
    started = datetime.now(timezone.utc)
    result = run_job(cfg, "reprocess", wait_for_output_seconds, dry_run=dry_run)
    if result.summary is not None and result.summary.masks:  # what the replaced masks were, and what changed
        report_changes(cfg, result.plan.job_fingerprint, started)
    return result.summary
