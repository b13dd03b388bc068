"""Camera-sized photos (issue 21): a working size, sliding windows, memory bounded by stripes.

Engine tests use a seeded random FCN: its masks are not segmentations, but every step
from pixels to mask is deterministic, so the engine's mask can be compared with the
same computation written out directly here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segflow.models.sliding import slide_logits, tile_origins
from segflow.models.stripes import MaskAccumulator, upsample_rows
from segflow.models.upsampled_argmax import upsampled_argmax
from segflow.models.working_size import FALLBACK_WORKING_SIZE, working_shape
from segflow.pipeline.config import ModelRef
from segflow.pipeline.decode import decode_image, decode_reduced


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours (a noise image upsampled), so the network's output varies over it."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


# --- stripe-wise upsampling ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(45, 60, 360, 480), (47, 61, 1700, 2300), (13, 17, 1000, 1337), (96, 128, 3000, 4000), (1, 5, 300, 400)])
def test_stripe_wise_upsampling_equals_one_shot_upsampling_exactly(shape):
    h, w, height, width = shape
    x = torch.randn(11, h, w, generator=torch.Generator().manual_seed(0)) * 5
    one_shot = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    stripes = list(upsample_rows(x, height, width, rows=37))
    assert [r0 for r0, _ in stripes] == list(range(0, height, 37))
    assert torch.equal(torch.cat([s for _, s in stripes], 1), one_shot)
    part = torch.cat([s for _, s in upsample_rows(x, height, width, rows=5, start=height // 3, stop=height // 2)], 1)
    assert torch.equal(part, one_shot[:, height // 3 : height // 2])


def test_stripe_statistics_equal_the_full_size_ones():
    x = torch.randn(11, 30, 40, generator=torch.Generator().manual_seed(1)) * 3
    full = F.interpolate(x[None], size=(600, 800), mode="bilinear", align_corners=False)[0]
    acc = MaskAccumulator(600, 800, 11)
    for r0, stripe in upsample_rows(x, 600, 800, rows=50):
        acc.add_logits(r0, stripe)
    probs = torch.softmax(full, 0)
    assert np.array_equal(acc.labels, full.argmax(0).numpy().astype(np.uint8))
    assert acc.counts.tolist() == np.bincount(acc.labels.ravel(), minlength=11).tolist()
    assert acc.mean_confidence == pytest.approx(float(probs.amax(0).double().mean()), rel=1e-5)
    assert acc.min_confidence == pytest.approx(float(probs.amax(0).min()), rel=1e-5)


def _smooth_field(classes: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, max(2, h // 5), max(2, w // 5), generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0] * 6


@pytest.mark.parametrize(
    "case",
    [
        ("smooth", 11, 48, 64, 3000, 4000),  # logits at working size 512 of a 12 Mpx photo
        ("smooth", 11, 384, 512, 3000, 4000),  # the CRF's Q at working size 512, 12 Mpx
        ("smooth", 11, 47, 61, 1711, 2293),  # odd sizes, uneven cells
        ("noise", 11, 30, 40, 600, 800),  # a boundary in nearly every cell
        ("ties", 4, 20, 30, 200, 300),  # exact ties between classes: the first one wins
        ("probabilities", 11, 96, 128, 2000, 2600),
        ("smooth", 2, 10, 700, 400, 3000),  # tall factor, short factor below the threshold
    ],
)
def test_upsampled_argmax_equals_the_argmax_of_the_one_shot_upsampling(case):
    kind, k, h, w, height, width = case
    g = torch.Generator().manual_seed(3)
    x = {
        "smooth": lambda: _smooth_field(k, h, w, 4),
        "noise": lambda: torch.randn(k, h, w, generator=g) * 4,
        "ties": lambda: torch.randint(0, 3, (k, h, w), generator=g).float(),
        "probabilities": lambda: torch.softmax(_smooth_field(k, h, w, 5), 0),
    }[kind]()
    expected = np.empty((height, width), np.uint8)
    for r0, stripe in upsample_rows(x, height, width):  # equal to the one-shot call (test above), in less memory
        expected[r0 : r0 + stripe.shape[1]] = stripe.argmax(0).numpy()
    labels, counts = upsampled_argmax(x, height, width)
    assert np.array_equal(labels, expected)
    assert counts.tolist() == np.bincount(expected.ravel(), minlength=k).tolist()


# --- working size: the engine's mask vs the computation written out --------------------


def _direct_raw_mask(random_fcn: ModelRef, rgb: np.ndarray, long_side: int) -> np.ndarray:
    """argmax of the working-size network's logits upsampled bilinearly to the image's size, in one shot,
    and the top softmax probability of those logits upsampled to the working size."""
    from segflow.models.registry import load_model

    loaded = load_model(random_fcn.model, None, random_fcn.weights, random_fcn.num_classes, random_fcn.seed)
    h, w = working_shape(*rgb.shape[:2], long_side)
    small = np.array(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    x = torch.from_numpy(small)[None].permute(0, 3, 1, 2).float()
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        logits = loaded.net.eval().lowres_logits((x - mean) / std)
        full = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
        working = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
    return full.argmax(0).numpy().astype(np.uint8), torch.softmax(working, 0).amax(0)


def test_working_size_mask_is_the_argmax_of_upsampled_working_size_logits(ray_local, random_fcn, tmp_path):
    from dataclasses import replace

    from segflow import load_mask, read_masks
    from segflow.pipeline import job
    from segflow.pipeline.config import SegmentConfig

    rgb = _random_image(700, 1000)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in" / "large.png")
    model = replace(random_fcn, working_size=320)
    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model, device="cpu", progress=False)
    summary = job.run_segment(cfg)
    assert summary.errors == 0 and summary.masks == 1
    columns = ["uri", "height", "width", "raw_pixel_counts", "crf_changed_fraction", "mean_confidence", "min_confidence"]
    row = read_masks(str(tmp_path / "out"), columns=columns).to_pylist()[0]
    assert (row["height"], row["width"]) == (700, 1000)
    raw = load_mask(str(tmp_path / "out"), row["uri"], raw=True)
    final = load_mask(str(tmp_path / "out"), row["uri"])
    assert raw.shape == final.shape == (700, 1000)
    expected, working_confidence = _direct_raw_mask(random_fcn, rgb, 320)
    assert np.array_equal(raw, expected)
    # confidence statistics at the working size: the top softmax probability of the logits upsampled to it
    assert row["mean_confidence"] == pytest.approx(float(working_confidence.double().mean()), rel=1e-5)
    assert row["min_confidence"] == pytest.approx(float(working_confidence.min()), rel=1e-5)
    assert row["raw_pixel_counts"] == np.bincount(expected.ravel(), minlength=11).tolist()
    assert row["crf_changed_fraction"] == pytest.approx(float((final != raw).mean()))


def test_images_within_the_working_size_take_the_unchanged_path(random_fcn):
    """Decoding, the network's input and the item are exactly what they were without a working size."""
    from dataclasses import replace

    from segflow.pipeline.resize import decode_for_network, needs_image_size_path

    buffer = io.BytesIO()
    Image.fromarray(_random_image(360, 480)).save(buffer, "JPEG", quality=90)
    pixels, extra = decode_for_network(buffer.getvalue(), "x.jpg", 10**8, FALLBACK_WORKING_SIZE)
    assert extra == {} and np.array_equal(pixels, decode_image(buffer.getvalue(), "x.jpg", 10**8))
    assert not needs_image_size_path({"rgb": pixels})
    assert not needs_image_size_path({"rgb": pixels, "tiles": (512, 384)})
    assert replace(random_fcn, working_size="1024").working_size == 1024


# --- sliding windows ------------------------------------------------------------------


def test_tiles_with_a_window_covering_the_image_equal_the_plain_forward(random_fcn):
    from segflow.models.registry import load_model

    loaded = load_model(random_fcn.model, None, random_fcn.weights, random_fcn.num_classes, random_fcn.seed)
    x = torch.randn(1, 3, 120, 200, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = loaded.net.eval().lowres_logits(x)
        tiled = slide_logits(loaded.net.lowres_logits, x, tile=256, stride=128)
    assert torch.equal(plain, tiled)


def test_overlapping_tiles_average_each_crops_logits_at_their_place():
    """A position-independent 'network' (8x8 average pooling): any grid of crops reproduces it exactly."""
    pool = lambda x: F.avg_pool2d(x, 8, ceil_mode=True)  # noqa: E731
    x = torch.randn(1, 3, 300, 452, generator=torch.Generator().manual_seed(3))
    tiled = slide_logits(pool, x, tile=128, stride=96)
    assert tiled.shape == pool(x).shape
    assert torch.allclose(tiled, pool(x), atol=1e-6)
    calls = []
    slide_logits(lambda t: (calls.append(tuple(t.shape[-2:])), pool(t))[1], x, tile=128, stride=96)
    assert all(h <= 128 + 7 and w <= 128 + 7 for h, w in calls)  # memory bounded by the tile, not the image
    assert tile_origins(300, 128, 96, 8) == [(0, 128), (96, 224), (168, 300)]


def test_windowed_refinement_covers_every_pixel_once_averaged():
    """With a refinement that returns its input, the tiled refinement is the argmax of the probabilities."""
    from segflow.pipeline.resize import _windowed

    class Identity:
        def refine_probabilities(self, rgb, probs):
            assert rgb.shape[:2] == probs.shape[1:] and max(rgb.shape[:2]) <= 128
            return probs

    logits = torch.randn(5, 40, 57, generator=torch.Generator().manual_seed(4)) * 4
    rgb = np.zeros((317, 451, 3), np.uint8)
    labels = _windowed(rgb, logits, Identity(), (128, 96), 5)
    full = F.interpolate(logits[None], size=(317, 451), mode="bilinear", align_corners=False)[0]
    assert np.array_equal(labels, torch.softmax(full, 0).argmax(0).numpy().astype(np.uint8))


# --- decoding at reduced size -----------------------------------------------------------


def _oriented_jpeg(orientation: int) -> bytes:
    """A 1600x1000 JPEG, stored sideways, whose EXIF orientation makes it upright: red top-left block."""
    upright = np.zeros((1600, 1000, 3), np.uint8)
    upright[:400, :300] = (255, 0, 0)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])
def test_draft_mode_decode_keeps_orientation(orientation):
    data = _oriented_jpeg(orientation)
    full = decode_image(data, "x.jpg", 10**8)
    assert full.shape == (1600, 1000, 3)
    reduced, size = decode_reduced(data, "x.jpg", 10**8, 400)
    assert size == (1600, 1000)
    assert reduced.shape[0] < 1600 and reduced.shape[0] >= 400 and reduced.shape[0] > reduced.shape[1]
    h, w = reduced.shape[:2]
    assert reduced[: h // 5, : w // 5].mean(axis=(0, 1)).round().tolist()[0] > 200  # red stays top-left
    assert reduced[-h // 5 :, -w // 5 :].max() < 40


def test_the_pixel_limit_applies_to_the_true_size():
    from segflow.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="1,600,000 pixels exceeds"):
        decode_reduced(_oriented_jpeg(6), "x.jpg", 1_000_000, 400)


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprints_change_with_a_non_default_working_size_or_tiles_only(random_fcn):
    from dataclasses import replace

    from segflow.models.catalog import ModelInfo
    from segflow.pipeline.job import _model_fingerprint

    info = ModelInfo("abc123", None, {}, {})
    trained = ModelInfo("abc123", None, {}, {"inference": {"working_size": 480}})
    base = random_fcn
    assert _model_fingerprint(info, base) == "abc123"
    assert _model_fingerprint(info, replace(base, working_size=FALLBACK_WORKING_SIZE)) == "abc123"
    assert _model_fingerprint(trained, base) == "abc123"
    assert _model_fingerprint(trained, replace(base, working_size=480)) == "abc123"
    changed = {
        _model_fingerprint(info, replace(base, working_size=640)),
        _model_fingerprint(info, replace(base, working_size="full")),
        _model_fingerprint(trained, replace(base, working_size=FALLBACK_WORKING_SIZE)),
        _model_fingerprint(info, replace(base, tiles=(512, 384))),
        _model_fingerprint(info, replace(base, tiles=(512, 256))),
        _model_fingerprint(info, replace(base, tiles=(512, 384), working_size=1024)),
    }
    assert "abc123" not in changed and len(changed) == 6
    assert _model_fingerprint(info, replace(base, tta="flip")) == _model_fingerprint(info, replace(base, tta="flip", working_size=FALLBACK_WORKING_SIZE))


def test_the_bundled_model_plans_with_its_old_fingerprint(tmp_path):
    from segflow.models.catalog import describe_model
    from segflow.pipeline.job import _model_fingerprint

    info = describe_model(None, None, None, None, 0)
    assert _model_fingerprint(info, ModelRef()) == info.fingerprint
    assert _model_fingerprint(info, ModelRef(working_size="full")) != info.fingerprint


def test_flags_reach_the_model_ref():
    import argparse

    from segflow.errors import ConfigError
    from segflow.flows.commands.options import add_engine_args, config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cfg = config_from_args(parser.parse_args(["--working-size", "full", "--tiles", "512,384"]), "in", "out")
    assert (cfg.model.working_size, cfg.model.tiles) == ("full", (512, 384))
    assert config_from_args(parser.parse_args([]), "in", "out").model == ModelRef()
    with pytest.raises(ConfigError, match="--working-size"):
        ModelRef(working_size=8)
    with pytest.raises(ConfigError, match="--tiles"):
        ModelRef(tiles=(256, 300))


# --- quality on CamVid ------------------------------------------------------------------------

CAMVID = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason=f"CamVid is not at {CAMVID}")


def _quality_bench():
    """bench/large_quality.py, whose in-process segmentation (the model actor's code) the tests share."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("large_quality", Path(__file__).resolve().parents[1] / "bench" / "large_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_camvid
def test_camvid_val_masks_are_unchanged_by_the_default_working_size():
    bench = _quality_bench()
    paths = sorted((CAMVID / "val").glob("*.png"))[::25]  # 5 images across the sequences
    default, full = bench.segment(paths, None), bench.segment(paths, "full")
    for (final, raw), (final_full, raw_full) in zip(default, full):
        assert final.shape == (360, 480)
        assert np.array_equal(final, final_full) and np.array_equal(raw, raw_full)


@needs_camvid
def test_upscaled_camvid_at_the_default_working_size_scores_within_a_point_of_the_original():
    """Val images upscaled 4x (1920x1440): masks at 1920x1440 score as the 480x360 run does."""
    bench = _quality_bench()
    paths = sorted((CAMVID / "val").glob("*.png"))[:4]
    original, upscaled = bench.compare(paths, 4, [None])
    assert abs(upscaled["final"] - original["final"]) <= 1.0, (original, upscaled)
    assert abs(upscaled["raw"] - original["raw"]) <= 1.0, (original, upscaled)


@pytest.mark.parametrize("shape", [(40, 57, 317, 451), (47, 61, 1700, 2300), (5, 7, 40, 56), (1, 3, 8, 30)])
def test_a_window_of_the_upsampling_equals_that_window_of_the_one_shot_call(shape):
    from segflow.models.upsampled_argmax import WindowUpsampler

    h, w, height, width = shape
    x = torch.randn(11, h, w, generator=torch.Generator().manual_seed(2)) * 5
    full = F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    windows = WindowUpsampler(x, height, width)
    for y0, y1, x0, x1 in [(0, height, 0, width), (0, min(height, 128), 0, min(width, 128)),
                           (height // 3, min(height, height // 3 + 37), width // 2, width - 1), (height - 5, height, width - 9, width)]:
        assert torch.equal(windows.window(y0, y1, x0, x1), full[:, y0:y1, x0:x1])
