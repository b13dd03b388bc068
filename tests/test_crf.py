"""The CRF stage returns exactly what pydensecrf2 returns when called by hand."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax
import pytest
from PIL import Image

from segflow.models.crf.dense import CRFParams, DenseCRF
from segflow.models.probabilities import labels_and_confidence, probabilities_from_logits
from segflow.pipeline.refine import RefineContext, refine_item
from segflow.pipeline.masks import decode_mask
from segflow.models.labels import CAMVID


def _direct_pydensecrf(rgb, probs, p: CRFParams):
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(rgb.copy()), compat=p.bilateral_compat)
    return np.argmax(np.array(d.inference(p.iterations)), axis=0).reshape(h, w)


@pytest.fixture
def image_and_logits(tmp_path):
    rng = np.random.default_rng(3)
    h, w = 45, 61
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)
    rgb[:, w // 2 :] = (30, 30, 200)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    logits = rng.normal(size=(11, 6, 8)).astype(np.float32)  # stride-8 logits, upsampled by the stage
    logits[1, :, :4] += 1.5
    logits[3, :, 4:] += 1.5
    # read-only, PIL-backed image, as decoding from a file gives
    rgb_readonly = np.asarray(Image.fromarray(rgb))
    return rgb_readonly, logits


@pytest.mark.parametrize("params", [CRFParams(), CRFParams(iterations=10, bilateral_sxy=30, bilateral_srgb=5, bilateral_compat=4)])
def test_crf_stage_equals_direct_pydensecrf(image_and_logits, params):
    rgb, logits = image_and_logits
    h, w = rgb.shape[:2]
    probs = probabilities_from_logits(logits, h, w)
    expected = _direct_pydensecrf(rgb, probs, params)

    ctx = RefineContext(refiner=DenseCRF(params), num_classes=11, flat_palette=tuple(CAMVID.flat_palette()), fingerprints={})
    row = refine_item({"uri": "mem://x.png", "key": "k", "rgb": rgb, "logits": logits}, ctx, "s")["mask"]
    refined = decode_mask(row["mask"])
    raw = decode_mask(row["raw_mask"])
    assert np.array_equal(refined, expected)
    assert np.array_equal(raw, probs.argmax(0))
    assert not np.array_equal(refined, raw)  # the CRF did something on this input


def test_low_resolution_logits_give_the_networks_own_masks():
    import torch

    from segflow.models.fcn import build_fcn

    torch.manual_seed(0)
    net = build_fcn("fcn8s", "resnet18", 11).eval()
    x = torch.randn(1, 3, 71, 93)
    with torch.no_grad():
        full = net(x)[0].softmax(0).numpy()
        low = net.lowres_logits(x)[0].numpy()
    assert np.array_equal(probabilities_from_logits(low, 71, 93).argmax(0), full.argmax(0))


def test_raw_mask_and_confidence_equal_numpy_argmax_and_max():
    rng = np.random.default_rng(5)
    for classes, scale in ((11, 3.0), (2, 0.01), (40, 50.0), (1, 1.0)):
        logits = rng.normal(0, scale, (classes, 9, 12)).astype(np.float32)
        probs = probabilities_from_logits(np.round(logits) if classes == 11 else logits, 45, 61)  # rounded: ties
        labels, confidence = labels_and_confidence(probs)
        assert labels.dtype == np.uint8 and np.array_equal(labels, probs.argmax(0))
        assert np.array_equal(confidence, probs.max(0))
    tied = np.full((3, 4, 4), 0.5, np.float32)
    assert (labels_and_confidence(tied)[0] == 0).all()  # ties go to the first class, as np.argmax
    tied[1, 0, 0] = np.nan
    assert np.array_equal(labels_and_confidence(tied)[0], tied.argmax(0))
