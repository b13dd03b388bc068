"""`python -m segflow.models.release`: the CRF search stays inside the grid it is given, and says so."""

from __future__ import annotations

import ast

import numpy as np
from PIL import Image

from segflow.models.catalog import BUNDLED_CHECKPOINT
from segflow.models.checkpoint import read_checkpoint
from segflow.models.release import GRID, release
from tests.collection import write_scenes


def test_a_narrowed_crf_grid_chooses_only_among_its_values_and_is_recorded(tmp_path):
    images = write_scenes(tmp_path / "img", 4)
    (tmp_path / "lab").mkdir()
    rng = np.random.default_rng(0)
    for path in images:  # labels 0-10 and void (11), the image's size
        h, w = np.array(Image.open(path)).shape[:2]
        Image.fromarray(rng.integers(0, 12, (h, w), dtype=np.uint8)).save(tmp_path / "lab" / f"{path.stem}.png")
    grid = GRID | {"bilateral_sxy": (80.0,), "bilateral_srgb": (13.0,), "bilateral_compat": (3.0, 5.0)}

    meta = release(str(BUNDLED_CHECKPOINT), str(tmp_path / "out.safetensors"), str(tmp_path / "img"), str(tmp_path / "lab"), workers=1, grid=grid)

    search = meta["metrics"]["crf_search"]
    assert search["grid"] == {k: list(v) for k, v in grid.items()}
    finalists = {tuple(sorted(ast.literal_eval(k).items())): v for k, v in search["finalists_on_full_val"].items()}
    assert len(finalists) == 2 and all(dict(k)["bilateral_sxy"] == 80.0 and dict(k)["bilateral_srgb"] == 13.0 for k in finalists)
    chosen = {k: meta["crf"][k] for k in grid}
    assert tuple(sorted(chosen.items())) == max(finalists, key=finalists.get)  # the best of the grid, nothing outside it
    assert meta["metrics"]["val_miou_crf"] == finalists[tuple(sorted(chosen.items()))]
    _, stored, _ = read_checkpoint(str(tmp_path / "out.safetensors"))
    assert stored["crf"] == meta["crf"]  # the engine's default CRF is the chosen one
