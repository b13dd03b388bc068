"""Shared fixtures: one real local Ray per session, CamVid location, quiet Prefect.

The suite leaves the machine as it found it. Before anything imports Prefect or starts
Ray, this module gives the session (and every subprocess it starts, through the
environment) a folder of its own, removed at the end: Prefect's home (its database, where
every ephemeral flow run of the CLI tests lands, profiles, memo store) and Ray's temporary
files (sessions, logs, sockets). Without it a run of the suite left ~40 flow runs, one of
them RUNNING, in the user's ~/.prefect. The folder sits directly under /tmp with a short
name: Ray's Unix socket paths live under it and must fit in 107 bytes. A user's
PREFECT_API_URL, PREFECT_PROFILE and RAY_ADDRESS are dropped (tests must not reach their
servers or clusters), and local Ray clusters get a session token instead of generating
~/.ray/auth_token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

SESSION_DIR = Path(tempfile.mkdtemp(prefix="sft-", dir="/tmp"))
for _name in ("PREFECT_API_URL", "PREFECT_PROFILE", "RAY_ADDRESS"):
    os.environ.pop(_name, None)
os.environ["PREFECT_HOME"] = str(SESSION_DIR / "prefect")
os.environ["PREFECT_PROFILES_PATH"] = str(SESSION_DIR / "prefect" / "profiles.toml")
os.environ["RAY_TMPDIR"] = str(SESSION_DIR)  # Ray's default temp dir becomes $RAY_TMPDIR/ray
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored across exec: the
# Ctrl-C tests (which interrupt this process or a CLI it starts) would then test nothing.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    """Remove the session's Prefect home and Ray temp dir (after every fixture has stopped its Ray)."""
    shutil.rmtree(SESSION_DIR, ignore_errors=True)

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"

pytest_plugins = [p for p in ("tests.s3_fixtures",) if (Path(__file__).parent / (p.split(".")[1] + ".py")).exists()]


@pytest.fixture(scope="session")
def camvid() -> Path:
    """The shared CamVid folder; tests that need real data skip without it."""
    if not (CAMVID / "val").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (the shared data folder beside the repo)")
    return CAMVID


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster (2 CPUs, token auth on) shared by the session's engine tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_fcn():
    """An FCN-8s with seeded random weights: exercises the engine, its masks are NOT segmentations."""
    from segflow.pipeline.config import ModelRef

    return ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0)
