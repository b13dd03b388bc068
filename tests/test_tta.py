"""Test-time augmentation: the logits averaged are exactly the mirrored copies' logits."""

from __future__ import annotations

import pytest
import torch

from segflow.models.registry import build_network
from segflow.models.tta import tta_logits
from segflow.pipeline import job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.errors import ConfigError


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network({"family": "fcn", "variant": "fcn8s", "backbone": "resnet18"}, 5).eval()


def test_flip_equals_the_mean_of_the_image_and_its_mirror_computed_directly(net):
    x = torch.randn(2, 3, 67, 91)  # odd sizes: the mirror's stride-8 grid does not line up with the image's
    with torch.no_grad():
        direct = (net(x) + net(x.flip(-1)).flip(-1)) / 2
        averaged = tta_logits(net.lowres_logits, x, "flip")
        plain = tta_logits(net.lowres_logits, x, "none")
    assert averaged.shape == direct.shape == (2, 5, 67, 91)
    torch.testing.assert_close(averaged, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, net(x).detach())
    assert not torch.allclose(averaged, plain)


def test_flip_scales_averages_six_passes_back_at_the_input_size(net):
    x = torch.randn(1, 3, 40, 56)
    calls = []

    def counting(inp):
        calls.append(tuple(inp.shape[-2:]))
        return net.lowres_logits(inp)

    with torch.no_grad():
        out = tta_logits(counting, x, "flip-scales")
    assert out.shape == (1, 5, 40, 56)
    assert sorted(set(calls)) == [(30, 42), (40, 56), (50, 70)] and len(calls) == 6


def test_tta_changes_the_model_fingerprint_and_none_keeps_it(tmp_path):
    (tmp_path / "in").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 24), (10, 20, 30)).save(tmp_path / "in" / "a.png")
    base = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11))
    fingerprints = {}
    for mode in ("none", "flip", "flip-scales"):
        cfg = base.with_(model=ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, tta=mode))
        plan = job.plan_stage(cfg, job.list_stage(cfg))
        fingerprints[mode] = (plan.model_fingerprint, plan.job_fingerprint)
    plain = job.plan_stage(base, job.list_stage(base))
    assert fingerprints["none"] == (plain.model_fingerprint, plain.job_fingerprint)
    assert len({fp for fp, _ in fingerprints.values()}) == 3 and len({fp for _, fp in fingerprints.values()}) == 3
    with pytest.raises(ConfigError, match="--tta must be one of"):
        ModelRef(tta="flop")


def test_the_engine_applies_flip_tta_inside_the_model_actor(ray_local, random_fcn, tmp_path):
    import numpy as np
    from PIL import Image

    from segflow.models.probabilities import probabilities_from_logits
    from segflow.models.registry import load_model
    from segflow.pipeline.reader import load_mask

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in" / "a.png")
    model = ModelRef(model=random_fcn.model, weights=random_fcn.weights, num_classes=random_fcn.num_classes, seed=random_fcn.seed, tta="flip")
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model, refinement="none", device="cpu", progress=False)
    assert job.run_segment(cfg).masks == 1
    loaded = load_model(model.model, None, model.weights, model.num_classes, model.seed)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std
    with torch.no_grad():
        direct = ((loaded.net(x) + loaded.net(x.flip(-1)).flip(-1)) / 2)[0].numpy()
    expected = probabilities_from_logits(direct, 45, 61).argmax(0)
    got = load_mask(str(tmp_path / "out"), str(tmp_path / "in" / "a.png"))
    assert (got == expected).mean() > 0.999
