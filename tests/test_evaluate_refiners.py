"""`segflow evaluate --crf KIND,KIND`: several refiners in one run, each against the same raw masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.cli import RANDOM_FCN_FLAGS, REPO
from tests.prefect_home import fresh_prefect_home


def _labelled_images(root, n: int = 2):
    rng = np.random.default_rng(3)
    for folder in ("img", "lab"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        # halves of two colours, labelled as such: the CRF has edges to follow
        rgb = np.zeros((40, 56, 3), np.uint8)
        rgb[:, :28], rgb[:, 28:] = (200, 40, 40), (40, 40, 200)
        rgb = np.clip(rgb + rng.integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "img" / f"im{i}.png")
        label = np.zeros((40, 56), np.uint8)
        label[:, 28:] = 3 + i
        Image.fromarray(label).save(root / "lab" / f"im{i}.png")


def _evaluate(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(fresh_prefect_home(tmp_path / "prefect"))}
    command = [sys.executable, "-m", "segflow.flows.cli", "evaluate", str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "out"),
               *flags, *RANDOM_FCN_FLAGS, "--shard-size", "1"]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_each_refiner_is_scored_against_the_same_raw_masks_and_compared(tmp_path):
    _labelled_images(tmp_path)
    done = _evaluate(tmp_path, "--crf", "none,meanfield", "--crf-backend", "window", "--crf-iterations", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["refiners"]) == ["none", "meanfield"]
    for kind in ("none", "meanfield"):
        summary = json.loads((out / kind / "summary.json").read_text())  # each kind: a whole evaluation of its own
        assert comparison["raw"]["miou"] == summary["raw"]["miou"]
        refined = summary["crf"] or summary["raw"]
        assert comparison["refiners"][kind]["scores"]["miou"] == refined["miou"]
        assert comparison["refiners"][kind]["gain"]["miou"] == refined["miou"] - summary["raw"]["miou"]
    assert comparison["refiners"]["none"]["gain"]["miou"] == 0
    page = (out / "comparison.html").read_text()
    assert "meanfield" in page and "raw (network)" in page
    assert "comparison: " in done.stdout and "meanfield" in done.stdout.splitlines()[-1]


def test_a_parameter_no_listed_refiner_has_is_a_one_line_error(tmp_path, capsys):
    from segflow.flows.cli import main

    _labelled_images(tmp_path)
    base = ["evaluate", str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "out"), *RANDOM_FCN_FLAGS]
    assert main([*base, "--crf", "none,dense", "--crf-backend", "window"]) == 2
    assert "--crf-backend: none of none, dense has this parameter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    for bad in ("dense,dense", "dense,crfasrnn", ","):
        try:
            main([*base, "--crf", bad])
        except SystemExit as exc:  # argparse: usage line and exit 2
            assert exc.code == 2
        assert "each once, separated by commas" in capsys.readouterr().err
