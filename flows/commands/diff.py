"""`segflow diff OUTPUT DIFF [--against OTHER]`: what a new model changed, without ground truth."""

from __future__ import annotations

from segflow.flows.commands.options import json_object


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diff",
        help="compare OUTPUT's masks with their previous versions (OUTPUT/history) or with another output",
        description="Writes DIFF/images (per image: changed fraction, old x new change matrix), DIFF/summary.json and "
        "summary.parquet (per class: pixels gained and lost, IoU old vs new; from summed matrices) and DIFF/report.html.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the output whose current masks are the new side")
    p.add_argument("diff", metavar="DIFF", help="where to write the comparison (local path or URL)")
    p.add_argument("--against", metavar="OTHER", help="compare with OTHER, another output of the same collection, as the old side (default: OUTPUT/history, the masks a reprocess replaced)")
    p.add_argument("--workers", type=int, help="processes comparing shards in parallel (default: the CPU count, used only with 2+ shards per process)")
    p.add_argument("--shown", type=int, default=8, help="most changed images shown in report.html (default 8)")
    p.add_argument("--storage-options", help="JSON of fsspec options for every location (default: none; prefer env vars for secrets)")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.pipeline.diff import diff_outputs, most_changed_classes
    from segflow.pipeline.diff_report import write_diff_report

    options = json_object("--storage-options", args.storage_options)
    summary = diff_outputs(args.output, args.diff, args.against, options, workers=args.workers)
    report = write_diff_report(args.diff, summary, args.output, args.against, options, shown=args.shown)
    over = ", ".join(f">{float(t) * 100:g} %: {n}" for t, n in summary["images_changed_over"].items())
    classes = ", ".join(f"{name} ({count:,} px)" for name, count in most_changed_classes(summary)) or "none"
    print(f"segflow diff: {summary['images_compared']} images compared, {summary['changed_fraction'] * 100:.2f} % of pixels "
          f"changed; images changed {over}; most changed classes: {classes}")
    print(f"segflow diff: report: {report}")
    return 0
