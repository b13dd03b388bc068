"""The `segflow` command line: one subcommand per module in `flows/commands/`.

Each command module exposes `add_parser(subparsers)` and `run(args) -> int`. This file
only dispatches, and turns segflow's own errors into one-line messages instead of
tracebacks, with an exit code that says what happened (README, "Exit codes"):

    0    every image has a mask, or an error row blaming the image itself
    1    the job ran to its end, but some images failed for reasons not their own
         (error rows of stage shard/infer/refine); a rerun retries them
    2    nothing ran: a bad flag or option, a missing INPUT, a model that does not resolve
    3    the job stopped early: a worker could not start (ImportError, missing weights,
         CUDA), or storage failed; committed shards stay, a rerun resumes
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from segflow.errors import UsageError

COMMANDS = ("segment", "evaluate", "reprocess", "verify", "train", "schedule", "models", "diff", "review")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segflow", description="Batch semantic segmentation on Ray, orchestrated by Prefect.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error instead of its one line (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:  # every listed command exists: an import error is a bug, never skipped
        importlib.import_module(f"segflow.flows.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from segflow.flows import interrupt

    interrupt.install()
    try:
        if getattr(args, "config", None):
            from segflow.flows.commands.options import apply_config_file

            subparser = next(a for a in parser._subparsers._group_actions).choices[args.command]
            apply_config_file(subparser, args.config)
            args = parser.parse_args(argv)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(interrupt.MESSAGE, file=sys.stderr)
        return interrupt.EXIT_CODE
    except Exception as exc:  # the CLI boundary: known errors become one line
        if _is_user_facing(exc) and not args.debug:
            print(f"segflow {args.command}: error: {exc}", file=sys.stderr)
            return exit_code(exc)
        raise


EXIT_INCOMPLETE, EXIT_USAGE, EXIT_STOPPED = 1, 2, 3


def exit_code(exc: Exception) -> int:
    """The exit code for one of segflow's own errors (see the module docstring)."""
    from segflow.errors import IncompleteRunError, JobStoppedError, StorageError

    if isinstance(exc, IncompleteRunError):
        return EXIT_INCOMPLETE
    if isinstance(exc, (JobStoppedError, StorageError)):
        return EXIT_STOPPED
    return EXIT_USAGE


def _is_user_facing(exc: Exception) -> bool:
    from segflow.models.checkpoint import CheckpointError
    from segflow.models.catalog import ModelUnavailableError

    known: tuple[type[BaseException], ...] = (UsageError, CheckpointError, ModelUnavailableError, FileNotFoundError)
    try:
        from segflow.errors import SegflowError

        known += (SegflowError,)
    except ImportError:
        pass
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
