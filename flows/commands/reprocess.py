"""`segflow reprocess INPUT OUTPUT`: the nightly `reprocess_flow`, run once now.

A thin command over `segflow.flows.reprocess.reprocess_flow`: the same engine flags as
`segment`, plus `--dry-run`, which lists and plans, prints what would be processed, and
writes nothing. What it processes is decided by the plan as for any rerun: images new or
changed since OUTPUT was written, masks made with another model or refinement, and (with
`--prune`) rows of images deleted from INPUT.
"""

from __future__ import annotations

from segflow.flows.commands.options import add_engine_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "reprocess",
        help="bring OUTPUT up to date with INPUT: only new, changed or stale images (the scheduled flow, once)",
        description="Runs the segflow-reprocess flow once, as `segflow schedule` would on its schedule.",
    )
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    add_engine_args(p)
    p.add_argument("--dry-run", action="store_true", help="list and plan only: print what would be processed, write nothing (default: off)")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.flows.parameters import flow_parameters, storage_options_scope
    from segflow.flows.reprocess import reprocess_flow
    from segflow.flows.runner import _summary_of_incomplete_run, _wait_for, preflight, print_summary
    from segflow.pipeline import job

    cfg = config_from_args(args, args.input, args.output)
    if args.dry_run:
        from segflow.pipeline.listing import check_input

        check_input(cfg.input, cfg.storage_options)
        print(f"segflow: {job.plan_stage(cfg, job.list_stage(cfg)).describe()} (dry run: nothing written)")
        return 0
    api = preflight(cfg)
    _wait_for(api)
    with _summary_of_incomplete_run(), storage_options_scope(cfg.storage_options):
        summary = reprocess_flow(**flow_parameters(cfg))
    print_summary(summary)
    return 0
