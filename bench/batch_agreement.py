"""Does --batch-size change masks? The real pipeline on CamVid val images at two batch sizes.

    python bench/batch_agreement.py --images 32 --batch-sizes 1 4

Runs `segflow.pipeline.job.run_segment` (bundled model, its dense CRF, local Ray) once per
batch size into separate OUTPUTs and compares every image's stored `mask` and `raw_mask`
bytes, and the share of differing pixels where they differ. The figure behind
flows/parameters.py's note on batch_size (why it is not part of the fingerprint).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid" / "val"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 4])
    args = parser.parse_args(argv)

    from segflow.pipeline import job
    from segflow.flows.parameters import Execution, JobSpec
    from segflow.pipeline.masks import decode_mask
    from segflow.pipeline.reader import read_masks

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(str(p) for p in sorted(CAMVID.glob("*.png"))[: args.images]) + "\n")
        masks = {}
        for batch in args.batch_sizes:
            out = Path(tmp) / f"out-{batch}"
            spec = JobSpec(input=str(listing), output=str(out), execution=Execution(batch_size=batch))  # built as the CLI builds jobs
            job.run_segment(spec.to_config().with_(progress=False))
            masks[batch] = {r["uri"]: r for r in read_masks(str(out), columns=["uri", "mask", "raw_mask"]).to_pylist()}
    a, b = (masks[s] for s in args.batch_sizes)
    report = {"images": len(a), "batch_sizes": args.batch_sizes}
    for column in ("raw_mask", "mask"):
        differing = [u for u in a if a[u][column] != b[u][column]]
        pixels = [float(np.mean(decode_mask(a[u][column]) != decode_mask(b[u][column]))) for u in differing]
        report[column] = {"identical": len(a) - len(differing), "differing": len(differing),
                          "max_pixel_share_differing": max(pixels, default=0.0)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
