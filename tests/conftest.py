"""Shared fixtures: one real local Ray per session, CamVid location, quiet Prefect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

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
