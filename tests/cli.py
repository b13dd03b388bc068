"""The `segflow` command line in a subprocess, as a user runs it on the embedded default.

No PREFECT_API_URL (Prefect's ephemeral API, with its own PREFECT_HOME under the test's
temp folder), a local Ray, and an FCN-8s with seeded random weights (fast to build, no
download; its masks are not segmentations).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.prefect_home import fresh_prefect_home

REPO = Path(__file__).resolve().parents[1]
RANDOM_FCN_FLAGS = ("--model", "fcn8s_resnet18", "--weights", "none", "--num-classes", "11", "--no-progress")


def start_segment(input: Path, output: Path, prefect_home: Path, *flags: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """`segflow segment INPUT OUTPUT FLAGS...` in a new session (so its whole process group can be signalled)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(prefect_home))}
    command = [sys.executable, "-m", "segflow.flows.cli", "segment", str(input), str(output), *flags, *RANDOM_FCN_FLAGS]
    return subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True, stdout=stdout, stderr=subprocess.PIPE, text=True)
