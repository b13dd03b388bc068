"""Listing and planning at a million images: time and peak memory.

    python bench/plan_scale.py --entries 1000000 --form parquet --json plan-1m.json
    python bench/plan_scale.py --entries 1000000 --form memory

`parquet`: a local .parquet manifest with uri, size and mtime columns (the fast path:
nothing is stat-ed), relative URIs spread over 1,000 folders, as an export of a bucket
inventory would be. `memory`: a memory:// filesystem holding the files themselves (1-byte
contents; listing is fsspec's `find`), in 10 folders, since fsspec's memory store lists
a folder by scanning every key.

The measured part, `list_stage` + `plan_stage` into an empty OUTPUT (every image is new
work, so every entry becomes a shard member), runs in a fresh child process, which
reports its wall time and `ru_maxrss`. With `memory` the store lives in that child too,
so its size is reported separately (RSS before and after building it).
Targets: under 60 s and 2 GB.
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
sys.path[:0] = [str(REPO)]

TARGET_SECONDS = 60.0
TARGET_MIB = 2048.0
FOLDERS = {"parquet": 1000, "memory": 10}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--form", choices=("parquet", "memory"), default="parquet")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(json.loads(args.child))))
        return 0
    with tempfile.TemporaryDirectory(prefix="segflow-plan-scale-") as tmp:
        spec = {"form": args.form, "entries": args.entries, "shard_size": args.shard_size, "tmp": tmp}
        if args.form == "parquet":
            t0 = time.perf_counter()
            spec["input"] = str(_write_parquet_manifest(Path(tmp) / "manifest.parquet", args.entries))
            print(f"wrote a {args.entries:,}-entry manifest in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            raise SystemExit(f"the measuring child failed (exit status {child.returncode})")
        result = json.loads(child.stdout.strip().splitlines()[-1])
    result["targets_met"] = {
        "under 60 s": result["list_and_plan_seconds"] < TARGET_SECONDS,
        "under 2 GB peak RSS": result["peak_rss_mib"] < TARGET_MIB,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _write_parquet_manifest(path: Path, entries: int) -> Path:
    """uri (relative: folder/name), size and mtime (ns) columns, built column-wise."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    index = pa.array(np.arange(entries))
    folder = pc.cast(pc.divide(index, pa.scalar(max(1, entries // FOLDERS["parquet"]))), pa.string())
    uri = pc.binary_join_element_wise("images/f", folder, "/img_", pc.cast(index, pa.string()), ".jpg", "")
    rng = np.random.default_rng(0)
    table = pa.table({
        "uri": uri,
        "size": pa.array(rng.integers(20_000, 400_000, entries)),
        "mtime": pa.array(1_700_000_000_000_000_000 + rng.integers(0, 10**15, entries)),
    })
    pq.write_table(table, path)
    return path


def _measure(spec: dict) -> dict:
    """In the fresh child: build the input if it is memory://, then time list_stage + plan_stage."""
    from segflow.pipeline import job
    from segflow.flows.parameters import Execution, JobSpec

    sys.path.insert(0, str(REPO / "bench"))
    from inputs import choose_model  # the bundled model when it exists, else a random-weight FCN-8s

    rss_after_imports = _max_rss_mib()
    input_url, store_seconds = spec.get("input"), None
    if spec["form"] == "memory":
        t0 = time.perf_counter()
        input_url = _fill_memory_store(spec["entries"])
        store_seconds = round(time.perf_counter() - t0, 2)
    rss_before = _max_rss_mib()
    cfg = JobSpec(input=input_url, output=str(Path(spec["tmp"]) / "out"), model=choose_model(),
                  execution=Execution(shard_size=spec["shard_size"])).to_config().with_(progress=False)
    t0 = time.perf_counter()
    manifest = job.list_stage(cfg)
    t1 = time.perf_counter()
    plan = job.plan_stage(cfg, manifest)
    t2 = time.perf_counter()
    return {
        "form": spec["form"],
        "entries": spec["entries"],
        "listed": manifest.num_rows,
        "shards": len(plan.shards),
        "shard_size": spec["shard_size"],
        "list_seconds": round(t1 - t0, 2),
        "plan_seconds": round(t2 - t1, 2),
        "list_and_plan_seconds": round(t2 - t0, 2),
        "peak_rss_mib": _max_rss_mib(),
        "rss_after_imports_mib": rss_after_imports,
        "rss_before_listing_mib": rss_before,
        **({"memory_store_build_seconds": store_seconds} if store_seconds is not None else {}),
    }


def _fill_memory_store(entries: int) -> str:
    """memory://scale/f<k>/img_<i>.jpg, 1-byte files, written straight into fsspec's store."""
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    fs = MemoryFileSystem()
    per_folder = max(1, entries // FOLDERS["memory"])
    for i in range(entries):
        path = f"/scale/f{i // per_folder}/img_{i}.jpg"
        fs.store[path] = MemoryFile(fs, path, b"x")
    fs.pseudo_dirs.extend(["/scale", *(f"/scale/f{k}" for k in range(FOLDERS["memory"]))])
    return "memory://scale"


def _max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    sys.exit(main())
