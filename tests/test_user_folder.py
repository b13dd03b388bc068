"""segflow runs from a user's project folder that has its own `models`, `pipeline` and `flows`.

Ray puts the driver's working directory on its workers' path, so a user's package named
like one of segflow's folders used to be imported instead of segflow's: every model
actor died in its constructor and the images were recorded as errors. segflow now owns
one import name (`segflow.models`, ...). Here the user's packages raise ImportError when
imported, so any import of them fails loudly; every image must get a mask. The
multi-node case is in tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.pipeline.reader import read_errors, read_masks
from tests.cli import RANDOM_FCN_FLAGS
from tests.collection import write_scenes
from tests.prefect_home import fresh_prefect_home

SHADOWED = ("models", "pipeline", "flows")


def make_user_project(root: Path) -> Path:
    """A folder with packages `models`, `pipeline`, `flows` that raise ImportError on import."""
    for name in SHADOWED:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f'raise ImportError("imported the user\'s own {name}/ instead of segflow\'s")\n')
    return root


@pytest.fixture
def user_project(tmp_path) -> Path:
    return make_user_project(tmp_path / "project")


def _env(prefect_home: Path) -> dict:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(prefect_home))}


def test_the_cli_from_a_user_folder_gives_every_image_a_mask(user_project, tmp_path):
    write_scenes(tmp_path / "in", 4)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path / "in"), str(out), "--shard-size", "2", *RANDOM_FCN_FLAGS],
        env=_env(tmp_path / "prefect"), cwd=user_project, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "4 masks, 0 errors" in run.stdout, run.stdout
    assert read_masks(str(out), columns=["uri"]).num_rows == 4 and read_errors(str(out)).num_rows == 0


_FLOW = """
import json, sys
from segflow import segment_flow
from segflow.pipeline.config import ModelRef
summary = segment_flow(sys.argv[1], sys.argv[2], model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0))
print(json.dumps({"masks": summary.masks, "errors": summary.errors}))
"""


def test_the_flow_from_a_user_folder_gives_every_image_a_mask(user_project, tmp_path):
    write_scenes(tmp_path / "in", 4)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _FLOW, str(tmp_path / "in"), str(out)],
                         env=_env(tmp_path / "prefect"), cwd=user_project, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"masks": 4, "errors": 0}
    assert read_masks(str(out), columns=["uri"]).num_rows == 4 and read_errors(str(out)).num_rows == 0
