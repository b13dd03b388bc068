"""Reading a benchmark run back: the committed masks, the ratios, the machine, a summary text."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil

STAGE_COLUMNS = ("seconds_read", "seconds_decode", "seconds_infer", "seconds_refine", "seconds_encode")
TARGETS = {"pipeline_vs_ideal": 0.9, "pipeline_vs_baseline": 1.3, "first_commit_from_process_start_seconds": 15.0}


def read_stage_seconds(output: str) -> dict:
    """Mean per-image seconds of each stage, from the masks rows' seconds_* columns."""
    import pyarrow.dataset as ds

    table = ds.dataset(f"{output}/masks", format="parquet").to_table(columns=list(STAGE_COLUMNS))
    return {c.removeprefix("seconds_"): round(float(np.mean(table.column(c).to_numpy(zero_copy_only=False))), 4) for c in STAGE_COLUMNS}


def first_commit_time(output: str) -> float:
    """Wall-clock time of the first committed shard: the oldest masks file (renamed into place)."""
    return min(p.stat().st_mtime for p in Path(output, "masks").glob("*.parquet"))


def steady_rate(output: str) -> float | None:
    """Images/s between the first and the last commit: throughput without startup and first shard."""
    import pyarrow.parquet as pq

    commits = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in Path(output, "masks").glob("*.parquet"))
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return None
    return round(sum(rows for _, rows in commits[1:]) / (commits[-1][0] - commits[0][0]), 3)


def agreement(output: str, base) -> dict:
    """Do the pipeline's stored masks equal the baseline's? Exact for all, per pixel for some."""
    import pyarrow.dataset as ds

    from baseline import mask_hash
    from segflow.pipeline.masks import decode_mask

    rows = ds.dataset(f"{output}/masks", format="parquet").to_table(columns=["uri", "mask"]).to_pylist()
    by_name = {Path(u).name: m for u, m in base.mask_hashes.items()}
    kept = {Path(u).name: m for u, m in base.kept_masks.items()}
    identical, pixels_equal, pixels = 0, 0, 0
    for row in rows:
        name = Path(row["uri"]).name
        mask = decode_mask(row["mask"])
        identical += mask_hash(mask) == by_name.get(name)
        if name in kept:
            pixels_equal += int((mask == kept[name]).sum())
            pixels += mask.size
    return {
        "masks_compared": len(rows),
        "masks_identical": identical,
        "pixel_agreement_on_first_images": round(pixels_equal / pixels, 6) if pixels else None,
    }


def mean_alone(before: dict, after: dict) -> dict:
    """The model and CRF timed alone right before and right after the pipeline: their mean, and both.

    The pipeline's ideal comes from this mean, so the ideal brackets the pipeline in time.
    `drift` is how much slower the machine did the same work after the pipeline than before
    it (a shared host's neighbours, clock changes): a run whose drift exceeds DRIFT_LIMIT
    cannot tell a 0.9x pipeline from a 1.0x one, and is flagged.
    """
    keys = ("model_cpu_seconds_per_image", "crf_cpu_seconds_per_image")
    shares = [s for s in (before["foreign_cpu_share"], after["foreign_cpu_share"]) if s is not None]
    drift = sum(after[k] for k in keys) / sum(before[k] for k in keys) - 1
    return {
        "images": before["images"],
        **{k: round((before[k] + after[k]) / 2, 4) for k in keys},
        "foreign_cpu_share": max(shares) if shares else None,
        "drift": round(drift, 4),
        "before_pipeline": before,
        "after_pipeline": after,
    }


def ratios(pipeline: dict, base, alone: dict) -> dict:
    cores = os.cpu_count()
    per_image = alone["model_cpu_seconds_per_image"] + alone["crf_cpu_seconds_per_image"]
    ideal = cores / per_image
    baseline_rate = base.images / base.seconds
    rate = pipeline["images_per_second"]
    figures = {
        "ideal_images_per_second": round(ideal, 3),
        "baseline_images_per_second": round(baseline_rate, 3),
        "pipeline_images_per_second": rate,
        "pipeline_images_per_second_end_to_end": pipeline["images_per_second_end_to_end"],
        "pipeline_vs_ideal": round(rate / ideal, 3),
        "pipeline_vs_baseline": round(rate / baseline_rate, 3),
        "pipeline_end_to_end_vs_baseline": round(pipeline["images_per_second_end_to_end"] / baseline_rate, 3),
        "first_commit_from_process_start_seconds": pipeline["first_commit"]["from_process_start_seconds"],
    }
    steady = pipeline.get("images_per_second_between_first_and_last_commit")
    if steady:
        figures["pipeline_steady_vs_ideal"] = round(steady / ideal, 3)
        figures["pipeline_steady_vs_baseline"] = round(steady / baseline_rate, 3)
    figures["targets_met"] = {
        "pipeline_vs_ideal >= 0.9": figures["pipeline_vs_ideal"] >= TARGETS["pipeline_vs_ideal"],
        "pipeline_vs_baseline >= 1.3": figures["pipeline_vs_baseline"] >= TARGETS["pipeline_vs_baseline"],
        "first commit < 15 s from process start": figures["first_commit_from_process_start_seconds"] < TARGETS["first_commit_from_process_start_seconds"],
    }
    return figures


def machine() -> dict:
    import ray
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def machine_load(seconds: float) -> dict:
    """How busy the machine is before the run, and the heaviest other processes (to judge a shared box)."""
    before = psutil.cpu_times()
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    after = psutil.cpu_times()
    busy = sum(getattr(after, f) - getattr(before, f) for f in ("user", "nice", "system", "irq", "softirq"))
    total = sum(after) - sum(before)
    heavy = []
    for p in procs:
        try:
            share = p.cpu_percent(None)
        except psutil.Error:
            continue
        if share >= 10 and p.pid != os.getpid():
            heavy.append({"pid": p.pid, "cpu_percent": share, "cmd": " ".join(p.info["cmdline"] or [p.info["name"] or ""])[:120]})
    return {"machine_cpu_utilisation": round(busy / total, 3) if total else None, "busy_processes": heavy}


class ForeignLoad:
    """Share of the machine's CPU that other processes used while the block ran in this one."""

    def __enter__(self) -> "ForeignLoad":
        self.share = None
        self._start = (time.perf_counter(), _busy(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start[0]
        foreign = (_busy() - self._start[1]) - (time.process_time() - self._start[2])
        self.share = round(max(0.0, foreign) / (wall * os.cpu_count()), 4) if wall else None


def _busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def git_head() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipeline", "models"], cwd=repo, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty(pipeline/models)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


FOREIGN_LIMIT = 0.03  # above this share of the machine used by others, a run is flagged
DRIFT_LIMIT = 0.05  # above this change in the machine's speed across the pipeline, a run is flagged


def trustworthy(report: dict) -> bool:
    """No phase disturbed by other processes, and the machine's speed steady across the pipeline."""
    undisturbed = all(v is None or v <= FOREIGN_LIMIT for v in foreign_shares(report).values())
    drift = report.get("alone", {}).get("drift")
    return undisturbed and (drift is None or abs(drift) <= DRIFT_LIMIT)


def foreign_shares(report: dict) -> dict:
    """The foreign CPU share of each measured phase of a run."""
    shares = {"pipeline": (report.get("pipeline", {}).get("cpu") or {}).get("foreign_cpu_share")}
    for phase in ("baseline", "alone"):
        if phase in report:
            shares[phase] = report[phase].get("foreign_cpu_share")
    return shares


def summary(report: dict) -> str:
    """The lines a person reads; the JSON has the rest."""
    if "memory_check" in report:
        m = report["memory_check"]
        lines = [f"memory check, pipeline only, sizes {m['sizes']}:"]
        for n, peak in m["peak_rss"].items():
            lines.append(f"  {n:>6} images: driver {peak['driver_mib']} MiB, tree sum {peak['tree_sum_mib']} MiB, largest by role {peak['largest_process_by_role_mib']}")
        lines.append(f"  large/small: {m['large_over_small']}  flat within 10%: {m['flat_within_10_percent']}")
        return "\n".join(lines)
    if "gpu_check" in report:
        return "\n".join(f"{k}: {v}" for k, v in report["gpu_check"].items())
    run, p = report["run"], report["pipeline"]
    lines = [
        f"{run['images']} {run['source']} images {run['image_size']}, model {run['model_fingerprint']}, crf {'on' if run['crf'] else 'off'}, "
        f"{report['machine']['cores']} cores; load before: {report['load_before']['machine_cpu_utilisation']}",
    ]
    if report["load_before"]["busy_processes"]:
        lines.append(f"  WARNING: other busy processes: {[b['cmd'][:60] for b in report['load_before']['busy_processes']]}")
    foreign = {k: v for k, v in foreign_shares(report).items() if v is not None and v > FOREIGN_LIMIT}
    if foreign:
        lines.append(f"  WARNING: other processes used the CPU during the run (share of the machine): {foreign}; these figures are not trustworthy")
    drift = report.get("alone", {}).get("drift")
    if drift is not None and abs(drift) > DRIFT_LIMIT:
        lines.append(f"  WARNING: the machine did the same work {100 * drift:+.1f}% slower after the pipeline than before it; these figures are not trustworthy")
    if "ratios" in report:
        r, b, a = report["ratios"], report["baseline"], report["alone"]
        lines += [
            f"images/s: pipeline {r['pipeline_images_per_second']} (end to end {r['pipeline_images_per_second_end_to_end']}), "
            f"baseline {r['baseline_images_per_second']}, ideal {r['ideal_images_per_second']}",
            f"pipeline/ideal {r['pipeline_vs_ideal']}, pipeline/baseline {r['pipeline_vs_baseline']} (end to end {r['pipeline_end_to_end_vs_baseline']}; "
            f"between first and last commit: {r.get('pipeline_steady_vs_ideal')} of ideal, {r.get('pipeline_steady_vs_baseline')} of baseline)",
            f"alone, CPU s/image: model {a['model_cpu_seconds_per_image']}, crf {a['crf_cpu_seconds_per_image']} (mean of "
            f"{a['before_pipeline']['model_cpu_seconds_per_image']}/{a['before_pipeline']['crf_cpu_seconds_per_image']} before the pipeline and "
            f"{a['after_pipeline']['model_cpu_seconds_per_image']}/{a['after_pipeline']['crf_cpu_seconds_per_image']} after the pipeline)",
            f"baseline s/image: {b['stage_seconds_per_image']}",
            f"masks identical to baseline: {report['agreement']['masks_identical']}/{report['agreement']['masks_compared']}",
        ]
    else:
        lines.append(f"images/s: pipeline {p['images_per_second']} (end to end {p['images_per_second_end_to_end']})")
    lines += [
        f"pipeline s/image (masks rows): {p['masks']}",
        f"first commit: {p['first_commit']}",
        f"cpu: {p['cpu']}",
        f"peak rss: {p['peak_rss']}",
    ]
    if "ratios" in report:
        lines.append(f"targets: {report['ratios']['targets_met']}")
    return "\n".join(lines)
