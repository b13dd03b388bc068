"""Expected errors end in one line, early, before any Ray, Prefect server or model starts; --debug shows the traceback.

Each case runs the real `segflow` command in a subprocess. S3 cases use the suite's real moto
server with the credentials taken away.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import RANDOM_FCN_FLAGS
from tests.collection import write_scenes

REPO = Path(__file__).resolve().parents[1]


def _segflow(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "segflow.flows.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={k: v for k, v in (env or os.environ).items() if k != "PREFECT_API_URL"}, timeout=300)
    return done, time.monotonic() - started


def _one_line(done: subprocess.CompletedProcess, says: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode in (2, 3), done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1 and says in lines[0], done.stderr


@pytest.fixture
def no_credentials(s3_bucket, monkeypatch) -> dict:
    s3_bucket.fs().pipe_file(f"{s3_bucket.name}/in/x.png", b"x")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    return {"env": env, "bucket": s3_bucket}


def test_s3_input_without_credentials_is_one_line(no_credentials, tmp_path):
    bucket = no_credentials["bucket"]
    done, seconds = _segflow("segment", f"{bucket.url}/in/", str(tmp_path / "out"), *RANDOM_FCN_FLAGS, env=no_credentials["env"])
    _one_line(done, "no credentials for this location")
    assert seconds < 30


def test_s3_output_without_credentials_is_one_line_without_retries(no_credentials, tmp_path):
    write_scenes(tmp_path / "in", 1)
    bucket = no_credentials["bucket"]
    done, seconds = _segflow("segment", str(tmp_path / "in"), f"{bucket.url}/out", *RANDOM_FCN_FLAGS, env=no_credentials["env"])
    _one_line(done, "no credentials for this location")
    assert seconds < 30 and "retry" not in done.stderr


def test_an_empty_input_folder_is_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    done, _ = _segflow("segment", str(tmp_path / "in"), str(tmp_path / "out"), *RANDOM_FCN_FLAGS)
    _one_line(done, "an empty folder, no images to process")


def test_device_cuda_without_a_gpu_is_one_line_before_anything_starts(tmp_path):
    write_scenes(tmp_path / "in", 1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done, _ = _segflow("segment", str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cuda", *RANDOM_FCN_FLAGS, env=env)
    _one_line(done, "--device cuda: this machine")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_line_before_any_model_starts(tmp_path):
    write_scenes(tmp_path / "in", 1)
    (tmp_path / "taken").write_text("a file where OUTPUT's folder would be")
    done, seconds = _segflow("segment", str(tmp_path / "in"), str(tmp_path / "taken" / "out"), *RANDOM_FCN_FLAGS)
    _one_line(done, "cannot write OUTPUT here")
    assert seconds < 30


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    done, _ = _segflow("--debug", "segment", str(tmp_path / "in"), str(tmp_path / "out"), *RANDOM_FCN_FLAGS)
    assert done.returncode != 0 and "Traceback" in done.stderr and "an empty folder" in done.stderr
