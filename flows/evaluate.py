"""`evaluate_flow`: segment IMAGES, score the masks against LABELS, write OUTPUT/report.html.

The same stages as `segment_flow`, with label pairing switched on (the engine then also
writes a confusion matrix per shard under OUTPUT/metrics/), followed by one more task
that merges those matrices into summary.json/summary.parquet and the HTML report. The
run's artifacts add mIoU without and with the CRF, per class, and a link to the report.
"""

from prefect import flow

from segflow.flows.parameters import Evaluation, Execution, Incremental, JobSpec, Pairing, Refinement, Storage, flow_parameters, run_name, storage_options_scope
from segflow.flows.stages import run_job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.errors import ConfigError
from segflow.pipeline.job import RunSummary


@flow(name="segflow-evaluate", flow_run_name=run_name("evaluate"), validate_parameters=True)
def evaluate_flow(
    images: str,
    labels: str,
    output: str,
    pairing: Pairing = Pairing(),
    model: ModelRef = ModelRef(),
    refinement: Refinement = Refinement(),
    execution: Execution = Execution(),
    incremental: Incremental = Incremental(),
    storage: Storage = Storage(),
    wait_for_output_seconds: float | None = None,
) -> dict:
    """Score a model (and the CRF's gain) on images with ground truth.

    Args:
        images: folder or URL of images.
        labels: folder or URL of ground-truth label images, paired with images by file stem.
        output: where masks, metrics, summary.json and report.html go.
        pairing: suffixes that pair image and label names, label format (index, palette, rgb), remapping.
        model, refinement, execution, incremental, storage, wait_for_output_seconds: as for segflow-segment.

    Returns {"run": RunSummary.to_dict(), "evaluation": summary.json's content, with "report"}.
    """
    cfg = JobSpec(
        input=images, output=output, model=model, refinement=refinement, execution=execution, incremental=incremental,
        storage=storage, evaluation=Evaluation(labels=labels, pairing=pairing),
    ).to_config()
    result = run_job(cfg, "evaluate", wait_for_output_seconds)
    return {"run": result.summary.to_dict(), "evaluation": result.evaluation}


def run_evaluate_flow(cfg: SegmentConfig, wait_for_output_seconds: float | None = None) -> tuple[RunSummary, dict]:
    """Run `evaluate_flow` in this process for a config with `evaluation` set (the CLI's entry point).

    Returns the run summary and the evaluation summary (mIoU raw/CRF, per class, "report").
    """
    if cfg.evaluation is None:
        raise ConfigError("evaluation needs labels: build the config with evaluation=LabelPairing(labels=...)")
    params = flow_parameters(cfg)
    params["images"] = params.pop("input")
    with storage_options_scope(cfg.storage_options):
        out = evaluate_flow(**params, wait_for_output_seconds=wait_for_output_seconds)
    return RunSummary(**out["run"]), out["evaluation"]
