"""`segflow verify OUTPUT [INPUT]`: check an output's invariants; exit 1 listing violations."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check OUTPUT's invariants (every input accounted for, no duplicates, ...)")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("input", metavar="INPUT", nargs="?", help="also check that every input has exactly one row")
    p.add_argument("--deep", action="store_true", help="also decode every mask and check its size")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.pipeline.verify import verify_output

    options = json.loads(args.storage_options) if args.storage_options else None
    problems = verify_output(args.output, args.input, options, deep=args.deep)
    if problems:
        print(f"segflow verify: {len(problems)} problem(s) in {args.output}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"segflow verify: {args.output} is consistent")
    return 0
