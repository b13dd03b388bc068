"""`segflow schedule INPUT OUTPUT --cron "0 2 * * *"`: reprocess OUTPUT from INPUT on a schedule.

One command registers the deployment with the Prefect server and serves it: this
process stays up and runs each scheduled reprocessing run (leave it under systemd,
tmux or a container). It takes the same model/CRF/engine flags as `segflow segment`,
and they are pinned in the deployment.
"""

from __future__ import annotations

from segflow.flows.commands.options import add_engine_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "schedule",
        help="reprocess INPUT into OUTPUT on a cron schedule (serves a Prefect deployment; needs a Prefect server)",
        description="Registers a segflow-reprocess deployment for OUTPUT with a cron schedule and serves its runs "
        "until interrupted. At most one run writes OUTPUT at a time. Needs PREFECT_API_URL (`prefect server start`).",
    )
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    s = p.add_argument_group("schedule")
    s.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *" for 02:00 every night')
    s.add_argument("--timezone", default="UTC", help="IANA timezone the cron expression is read in (default UTC)")
    s.add_argument("--name", help="deployment name (default: reprocess-<output name>-<hash>, one per OUTPUT)")
    s.add_argument("--storage-secret", help="Prefect Secret block holding JSON fsspec storage options (credentials)")
    s.add_argument("--dry-run", action="store_true", help="scheduled runs only plan and publish what they would do")
    s.add_argument("--keep-schedule-on-exit", action="store_true", help="leave the schedule active when this process stops")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.errors import UsageError
    from segflow.flows.deploy import reprocess_deployment, serve_reprocessing

    if args.storage_options:
        raise UsageError("--storage-options would be saved in the deployment; use env credentials or --storage-secret")
    cfg = config_from_args(args, args.input, args.output).with_(progress=False)
    deployment = reprocess_deployment(
        cfg, args.cron, timezone=args.timezone, name=args.name, storage_secret=args.storage_secret, dry_run=args.dry_run,
    )
    serve_reprocessing(deployment, pause_on_shutdown=not args.keep_schedule_on_exit)
    return 0
