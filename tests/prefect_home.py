"""Prefect homes of their own for CLI runs, with the database already migrated.

Tests that run the CLI on the embedded default give it a Prefect home of its own, to read
its flow runs from that home's database or to keep two concurrent runs apart. A new home
costs the CLI's temporary server a full migration of an empty SQLite database first:
~3.5 s and ~5 CPU-s of every such run here, more than the job itself. The session
migrates one database once (`prefect server database upgrade`, as an operator would) and
each new home starts from a copy of it; the server then finds it at the head revision.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

_DATABASE = "prefect.db"


def fresh_prefect_home(path: Path) -> Path:
    """`path`, created, holding a Prefect database at the current schema; returns it.

    A home that already has a database keeps it (a rerun in one home sees the first run's flow run).
    """
    path.mkdir(parents=True, exist_ok=True)
    if not (path / _DATABASE).exists():
        shutil.copyfile(_migrated_template() / _DATABASE, path / _DATABASE)
    return path


def _migrated_template() -> Path:
    # beside the session's own Prefect home (tests/conftest.py), removed with it at the end
    template = Path(os.environ["PREFECT_HOME"]).parent / "prefect-template"
    template.mkdir(parents=True, exist_ok=True)
    with open(template / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one migration, however many processes ask at once
        if not (template / _DATABASE).exists():
            staging = template / "staging"
            shutil.rmtree(staging, ignore_errors=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"PREFECT_HOME": str(staging)}
            done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                  env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"migrating a Prefect database failed:\n{done.stdout}{done.stderr}")
            os.replace(staging / _DATABASE, template / _DATABASE)
    return template
