"""Peak memory and seconds of the model actor's work on one large photo, per mode (issue 21).

    python bench/large_images.py [--sizes 0.2,12,24,48] [--modes default,full,tiles] [--limit-gb 8]

For each (mode, size) a fresh Python process builds the model actor's class
(`ModelWorker`, the bundled CamVid FCN-8s, one torch thread) and runs one shard of one
JPEG through it with the dense CRF, exactly as a CPU-only cluster's actor does
(`infer_shard` with a refine context: decode, network, CRF, masks, PNG encoding). It
reports the process's peak RSS (`resource.getrusage`), its RSS after loading the model,
and the seconds of the shard. The parent watches each child's RSS with psutil and kills
it above `--limit-gb`, so a full-resolution run cannot take the machine's memory from
other processes (it is then reported as over the limit, which is the point of the issue).

Images are a CamVid-like street sample (samples/street) upscaled to each size, 4:3, JPEG
quality 90. Modes: `default` (the bundled model's default working size), `full`
(--working-size full: today's behaviour before issue 21), `tiles` (--tiles 512,384 at
full resolution). Seconds on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "street" / "street_01.jpg"
MODES = {"default": {}, "full": {"working_size": "full"}, "tiles": {"tiles": (512, 384)}}


def make_image(megapixels: float, folder: Path) -> Path:
    """A 4:3 JPEG of about `megapixels`, upscaled from a street sample."""
    from PIL import Image

    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5)) // 32 * 32  # 0.2 Mpx: 512x384, at the fallback working size
    height = width * 3 // 4
    path = folder / f"street_{megapixels:g}mpx.jpg"
    if not path.exists():
        Image.open(SAMPLE).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def measure_one(mode: str, image: str) -> dict:
    """In this (fresh) process: the actor's work on one image; -> peak RSS and seconds."""
    import psutil

    from segflow.models.catalog import describe_model
    from segflow.models.crf import resolve_refinement
    from segflow.pipeline.config import ModelRef
    from segflow.pipeline.inference import InferenceOptions, ModelWorker
    from segflow.pipeline.refine import RefineContext
    from segflow.pipeline.sharding import Shard

    info = describe_model(None, None, None, None, 0)
    worker = ModelWorker(ModelRef(**MODES[mode]), InferenceOptions(max_pixels=200_000_000))
    context = RefineContext(
        refiner=resolve_refinement("dense", {}, info.meta.get("crf")),
        num_classes=info.labels.num_classes,
        flat_palette=tuple(info.labels.flat_palette()),
        fingerprints={},
    )
    rss_loaded = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    (out,) = list(worker.infer_shard(Shard("bench", (image,), ("k",), (None,)), context))
    seconds = time.perf_counter() - t0
    row = out.get("mask") or out["error"]
    assert "mask" in out, row
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loaded_rss_mb": rss_loaded / 2**20,
        "seconds": seconds,
        "height": row["height"],
        "width": row["width"],
        **{k: round(row[k], 3) for k in ("seconds_decode", "seconds_infer", "seconds_refine", "seconds_encode")},
    }


def run_child(mode: str, image: Path, limit_bytes: int, timeout: float) -> dict:
    """One measurement in a fresh process, killed above `limit_bytes` of RSS or after `timeout` s."""
    import psutil

    child = subprocess.Popen([sys.executable, __file__, "--one", mode, str(image)], stdout=subprocess.PIPE, text=True)
    proc, peak, start = psutil.Process(child.pid), 0, time.monotonic()
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > limit_bytes or time.monotonic() - start > timeout:
            child.kill()
            child.wait()
            why = f"over {limit_bytes / 2**30:.0f} GB RSS" if peak > limit_bytes else f"over {timeout:.0f} s"
            return {"killed": why, "seconds": time.monotonic() - start, "peak_rss_mb": peak / 2**20}
        time.sleep(0.1)
    out = child.stdout.read()
    if child.returncode != 0:
        return {"killed": f"exit {child.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.2,12,24,48", help="megapixels, comma-separated (default 0.2,12,24,48)")
    p.add_argument("--modes", default="default,full,tiles", help="comma-separated of default, full, tiles")
    p.add_argument("--limit-gb", type=float, default=8.0, help="kill a measurement above this RSS (default 8)")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a measurement after this many seconds (default 900)")
    p.add_argument("--skip", default="", help="mode:size pairs not to run, e.g. full:48,tiles:48")
    p.add_argument("--one", nargs=2, metavar=("MODE", "IMAGE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return
    skip = set(filter(None, args.skip.split(",")))
    sizes = [float(s) for s in args.sizes.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="segflow-large-"))
    results = []
    for mode in args.modes.split(","):
        for mpx in sizes:
            if f"{mode}:{mpx:g}" in skip:
                results.append({"mode": mode, "mpx": mpx, "killed": "skipped"})
                continue
            image = make_image(mpx, folder)
            r = {"mode": mode, "mpx": mpx, **run_child(mode, image, int(args.limit_gb * 2**30), args.timeout)}
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    base = {r["mode"]: r for r in results if r["mpx"] == min(sizes) and "killed" not in r}
    print("| mode | Mpx | size | peak RSS MB | RSS after load MB | seconds | RSS / 0.2 Mpx | (RSS - decoded image) / 0.2 Mpx | seconds / 0.2 Mpx | decode / infer / refine / encode s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "killed" in r:
            print(f"| {r['mode']} | {r['mpx']:g} | | {r.get('peak_rss_mb', 0):.0f}+ | | {r.get('seconds', 0):.0f}+ | killed: {r['killed']} | | | |")
            continue
        b = base.get(r["mode"])
        decoded_mb = r["height"] * r["width"] * 3 / 2**20
        ratio = lambda key: f"{r[key] / b[key]:.2f}" if b else ""  # noqa: E731
        net = f"{(r['peak_rss_mb'] - decoded_mb) / b['peak_rss_mb']:.2f}" if b else ""
        stages = " / ".join(f"{r[k]:.1f}" for k in ("seconds_decode", "seconds_infer", "seconds_refine", "seconds_encode"))
        print(
            f"| {r['mode']} | {r['mpx']:g} | {r['width']}x{r['height']} | {r['peak_rss_mb']:.0f} | {r['loaded_rss_mb']:.0f} | {r['seconds']:.1f} "
            f"| {ratio('peak_rss_mb')} | {net} | {ratio('seconds')} | {stages} |"
        )
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in __import__('os').getloadavg())} on {__import__('os').cpu_count()} cores")


if __name__ == "__main__":
    main()
