"""`segflow review OUTPUT REVIEW`: the images most worth a person's time, and an export for annotation tools."""

from __future__ import annotations

from segflow.errors import UsageError
from segflow.flows.commands.options import json_object


def add_parser(sub) -> None:
    p = sub.add_parser(
        "review",
        help="rank OUTPUT's images by estimated share of wrong pixels; write REVIEW/queue.parquet and report.html",
        description="Score = the largest of 1 - mean confidence, half the CRF's changed fraction, and half the share of "
        "pixels that differ from the previous mask (OUTPUT/history or --against). See segflow.pipeline.review.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the output to review")
    p.add_argument("review", metavar="REVIEW", help="where to write the queue (local path or URL)")
    p.add_argument("--top", type=int, default=100, help="queue at most N images, highest score first; 0 for all (default 100)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="only images whose mask holds any of these classes, by name or id (default: all images)")
    p.add_argument("--min-score", type=float, default=0.0, help="only images scoring at least this share of wrong pixels, 0..1 (default 0)")
    p.add_argument("--against", metavar="OTHER", help="the previous masks come from OTHER, another output of the same collection (default: OUTPUT/history when it exists)")
    p.add_argument("--export", choices=("voc",), help="also write the queue for annotation tools: voc = PASCAL VOC segmentation layout in REVIEW/voc, which CVAT imports as 'Segmentation mask 1.1' (default: none)")
    p.add_argument("--shown", type=int, default=50, help="queued images shown in report.html (default 50)")
    p.add_argument("--workers", type=int, help="processes scoring shards in parallel (default: the CPU count, used only with 2+ shards per process)")
    p.add_argument("--storage-options", help="JSON of fsspec options for every location (default: none; prefer env vars for secrets)")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.pipeline.review import build_queue
    from segflow.pipeline.review_report import write_review_report

    if args.top < 0:
        raise UsageError(f"--top {args.top}: give a count of images, or 0 for all")
    if not 0.0 <= args.min_score <= 1.0:
        raise UsageError(f"--min-score {args.min_score}: the score is a share of pixels, between 0 and 1")
    options = json_object("--storage-options", args.storage_options)
    queue, labels = build_queue(args.output, args.review, top=args.top or None, classes=tuple(args.classes or ()),
                                min_score=args.min_score, against=args.against, storage_options=options, workers=args.workers)
    report = write_review_report(args.review, queue, labels, args.output, args.against, options, shown=args.shown)
    print(f"segflow review: {len(queue)} images queued -> {args.review.rstrip('/')}/queue.parquet; report: {report}")
    if args.export == "voc":
        from segflow.pipeline.voc import export_voc

        dest = f"{args.review.rstrip('/')}/voc"
        export_voc(queue, args.output, dest, labels, options)
        print(f"segflow review: PASCAL VOC segmentation layout -> {dest} (zip its contents for CVAT's 'Segmentation mask 1.1')")
    return 0
