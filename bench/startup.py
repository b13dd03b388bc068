"""Startup as a user meets it: `segflow segment INPUT OUTPUT` to its first committed shard.

    python bench/startup.py --trials 5 --json startup.json

Each trial runs the real command line on the embedded default (local Ray, Prefect's
ephemeral API, local files, the bundled model, no flags), starting a fresh process,
and times from the spawn to the first `masks/shard-*.parquet` in OUTPUT: interpreter
start, imports, Prefect's temporary server, listing, planning, Ray's start, the model
actors' start and the first shard's images. Then it presses Ctrl-C (SIGINT to the
command's process group, as a terminal does) and waits for the command to end, so the
next trial starts on an idle machine. `bench/run.py` measures the same through
`segflow.pipeline.job.run_segment`, without Prefect; this is the figure a person at a terminal sees.

With --rerun it measures the other start a user meets daily: the same command over an
OUTPUT that already holds every mask (a scheduled rerun of an unchanged collection), from
the spawn to its exit. Target: under 5 s (RERUN_TARGET_SECONDS).

    python bench/startup.py --rerun --trials 5

INPUT: CamVid images from ../shared when present, else generated street scenes, 480x360.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

TARGET_SECONDS = 15.0
RERUN_TARGET_SECONDS = 5.0


def rerun_seconds(input_dir: Path, output: Path) -> float:
    """Seconds from spawning `segflow segment INPUT OUTPUT` over a complete OUTPUT to its exit (it must say 0 masks)."""
    start = time.perf_counter()
    done = subprocess.run(["segflow", "segment", str(input_dir), str(output), "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "segflow: 0 masks, 0 errors" not in done.stdout:
        raise SystemExit(f"the rerun did work or failed (exit {done.returncode}): {done.stdout[-1000:]}{done.stderr[-2000:]}")
    return seconds


def first_commit_seconds(input_dir: Path, output: Path, timeout: float = 300.0) -> float:
    """Seconds from spawning `segflow segment` to its first committed shard; the command is then interrupted."""
    log = output.with_name(output.name + ".log")  # a file, not a pipe: a process left behind could hold a pipe open
    start = time.perf_counter()
    with log.open("w") as stderr:
        command = subprocess.Popen(
            ["segflow", "segment", str(input_dir), str(output), "--no-progress"],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )
    try:
        while not list((output / "masks").glob("shard-*.parquet")):
            if command.poll() is not None:
                raise SystemExit(f"segflow ended before its first commit: {log.read_text()[-2000:]}")
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"no shard committed within {timeout:.0f} s")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGINT)
        try:
            command.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()


def main(argv: list[str] | None = None) -> int:
    from inputs import CAMVID, prepare_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--images", type=int, default=101, help="images in INPUT (only the first shards matter)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--rerun", action="store_true", help="time reruns with nothing to do instead of first commits")
    args = p.parse_args(argv)
    if args.rerun:
        return _main_rerun(args)
    with tempfile.TemporaryDirectory(prefix="segflow-startup-") as tmp:
        images = Path(tmp) / "images"
        prepare_images("camvid" if CAMVID.exists() else "generated", args.images, images)
        seconds = []
        for trial in range(args.trials):
            seconds.append(round(first_commit_seconds(images, Path(tmp) / f"out-{trial}"), 2))
            print(f"trial {trial + 1}: first commit {seconds[-1]} s after the command started", file=sys.stderr)
            time.sleep(10)  # let the interrupted run's processes leave and the machine settle
    result = {
        "command": "segflow segment INPUT OUTPUT --no-progress",
        "images": args.images,
        "first_commit_seconds": seconds,
        "median_seconds": round(statistics.median(seconds), 2),
        "target_seconds": TARGET_SECONDS,
        "median_under_target": statistics.median(seconds) < TARGET_SECONDS,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _main_rerun(args) -> int:
    from inputs import CAMVID, prepare_images

    with tempfile.TemporaryDirectory(prefix="segflow-rerun-") as tmp:
        images, output = Path(tmp) / "images", Path(tmp) / "out"
        prepare_images("camvid" if CAMVID.exists() else "generated", args.images, images)
        first = subprocess.run(["segflow", "segment", str(images), str(output), "--no-progress"], capture_output=True, text=True)
        if first.returncode != 0:
            raise SystemExit(f"the first run failed: {first.stderr[-2000:]}")
        time.sleep(5)
        seconds = []
        for trial in range(args.trials):
            seconds.append(round(rerun_seconds(images, output), 2))
            print(f"trial {trial + 1}: nothing-to-do rerun took {seconds[-1]} s", file=sys.stderr)
    result = {
        "command": "segflow segment INPUT OUTPUT --no-progress  (OUTPUT complete: nothing to do)",
        "images": args.images,
        "rerun_seconds": seconds,
        "median_seconds": round(statistics.median(seconds), 2),
        "target_seconds": RERUN_TARGET_SECONDS,
        "median_under_target": statistics.median(seconds) < RERUN_TARGET_SECONDS,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
