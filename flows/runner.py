"""How the CLI runs a job: through the Prefect flow (ephemeral API by default), then a summary."""

from __future__ import annotations

from pipeline import job
from pipeline.config import SegmentConfig


def preflight(cfg: SegmentConfig) -> None:
    """Check what the user named before Prefect and Ray start, so mistakes cost one line.

    INPUT (and LABELS) must exist, and the model must resolve: a registry name, a readable
    checkpoint, torchvision weights that are cached or downloadable.
    """
    from models.registry import describe_model, fetch_weights
    from pipeline.listing import check_input

    check_input(cfg.input, cfg.storage_options)
    if cfg.evaluation is not None:
        check_input(cfg.evaluation.labels, cfg.storage_options)
    m = cfg.model
    describe_model(m.model, m.checkpoint, m.weights, m.num_classes, m.seed, storage_options=cfg.storage_options)
    fetch_weights(m.model, m.weights)


def run_segment_job(cfg: SegmentConfig) -> job.RunSummary:
    from flows.segment import run_segment_flow

    preflight(cfg)
    summary = run_segment_flow(cfg)
    print_summary(summary)
    return summary


def run_evaluate_job(cfg: SegmentConfig) -> tuple[job.RunSummary, dict]:
    from flows.evaluate import run_evaluate_flow

    preflight(cfg)
    summary, evaluation = run_evaluate_flow(cfg)
    print_summary(summary)
    print_evaluation(evaluation)
    return summary, evaluation


def print_summary(summary: job.RunSummary) -> None:
    print(f"segflow: {summary.describe()}")


def print_evaluation(evaluation: dict) -> None:
    raw, crf = evaluation.get("raw") or {}, evaluation.get("crf") or {}
    line = f"segflow: mIoU raw {_pct(raw.get('miou'))}"
    if crf:
        line += f", CRF {_pct(crf.get('miou'))} ({_signed(crf.get('miou'), raw.get('miou'))})"
    print(f"{line}; report: {evaluation.get('report')}")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _signed(a, b) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.2f}"
