"""How the CLI runs a job: plan, say what will happen, run, print the summary."""

from __future__ import annotations

import sys

from pipeline import job
from pipeline.config import SegmentConfig


def run_segment_job(cfg: SegmentConfig) -> job.RunSummary:
    summary = job.run_segment(cfg, on_plan=_announce)
    print_summary(summary)
    return summary


def run_evaluate_job(cfg: SegmentConfig) -> tuple[job.RunSummary, dict]:
    manifest = job.list_stage(cfg)
    plan = job.plan_stage(cfg, manifest)
    _announce(plan)
    summary = job.summarise_stage(cfg, plan, job.run_stage(cfg, plan))
    evaluation = job.finish_evaluation(cfg, plan)
    print_summary(summary)
    print_evaluation(evaluation)
    return summary, evaluation


def print_summary(summary: job.RunSummary) -> None:
    print(f"segflow: {summary.describe()}")


def print_evaluation(evaluation: dict) -> None:
    raw, crf = evaluation.get("raw", {}), evaluation.get("crf") or {}
    line = f"segflow: mIoU raw {_pct(raw.get('miou'))}"
    if crf:
        line += f", CRF {_pct(crf.get('miou'))} ({_signed(crf.get('miou'), raw.get('miou'))})"
    print(f"{line}; report: {evaluation.get('report')}")


def _announce(plan: job.Plan) -> None:
    print(f"segflow: {plan.describe()}", file=sys.stderr)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _signed(a, b) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.2f}"
