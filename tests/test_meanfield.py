"""The torch mean-field CRF: exact against brute force, faithful to pydensecrf2, trainable.

Tolerances, and why:
- window backend, window covering the image, no downsampling: the same model as the brute
  force, so scores agree to float32 rounding (atol 2e-5 on scores of magnitude ~10).
- lattice backend vs brute force: the permutohedral lattice only approximates a Gaussian
  (Adams et al. 2010; in 5-D its kernel is off by ~25%), so on a 12 x 16 image we accept a
  mean |dQ| <= 0.08 and >= 88% argmax agreement. pydensecrf2 itself sits at the same
  distance from the exact CRF, which the test also checks: the gap is the lattice's.
- lattice vs pydensecrf2: the same algorithm, so probabilities agree to 1e-4, and argmax
  on >= 99% of CamVid pixels (lattice rounding flips a few ties on real images).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from segflow.errors import ConfigError
from segflow.models.crf.dense import CRFParams, refine_with_crf
from segflow.models.crf.meanfield import MeanFieldCRF, MeanFieldParams, unary_logits_from_probabilities

TINY = MeanFieldParams(gaussian_sxy=2.0, bilateral_sxy=6.0, bilateral_srgb=20.0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these inputs are small, and on a shared, busy CPU torch's thread
    pool spins against other processes (a 480 x 360 lattice CRF took 15 s on 2 threads, 1 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_inputs(seed=0, h=12, w=16, k=3):
    """Two noisy colour halves and random unaries: (H, W, 3) uint8 image, (K, H, W) probabilities."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.int64)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2 :] = (40, 40, 200)
    img = np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(k, h, w)) * 1.5), 0).numpy().astype(np.float32)
    return img, probs


def _tensors(img, probs):
    rgb = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    return unary_logits_from_probabilities(torch.from_numpy(probs)[None]), rgb


def brute_force_meanfield(unary: torch.Tensor, rgb: torch.Tensor, crf: MeanFieldCRF) -> torch.Tensor:
    """The same mean field with every pairwise kernel value computed exactly (O(P^2)), float64."""
    n, k, h, w = unary.shape
    p = crf.params
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(-1, 2).double()
    d_pos = torch.cdist(pos, pos) ** 2
    mu = crf.compatibility.detach().double()
    w_g, w_b = crf.gaussian_weight.detach().double(), crf.bilateral_weight.detach().double()
    out = []
    for b in range(n):
        colour = rgb[b].permute(1, 2, 0).reshape(-1, 3).double()
        d_col = torch.cdist(colour, colour) ** 2
        normalised = []
        for kernel in (
            torch.exp(-d_pos / (2 * p.gaussian_sxy**2)),
            torch.exp(-d_pos / (2 * p.bilateral_sxy**2) - d_col / (2 * p.bilateral_srgb**2)),
        ):
            norm = 1.0 / torch.sqrt(kernel.sum(1))
            normalised.append(norm[:, None] * kernel * norm[None, :])
        u = unary[b].reshape(k, -1).T.double()
        scores = u
        for _ in range(p.iterations):
            q = torch.softmax(scores, 1)
            scores = u - (w_g * (normalised[0] @ q) + w_b * (normalised[1] @ q)) @ mu.T
        out.append(scores.T.reshape(k, h, w))
    return torch.stack(out)


def _pydensecrf_q(img, probs, p: MeanFieldParams) -> np.ndarray:
    k, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=p.gaussian_sxy, compat=p.gaussian_compat)
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=np.ascontiguousarray(img), compat=p.bilateral_compat)
    return np.array(d.inference(p.iterations)).reshape(k, h, w)


@pytest.mark.parametrize("params", [TINY, MeanFieldParams(iterations=3)])
def test_window_covering_the_image_equals_brute_force(params):
    img, probs = _tiny_inputs()
    unary, rgb = _tensors(img, probs)
    crf = MeanFieldCRF(3, replace(params, backend="window", window_size=31, downsample=1))
    expected = brute_force_meanfield(unary, rgb, crf)
    torch.testing.assert_close(crf(unary, rgb).double(), expected, atol=2e-5, rtol=0)


def test_lattice_is_pydensecrf_and_both_approximate_brute_force_alike():
    img, probs = _tiny_inputs()
    unary, rgb = _tensors(img, probs)
    crf = MeanFieldCRF(3, TINY)
    q = torch.softmax(crf(unary, rgb), 1)[0].detach().numpy()
    q_exact = torch.softmax(brute_force_meanfield(unary, rgb, crf), 1)[0].numpy()
    q_densecrf = _pydensecrf_q(img, probs, TINY)

    np.testing.assert_allclose(q, q_densecrf, atol=1e-4)
    assert np.abs(q - q_exact).mean() <= 0.08
    assert (q.argmax(0) == q_exact.argmax(0)).mean() >= 0.88
    assert (q_densecrf.argmax(0) == q_exact.argmax(0)).mean() == (q.argmax(0) == q_exact.argmax(0)).mean()
    assert not np.array_equal(q.argmax(0), probs.argmax(0))  # the CRF changed something


@pytest.mark.parametrize("backend, downsample", [("lattice", 1), ("window", 2), ("window", 3)])
def test_a_batch_equals_its_images_one_by_one(backend, downsample):
    """Images of a batch share one lattice (grouped keys) or one tensor; none may leak into another."""
    pairs = [_tensors(*_tiny_inputs(seed)) for seed in (1, 2)]
    crf = MeanFieldCRF(3, replace(TINY, backend=backend, window_size=5, downsample=downsample))
    batched = crf(torch.cat([u for u, _ in pairs]), torch.cat([r for _, r in pairs]))
    for i, (unary, rgb) in enumerate(pairs):
        torch.testing.assert_close(batched[i : i + 1], crf(unary, rgb), atol=1e-5, rtol=0)


def test_lattice_agrees_with_pydensecrf_on_camvid(camvid):
    from segflow.models.probabilities import probabilities_from_logits
    from segflow.models.registry import load_model

    model = load_model()  # the bundled CamVid FCN-8s
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    crf_params = CRFParams()
    crf = MeanFieldCRF(model.labels.num_classes, MeanFieldParams.from_crf_params(crf_params, backend="lattice"))
    for path in sorted((camvid / "val").glob("*.png"))[:2]:
        rgb = np.array(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        image = torch.from_numpy(rgb).permute(2, 0, 1).float()
        with torch.inference_mode():
            logits = model.net.lowres_logits(((image / 255 - mean) / std)[None])[0].numpy()
        probs = probabilities_from_logits(logits, h, w)
        expected = refine_with_crf(rgb, probs, crf_params)
        labels = crf.refine(torch.from_numpy(probs)[None], image[None], probabilities=True)[0].numpy()
        agreement = (labels == expected).mean()
        assert agreement >= 0.99, f"{path.name}: lattice agrees with pydensecrf2 on {agreement:.4f} of pixels"
        assert (expected != probs.argmax(0)).mean() > 0.01  # the dense CRF moved enough pixels to matter


@pytest.mark.parametrize("backend, downsample", [("lattice", 1), ("window", 1), ("window", 2)])
def test_gradients_match_finite_differences(backend, downsample):
    img, probs = _tiny_inputs(h=3, w=4)
    unary, rgb = _tensors(img, probs)
    crf = MeanFieldCRF(3, replace(TINY, iterations=2, backend=backend, window_size=3, downsample=downsample)).double()
    with torch.no_grad():  # asymmetric, class-specific: gradients must not rely on the Potts start
        crf.compatibility.add_(0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        crf.bilateral_weight.mul_(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    names = ["gaussian_weight", "bilateral_weight", "compatibility"]

    def run(u, *weights):
        return torch.func.functional_call(crf, dict(zip(names, weights)), (u, rgb.double()))

    inputs = [unary.double().requires_grad_()] + [getattr(crf, n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ["lattice", "window"])
def test_one_optimiser_step_trains_compatibility_and_kernel_weights(backend):
    img, probs = _tiny_inputs()
    unary, rgb = _tensors(img, probs)
    crf = MeanFieldCRF(3, replace(TINY, backend=backend, window_size=5, downsample=1))
    before = {n: p.detach().clone() for n, p in crf.named_parameters()}
    target = torch.from_numpy(np.random.default_rng(4).integers(0, 3, (1, 12, 16)))
    optimiser = torch.optim.SGD(crf.parameters(), lr=1e-4)  # scores are ~15: steep in compatibility
    loss = torch.nn.functional.cross_entropy(crf(unary, rgb), target)
    loss.backward()
    optimiser.step()
    for name in ("compatibility", "gaussian_weight", "bilateral_weight"):
        assert not torch.equal(getattr(crf, name), before[name]), f"{name} did not move"
    assert not torch.equal(crf.compatibility, crf.compatibility.T)  # free to become asymmetric
    assert torch.nn.functional.cross_entropy(crf(unary, rgb), target) < loss
    assert sorted(n for n, _ in crf.named_buffers()) == ["bilateral_srgb", "bilateral_sxy", "gaussian_sxy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["lattice", "window"])
def test_cuda_gives_the_cpu_result(backend):
    img, probs = _tiny_inputs()
    unary, rgb = _tensors(img, probs)
    crf = MeanFieldCRF(3, replace(TINY, backend=backend, window_size=5, downsample=2))
    expected = crf(unary, rgb)
    got = crf.cuda()(unary.cuda(), rgb.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"iterations": 0}, "iterations"),
        ({"gaussian_sxy": 0.0}, "gaussian_sxy"),
        ({"bilateral_srgb": -1.0}, "bilateral_srgb"),
        ({"bilateral_compat": -2.0}, "bilateral_compat"),
        ({"backend": "crfasrnn"}, "backend"),
        ({"window_size": 4}, "window_size"),
        ({"downsample": 0}, "downsample"),
    ],
)
def test_bad_parameters_raise_one_line_config_errors(change, named):
    with pytest.raises(ConfigError, match=named) as info:
        MeanFieldParams(**change)
    assert "\n" not in str(info.value)


def test_lattice_rows_list_each_points_vertices_in_ascending_order():
    """The slice matrix is CSR built without sorting; cuSPARSE needs sorted columns per row."""
    from segflow.models.crf.permutohedral import PermutohedralLattice

    features = torch.rand(500, 5, generator=torch.Generator().manual_seed(0)) * 6
    for groups in (None, torch.arange(500) % 3):
        lattice = PermutohedralLattice.from_features(features, groups)
        assert (lattice.offsets[:, 1:] > lattice.offsets[:, :-1]).all()
        assert torch.allclose(lattice.weights.sum(1), torch.ones(500))


def test_wide_lattice_keys_filter_as_packed_ones(monkeypatch):
    """Keys too wide for one int64 (tiny bandwidths, huge images) take the row-sorting path."""
    from segflow.models.crf import permutohedral

    features = torch.rand(400, 5, generator=torch.Generator().manual_seed(1)) * 4
    groups = torch.arange(400) // 200
    values = torch.randn(400, 3, generator=torch.Generator().manual_seed(2))
    packed = permutohedral.PermutohedralLattice.from_features(features, groups)
    monkeypatch.setattr(permutohedral, "_MAX_KEY_BITS", 0)
    wide = permutohedral.PermutohedralLattice.from_features(features, groups)
    assert wide.num_vertices == packed.num_vertices
    torch.testing.assert_close(wide.filter(values), packed.filter(values))
    assert (wide.offsets[:, 1:] > wide.offsets[:, :-1]).all()
