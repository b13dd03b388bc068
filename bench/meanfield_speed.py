"""How fast is the torch mean-field CRF against pydensecrf2, and what do its backends' masks score?

    python bench/meanfield_speed.py                      # CPU, one torch thread, per-core numbers
    python bench/meanfield_speed.py --device cuda        # adds batched images/s on the GPU
    python bench/meanfield_speed.py --camvid 8           # also mIoU on 8 CamVid val images

1. Speed: ms per 480 x 360 image for pydensecrf2 (its C++ is single-threaded: one core) and
   for `MeanFieldCRF` with each backend on `--device`, at 12 and 21 classes and 5 and 10
   iterations, with the same parameters (CRFParams defaults), inference only. On the CPU,
   torch runs with `--threads` intra-op threads (1 by default, so the comparison is per
   core) and the figure is CPU time (`time.process_time`), which a shared, busy machine
   inflates less than wall time; wall time is printed beside it. On CUDA the figure is wall
   time after synchronising, one image at a time and then `--batch` images per call.
   Each figure is the median of `--repeats` runs after one warm-up.
2. Masks (`--camvid N`): the bundled model's probabilities on the first N CamVid val images,
   refined by pydensecrf2, the lattice and window backends (and window variants); mIoU over
   the 11 classes from the summed confusion matrix (void ignored), plus each one's pixel
   agreement with pydensecrf2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segflow.models.crf.dense import CRFParams, refine_with_crf
from segflow.models.crf.meanfield import MeanFieldCRF, MeanFieldParams, unary_logits_from_probabilities

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
HEIGHT, WIDTH = 360, 480
CASES = [(12, 5), (12, 10), (21, 5), (21, 10)]  # (classes, iterations)
WINDOW_VARIANTS = [(7, 1), (11, 2), (11, 4), (15, 4)]  # (window_size, downsample) for --camvid
VOID = 11


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the torch CRF's device; pydensecrf2 is CPU only)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (1: per-core comparison)")
    parser.add_argument("--batch", type=int, default=16, help="images per call for the batched GPU figure")
    parser.add_argument("--camvid", type=int, default=0, help="also score masks on this many CamVid val images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rgb = _image()
    print(f"480x360 image, torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}")
    print(_speed_table(rgb, device, args.repeats, args.batch))
    if args.camvid:
        print()
        print(_mask_table(args.camvid, device))


def _speed_table(rgb: np.ndarray, device: torch.device, repeats: int, batch: int) -> str:
    cuda = device.type == "cuda"
    unit = "ms wall" if cuda else "ms CPU (wall)"
    head = f"{'classes':>7} {'iters':>5} | {'pydensecrf2':>15} | {'lattice ' + unit:>22} | {'window ' + unit:>22}"
    if cuda:
        head += f" | {f'lattice img/s (x{batch})':>22} | {f'window img/s (x{batch})':>22}"
    lines = [head, "-" * len(head)]
    for classes, iterations in CASES:
        probs = _probabilities(classes, seed=classes)
        crf_params = CRFParams(iterations=iterations)
        dense = _time(lambda: refine_with_crf(rgb, probs, crf_params), repeats)
        row = f"{classes:>7} {iterations:>5} | {_fmt(dense, False):>15}"
        unary = unary_logits_from_probabilities(torch.from_numpy(probs)[None]).to(device)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None].to(device)
        for backend in ("lattice", "window"):
            crf = MeanFieldCRF(classes, MeanFieldParams.from_crf_params(crf_params, backend=backend)).to(device)
            row += f" | {_fmt(_time(lambda: _run(crf, unary, image), repeats), cuda):>22}"
        if cuda:
            many_unary, many_image = unary.expand(batch, -1, -1, -1).contiguous(), image.expand(batch, -1, -1, -1).contiguous()
            for backend in ("lattice", "window"):
                crf = MeanFieldCRF(classes, MeanFieldParams.from_crf_params(crf_params, backend=backend)).to(device)
                wall, _ = _time(lambda: _run(crf, many_unary, many_image), repeats)
                row += f" | {batch / wall * 1000:>22.1f}"
        lines.append(row)
    return "\n".join(lines)


def _mask_table(count: int, device: torch.device) -> str:
    from PIL import Image

    from segflow.models.probabilities import probabilities_from_logits
    from segflow.models.registry import load_model

    if not (CAMVID / "val").is_dir():
        return f"--camvid: no CamVid at {CAMVID}; mask scores skipped"
    model = load_model()
    mean, std = torch.tensor(model.mean).view(3, 1, 1), torch.tensor(model.std).view(3, 1, 1)
    params = CRFParams()
    variants = {"lattice": MeanFieldParams.from_crf_params(params, backend="lattice")}
    for size, down in WINDOW_VARIANTS:
        variants[f"window {size}x{size} /{down}"] = MeanFieldParams.from_crf_params(params, backend="window", window_size=size, downsample=down)
    crfs = {name: MeanFieldCRF(model.labels.num_classes, p).to(device) for name, p in variants.items()}
    names = ["raw (no CRF)", "pydensecrf2", *crfs]
    confusion = {name: np.zeros((VOID, VOID), np.int64) for name in names}
    agree = {name: 0 for name in names}
    pixels = 0
    paths = sorted((CAMVID / "val").glob("*.png"))[:count]
    for path in paths:
        rgb = np.array(Image.open(path).convert("RGB"))
        label = np.array(Image.open(CAMVID / "valannot" / path.name))
        image = torch.from_numpy(rgb).permute(2, 0, 1).float()
        with torch.inference_mode():
            logits = model.net.lowres_logits(((image / 255 - mean) / std)[None])[0].numpy()
        probs = probabilities_from_logits(logits, *rgb.shape[:2])
        masks = {"raw (no CRF)": probs.argmax(0), "pydensecrf2": refine_with_crf(rgb, probs, params)}
        for name, crf in crfs.items():
            masks[name] = crf.refine(torch.from_numpy(probs)[None].to(device), image[None].to(device), probabilities=True)[0].cpu().numpy()
        valid = label != VOID
        pixels += label.size
        for name, mask in masks.items():
            confusion[name] += np.bincount(label[valid] * VOID + mask[valid], minlength=VOID * VOID).reshape(VOID, VOID)
            agree[name] += int((mask == masks["pydensecrf2"]).sum())
    lines = [f"{len(paths)} CamVid val images, bundled model, CRFParams defaults", f"{'refinement':<22} | {'mIoU':>6} | {'= pydensecrf2':>13}", "-" * 48]
    for name in names:
        c = confusion[name]
        union = c.sum(0) + c.sum(1) - np.diag(c)
        iou = np.diag(c)[union > 0] / union[union > 0]  # classes neither present nor predicted: no score
        lines.append(f"{name:<22} | {100 * iou.mean():>6.2f} | {100 * agree[name] / pixels:>12.2f}%")
    return "\n".join(lines)


def _run(crf: MeanFieldCRF, unary: torch.Tensor, image: torch.Tensor) -> None:
    with torch.inference_mode():
        crf(unary, image).argmax(1)
    if unary.is_cuda:
        torch.cuda.synchronize()


def _time(fn, repeats: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of `repeats` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def _fmt(times: tuple[float, float], cuda: bool) -> str:
    wall, cpu = times
    return f"{wall:.1f}" if cuda else f"{cpu:.0f} ({wall:.0f})"


def _image() -> np.ndarray:
    """The first CamVid val image, or a smooth synthetic one of the same size without CamVid."""
    from PIL import Image

    paths = sorted((CAMVID / "val").glob("*.png"))
    if paths:
        return np.array(Image.open(paths[0]).convert("RGB"))
    g = torch.Generator().manual_seed(0)
    rgb = F.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 255, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return rgb[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def _probabilities(classes: int, seed: int) -> np.ndarray:
    """(K, 360, 480) float32 probabilities from smooth random stride-8 logits, as a network gives."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, classes, HEIGHT // 8, WIDTH // 8, generator=g) * 3
    return torch.softmax(F.interpolate(logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0], 0).numpy()


if __name__ == "__main__":
    main()
