"""`--crf meanfield` in the engine: the layer refines in the model actor, raw masks are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segflow.models.crf import resolve_refinement
from segflow.models.probabilities import probabilities_from_logits
from segflow.models.registry import load_model
from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig
from segflow.pipeline.reader import load_mask, read_masks


@pytest.mark.parametrize("crf_workers", [None, 1], ids=["cpu-layout", "separate-crf-workers-requested"])
def test_meanfield_refines_in_the_model_actor_and_keeps_the_raw_mask(ray_local, random_fcn, tmp_path, crf_workers):
    rng = np.random.default_rng(1)
    images = tmp_path / "in"
    images.mkdir()
    pixels = {}
    for i in range(3):
        rgb = np.zeros((40, 56, 3), np.uint8)
        rgb[:, : 20 + 5 * i] = rng.integers(0, 80, 3)  # two flat regions plus noise: the CRF has edges to follow
        rgb[:, 20 + 5 * i :] = rng.integers(150, 255, 3)
        rgb = np.clip(rgb.astype(int) + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(images / f"im{i}.png")
        pixels[str(images / f"im{i}.png")] = rgb
    params = (("backend", "window"), ("downsample", 1), ("window_size", 7), ("iterations", 3))
    cfg = SegmentConfig(input=str(images), output=str(tmp_path / "out"), model=random_fcn, refinement="meanfield",
                        crf_params=params, device="cpu", crf_workers=crf_workers, progress=False)
    summary = job.run_segment(cfg)
    assert summary.masks == 3 and summary.errors == 0

    kind = resolve_refinement("meanfield", dict(params))
    rows = read_masks(str(tmp_path / "out"), columns=["uri", "raw_mask", "crf_fingerprint", "crf_changed_fraction"]).to_pylist()
    assert {r["crf_fingerprint"] for r in rows} == {kind.fingerprint()}
    assert all(r["raw_mask"] is not None for r in rows)

    loaded = load_model(random_fcn.model, None, random_fcn.weights, random_fcn.num_classes, random_fcn.seed)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
    for uri, rgb in pixels.items():
        with torch.no_grad():
            logits = loaded.net.lowres_logits((torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std)[0].numpy()
        probs = probabilities_from_logits(logits, *rgb.shape[:2])
        expected = kind.refine(rgb, probs)
        assert (load_mask(str(tmp_path / "out"), uri) == expected).mean() > 0.999
        assert (load_mask(str(tmp_path / "out"), uri, raw=True) == probs.argmax(0)).mean() > 0.999
