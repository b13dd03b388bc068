"""How the CLI runs a job: plan, say what will happen, run, print the summary."""

from __future__ import annotations

import sys

from pipeline import job
from pipeline.config import SegmentConfig


def run_segment_job(cfg: SegmentConfig) -> job.RunSummary:
    summary = job.run_segment(cfg, on_plan=lambda plan: print(f"segflow: {plan.describe()}", file=sys.stderr))
    print_summary(summary)
    return summary


def print_summary(summary: job.RunSummary) -> None:
    print(f"segflow: {summary.describe()}")
