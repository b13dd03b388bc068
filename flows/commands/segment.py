"""`segflow segment INPUT OUTPUT`: masks for every image of a collection."""

from __future__ import annotations

import sys

from segflow.flows.commands.options import add_engine_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment every image under INPUT into OUTPUT/masks (Parquet)",
        description="INPUT: a directory, glob, fsspec URL (s3://, gs://, memory://...) or a .txt/.parquet list of URIs.",
    )
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.flows.runner import run_segment_job

    cfg = config_from_args(args, args.input, args.output)
    summary = run_segment_job(cfg)
    return 0 if summary.masks + summary.errors + summary.up_to_date >= summary.images_total else 1
