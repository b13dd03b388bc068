"""What a reprocess changed: the images it replaced, diffed against their previous masks, as artifacts.

After a run that replaced masks, the rows it superseded sit in OUTPUT/history/ (tagged with
its job fingerprint and time). This task compares exactly those images' new masks with
them (`segflow.pipeline.diff`), writes OUTPUT/changes/ (the DIFF layout: images/, summary,
report.html; each run overwrites it, while Prefect keeps every night's artifact), and
publishes the numbers. Without history, or when the run replaced nothing, it says so in the
log and publishes nothing. A failure here is logged and does not fail the run: the masks
are committed and correct; only the report of what changed is missing.
"""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from segflow.errors import SegflowError
from segflow.flows.artifacts import publish_changes
from segflow.pipeline.config import SegmentConfig
from segflow.pipeline.diff import diff_outputs
from segflow.pipeline.previous import Replacement, has_history
from segflow.pipeline.diff_report import write_diff_report
from segflow.pipeline.storage import redact

CHANGES = "changes"


@task(cache_policy=NO_CACHE, persist_result=False)
def report_changes(cfg: SegmentConfig, job_fingerprint: str, started: datetime) -> dict | None:
    """Diff the images this run (`job_fingerprint`, begun at `started`, UTC) replaced; publish; -> the summary or None."""
    log = get_run_logger()
    if not has_history(cfg.output, cfg.storage_options):
        log.info("no OUTPUT/history yet: nothing to compare this run's masks with")
        return None
    target = f"{cfg.output.rstrip('/')}/{CHANGES}"
    try:
        summary = diff_outputs(cfg.output, target, storage_options=cfg.storage_options,
                               replaced_by=Replacement(job_fingerprint, started))
        if not summary["images_compared"]:
            log.info("this run replaced no mask that has a previous version: nothing changed to report")
            return None
        report = write_diff_report(target, summary, cfg.output, storage_options=cfg.storage_options)
    except (SegflowError, OSError) as exc:
        log.warning("could not compare this run's masks with their previous versions: %s", redact(str(exc)))
        return None
    publish_changes(summary, report, cfg.output)
    log.info("changed %.2f %% of pixels over %d replaced images; report: %s",
             summary["changed_fraction"] * 100, summary["images_compared"], redact(report))
    return summary
