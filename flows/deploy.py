"""Nightly reprocessing as a Prefect deployment, served from one command (`segflow schedule`).

`reprocess_deployment` builds the deployment; `serve_reprocessing` registers it with the
Prefect server and then runs its scheduled runs in this process until stopped
(Ctrl-C/SIGTERM; the schedule is paused on the way out unless asked not to). The same
deployment can be made without Python through `prefect deploy` and the repo's
prefect.yaml, for a work pool and worker instead of a serving process.

Two runs never write one OUTPUT at once, at two levels:

- the deployment's own `concurrency_limit` of 1 (strategy ENQUEUE): the server holds
  tonight's run in the queue while last night's still runs, before any process starts;
- the per-OUTPUT global concurrency limit every segflow flow takes while it lists and
  writes (flows/locking.py). This one also covers other deployments and ad-hoc runs
  into the same OUTPUT, which a deployment's limit cannot see.

A schedule needs a Prefect server (`prefect server start`, PREFECT_API_URL set): the
throwaway API Prefect starts when none is configured runs no scheduler, so the
deployment would never fire.
"""

from __future__ import annotations

import hashlib

from pydantic_core import to_jsonable_python

from segflow.flows.locking import canonical_output, output_limit_name, prefect_server_configured
from segflow.flows.parameters import Storage, flow_parameters
from segflow.pipeline.config import SegmentConfig
from segflow.errors import ConfigError
from segflow.pipeline.storage import redact

DEFAULT_TIMEZONE = "UTC"
TAGS = ("segflow", "segflow-reprocess")


def deployment_name(output: str) -> str:
    """`reprocess-<last segment>-<hash>`: one deployment per OUTPUT, so scheduling it again updates it."""
    canonical = canonical_output(output)
    tail = "".join(c if c.isalnum() or c in "-_." else "-" for c in canonical.rsplit("/", 1)[-1])[:40]
    return f"reprocess-{tail}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def reprocess_deployment(
    cfg: SegmentConfig,
    cron: str,
    timezone: str = DEFAULT_TIMEZONE,
    name: str | None = None,
    storage_secret: str | None = None,
    dry_run: bool = False,
):
    """The RunnerDeployment of `reprocess_flow` for `cfg`'s INPUT and OUTPUT on a cron schedule.

    Every parameter is pinned in the deployment (not left to the flow's defaults), so
    upgrading segflow never changes what a scheduled job does by itself.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from segflow.flows.reprocess import reprocess_flow

    if cfg.evaluation is not None:
        raise ConfigError("scheduled runs reprocess masks; schedule evaluations with prefect.yaml and segflow-evaluate")
    if cfg.storage_options:
        raise ConfigError(
            "storage options would be stored in the deployment's parameters; "
            "use environment credentials or a Prefect Secret block (--storage-secret)"
        )
    check_cron(cron, timezone)
    params = flow_parameters(cfg)
    params.update(storage=Storage(secret=storage_secret), dry_run=dry_run)
    return reprocess_flow.to_deployment(
        name=name or deployment_name(cfg.output),
        schedules=[Cron(cron, timezone=timezone)],
        parameters=to_jsonable_python(params),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=[*TAGS, output_limit_name(cfg.output)],
        description=f"segflow reprocess {redact(cfg.input)} -> {redact(cfg.output)}, cron {cron!r} ({timezone})",
    )


def serve_reprocessing(deployment, pause_on_shutdown: bool = True) -> None:
    """Register `deployment` and run its scheduled runs here until interrupted.

    Each run executes in a child process. Cancelling a run from the UI or CLI makes
    this runner send that child SIGTERM (then SIGKILL after a grace period); the flow
    shuts its Ray driver down on the way out (flows/stages.py `run_shards`).
    """
    from prefect import serve

    require_prefect_server("segflow schedule")
    serve(deployment, pause_on_shutdown=pause_on_shutdown)


def check_cron(cron: str, timezone: str) -> None:
    """Refuse a bad cron expression or timezone now rather than at the first missed run."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = exc.errors()[0].get("msg", str(exc))
        raise ConfigError(f"--cron {cron!r} --timezone {timezone!r}: {reason}") from None


def require_prefect_server(what: str) -> None:
    if not prefect_server_configured():
        raise ConfigError(
            f"{what} needs a Prefect server, which runs the scheduler: start one with `prefect server start` "
            "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
