"""`segflow verify OUTPUT [INPUT]`: check an output's invariants; exit 1 listing violations.

`--repair` first finishes what a killed run left; `--prune-history` deletes OUTPUT/history/.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check OUTPUT's invariants (every input accounted for, no duplicates, ...)")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("input", metavar="INPUT", nargs="?", help="also check that every input has exactly one row")
    p.add_argument("--deep", action="store_true", help="also decode every mask and check its size")
    p.add_argument("--repair", action="store_true",
                   help="first finish what a killed run left (move replaced rows to OUTPUT/history/, remove "
                        "interrupted commits), holding OUTPUT's lock")
    p.add_argument("--prune-history", action="store_true",
                   help="delete OUTPUT/history/ (rows superseded by later runs; kept until this flag)")
    p.add_argument("--storage-options", help="JSON of fsspec options")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.pipeline.verify import verify_output

    options = json.loads(args.storage_options) if args.storage_options else None
    if args.repair or args.prune_history:
        from segflow.pipeline.history import prune_history
        from segflow.pipeline.lock import output_lock
        from segflow.pipeline.verify import repair_output

        with output_lock(args.output, options):
            if args.repair:
                print(f"segflow verify: finished {repair_output(args.output, options)} interrupted replacement(s)")
            if args.prune_history:
                print(f"segflow verify: deleted {prune_history(args.output, options)} history file(s)")
    problems = verify_output(args.output, args.input, options, deep=args.deep)
    if problems:
        print(f"segflow verify: {len(problems)} problem(s) in {args.output}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"segflow verify: {args.output} is consistent")
    return 0
