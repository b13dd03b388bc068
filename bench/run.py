"""Where segflow's time goes: the real pipeline against a sequential baseline and the ideal.

    python bench/run.py --images 200 --json bench-200.json
    python bench/run.py --images 2000 --source generated --no-crf --memory-check --json mem.json
    python bench/run.py --gpu-check --json gpu.json

One run prepares N image files, then
  1. runs the plain sequential baseline over them (`baseline.run_baseline`) and times the
     model and the CRF alone, single-threaded, in CPU seconds (`baseline.measure_alone`);
  2. runs the real pipeline (`segflow.pipeline.job.run_segment`, a real local Ray) in a fresh
     child process, so that startup is measured from a cold interpreter, while a sampling
     thread here follows the child's process tree (CPU seconds by role, peak RSS);
  3. reads the committed masks back: per-stage seconds from their seconds_* columns, and
     whether every mask equals the baseline's.
It prints a summary and writes everything as JSON. Ratios are only meaningful between
numbers of the same run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import report as report_module  # noqa: E402  (bench/report.py, after the path is set)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return _pipeline_child(json.loads(args.child))
    if args.gpu_check:
        from gpu_check import gpu_check

        report = gpu_check(_model_ref(args), images=args.images, batch_size=args.batch_size, compile=args.compile)
    elif args.memory_check:
        report = memory_check(args)
    else:
        report = benchmark(args)
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text if args.verbose else report_module.summary(report))
    return 0


def benchmark(args, baseline: bool = True) -> dict:
    """Prepare the images, run the baseline and the pipeline on them; the report as a dict."""
    import numpy as np

    from inputs import prepare_images
    from segflow.pipeline import job

    with tempfile.TemporaryDirectory(prefix="segflow-bench-", dir=args.work_dir) as tmp:
        paths = prepare_images(args.source, args.images, Path(tmp) / "images")
        cfg = _config(args, Path(tmp))
        plan = job.plan_stage(cfg, job.list_stage(cfg))
        report = {"machine": report_module.machine(), "run": _describe_run(args, cfg, plan, paths), "load_before": report_module.machine_load(2.0)}
        if baseline and not args.no_baseline:
            from baseline import Model, measure_alone, run_baseline
            from segflow.models.labels import LabelSet

            model = Model.load(cfg.model)
            palette = LabelSet.from_dict(plan.labels).flat_palette()
            with report_module.ForeignLoad() as baseline_load:
                base = run_baseline(paths, model, plan.refinement.params, palette, cfg.max_pixels)
            sample = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(len(paths), args.ideal_images))]
            with report_module.ForeignLoad() as alone_load:
                alone = measure_alone(sample, model, plan.refinement.params, cfg.max_pixels)
            del model
        pipeline = run_pipeline(cfg, args.monitor_interval, 1.0 if args.memory_check else None)
        if baseline and not args.no_baseline:  # once more after the pipeline: the spread shows the machine's drift
            model = Model.load(cfg.model)
            with report_module.ForeignLoad() as again_load:
                again = measure_alone(sample, model, plan.refinement.params, cfg.max_pixels)
            del model
        if pipeline["summary"]["model_fingerprint"] != plan.model_fingerprint:
            raise SystemExit(
                f"the model changed during the benchmark ({plan.model_fingerprint} -> {pipeline['summary']['model_fingerprint']}): "
                "was the bundled model re-released meanwhile? Rerun, or pass --checkpoint with a private copy"
            )
        pipeline["masks"] = report_module.read_stage_seconds(cfg.output)
        report["pipeline"] = pipeline
        if baseline and not args.no_baseline:
            report["baseline"] = {**base.as_dict(), "foreign_cpu_share": baseline_load.share}
            report["alone"] = report_module.mean_alone(
                {**alone, "foreign_cpu_share": alone_load.share}, {**again, "foreign_cpu_share": again_load.share}
            )
            report["agreement"] = report_module.agreement(cfg.output, base)
            report["ratios"] = report_module.ratios(pipeline, base, report["alone"])
        report["foreign_cpu_shares"] = report_module.foreign_shares(report)
        report["trustworthy"] = report_module.trustworthy(report)
    return report


def run_pipeline(cfg, interval: float, pss_interval: float | None = None) -> dict:
    """Run `run_segment(cfg)` in a fresh child process and watch its process tree from here."""
    from monitor import TreeMonitor

    markers = Path(cfg.output).parent / "markers"
    markers.mkdir()
    spec = {"config": _config_spec(cfg), "markers": str(markers)}
    t_spawn = time.time()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], cwd=REPO)
    monitor = TreeMonitor(child.pid, interval, pss_interval).start()
    start_mark = end_mark = None
    while child.poll() is None and end_mark is None:
        if start_mark is None and (markers / "started").exists():
            start_mark = monitor.mark()
        if (markers / "result.json").exists():
            end_mark = monitor.mark()
        time.sleep(0.05)
    rc = child.wait()
    monitor.stop()
    if rc != 0 or end_mark is None:
        raise SystemExit(f"the pipeline child failed (exit status {rc}); its output is above")
    result = json.loads((markers / "result.json").read_text())
    summary = result["summary"]
    first_commit = report_module.first_commit_time(cfg.output)
    job_seconds = result["job_end"] - result["job_start"]
    return {
        "summary": summary,
        "images_per_second": summary["images_per_second"],  # masks / executor seconds (Ray already up)
        "images_per_second_end_to_end": round(summary["masks"] / job_seconds, 3),  # incl. listing, Ray start
        "images_per_second_between_first_and_last_commit": report_module.steady_rate(cfg.output),
        "job_seconds": round(job_seconds, 3),
        "interpreter_and_imports_seconds": round(result["job_start"] - t_spawn, 3),
        "first_commit": {
            "from_executor_start_seconds": summary["seconds_to_first_commit"],
            "from_job_start_seconds": round(first_commit - result["job_start"], 3),
            "from_process_start_seconds": round(first_commit - t_spawn, 3),
        },
        "cpu": _cpu_report(monitor.window(start_mark, end_mark), summary["masks"]) if start_mark else None,
        "peak_rss": monitor.peak_rss(),
        "rss_timeline_mib": monitor.timeline,  # to tell a plateau from growth
        "driver_max_rss_mib": result["driver_max_rss_mib"],
    }


def _cpu_report(window, images: int) -> dict:
    report = window.as_dict()
    report["cpu_seconds_per_image_by_role"] = {k: round(v / max(1, images), 4) for k, v in sorted(window.cpu_by_role.items())}
    return report


_FLAT_KEYS = ("driver_mib", "tree_sum_mib", "tree_pss_sum_mib", "largest model actor", "largest crf workers")


def memory_check(args) -> dict:
    """Peak RSS of the pipeline at two sizes; flat memory means the larger is within 10%."""
    small, large = (int(n) for n in args.memory_sizes.split(","))
    runs = {}
    for n in (small, large):
        args.images = n
        runs[n] = benchmark(args, baseline=False)
    peaks = {n: {**r["pipeline"]["peak_rss"], "driver_ru_maxrss_mib": r["pipeline"]["driver_max_rss_mib"]} for n, r in runs.items()}
    ratio = {
        key: peaks[large][key] / peaks[small][key]
        for key in ("driver_mib", "driver_ru_maxrss_mib", "tree_sum_mib", "tree_pss_sum_mib")
        if peaks[small].get(key)
    }
    for role, mib in peaks[small]["largest_process_by_role_mib"].items():
        if mib and role in peaks[large]["largest_process_by_role_mib"]:
            ratio[f"largest {role}"] = peaks[large]["largest_process_by_role_mib"][role] / mib
    return {
        "memory_check": {
            "sizes": [small, large],
            "peak_rss": peaks,
            "large_over_small": {k: round(v, 3) for k, v in ratio.items()},
            # judged on the totals and the two worker kinds; small Ray agents are listed, not judged
            "flat_within_10_percent": all(v <= 1.10 for k, v in ratio.items() if k in _FLAT_KEYS),
        },
        "runs": runs,
    }


# --- the child: one real pipeline run in a fresh interpreter ------------------------------


def _pipeline_child(spec: dict) -> int:
    import resource

    from segflow.flows.parameters import JobSpec
    from segflow.pipeline.job import run_segment

    cfg = JobSpec.model_validate_json(spec["config"]).to_config().with_(progress=False)
    markers = Path(spec["markers"])
    job_start = time.time()
    (markers / "started").write_text(str(job_start))
    summary = run_segment(cfg)
    job_end = time.time()
    result = {
        "summary": summary.to_dict(),
        "job_start": job_start,
        "job_end": job_end,
        "driver_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (markers / "result.json.tmp").write_text(json.dumps(result))
    os.replace(markers / "result.json.tmp", markers / "result.json")
    import ray

    ray.shutdown()
    return 0


# --- configuration -----------------------------------------------------------------------


def _model_ref(args):
    from inputs import choose_model

    return choose_model(args.checkpoint, args.model, args.weights, args.num_classes)


def _config(args, tmp: Path):
    """The benched job, built and validated as the CLI and the flows build theirs: through the job tree."""
    from segflow.flows.parameters import Execution, JobSpec, Refinement

    return JobSpec(
        input=str(tmp / "images"),
        output=str(tmp / "out"),
        model=_model_ref(args),
        refinement=Refinement(kind="none" if args.no_crf else "dense"),
        execution=Execution(
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            model_actors=args.model_actors,
            crf_workers=args.crf_workers,
            max_shards_in_flight=args.max_shards_in_flight,
            device="cpu",
        ),
    ).to_config().with_(progress=False)


def _config_spec(cfg) -> str:
    from segflow.flows.parameters import JobSpec

    return JobSpec.from_config(cfg).model_dump_json()


def _describe_run(args, cfg, plan, paths) -> dict:
    from PIL import Image

    with Image.open(paths[0]) as first:
        size = first.size
    return {
        "images": len(paths),
        "source": args.source,
        "image_size": f"{size[0]}x{size[1]}",
        "model": asdict(cfg.model),
        "model_fingerprint": plan.model_fingerprint,
        "crf": asdict(plan.refinement.params) if plan.refinement.params is not None else None,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "max_shards_in_flight": cfg.max_shards_in_flight,
        "model_actors": cfg.model_actors,
        "crf_workers": cfg.crf_workers,
        "git": report_module.git_head(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--source", choices=("camvid", "generated"), default="camvid", help="real CamVid (cycled past 468) or generated 480x360 street scenes")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--model", default="auto", help="auto (the bundled model if present, else a random-weight fcn8s_resnet18), bundled, or a registry name")
    p.add_argument("--weights", default="none", help="with --model NAME: torchvision weights or none")
    p.add_argument("--num-classes", type=int, default=11, help="with --model NAME --weights none")
    p.add_argument("--checkpoint", help="a segflow checkpoint (local path or URL)")
    p.add_argument("--no-crf", action="store_true", help="skip the dense CRF in both pipeline and baseline")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-shards-in-flight", type=int)
    p.add_argument("--model-actors", type=int)
    p.add_argument("--crf-workers", type=int)
    p.add_argument("--no-baseline", action="store_true", help="run only the pipeline")
    p.add_argument("--ideal-images", type=int, default=24, help="images over which the model and CRF are timed alone (default 24)")
    p.add_argument("--memory-check", action="store_true", help="peak RSS at the two --memory-sizes, pipeline only")
    p.add_argument("--memory-sizes", default="200,2000")
    p.add_argument("--gpu-check", action="store_true", help="model-stage images/s vs a bare model loop, and bf16 vs fp32 masks")
    p.add_argument("--compile", action="store_true", help="with --gpu-check: torch.compile the model stage")
    p.add_argument("--monitor-interval", type=float, default=0.25, help="seconds between process-tree samples")
    p.add_argument("--work-dir", help="where the temporary images and output go (default: the system temp dir)")
    p.add_argument("--verbose", action="store_true", help="print the whole JSON report")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main())
