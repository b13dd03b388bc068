"""`segment_flow`: segment the images under INPUT into masks and Parquet under OUTPUT.

A run into an OUTPUT that already holds results processes only what is new, changed
or produced with other model/CRF fingerprints (the engine's plan decides). The flow's
parameters are the branches of the job's configuration tree (`JobSpec`); it only turns them into a `SegmentConfig` and runs the stages
(flows/stages.py); `run_segment_flow` does the same for a caller that already has a
config, such as `segflow segment`.
"""

from __future__ import annotations

from prefect import flow

from segflow.flows.parameters import Execution, Incremental, JobSpec, Refinement, Storage, flow_parameters, run_name, storage_options_scope
from segflow.flows.stages import run_job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.job import RunSummary


@flow(name="segflow-segment", flow_run_name=run_name("segment"), validate_parameters=True)
def segment_flow(
    input: str,
    output: str,
    model: ModelRef = ModelRef(),
    refinement: Refinement = Refinement(),
    execution: Execution = Execution(),
    incremental: Incremental = Incremental(),
    storage: Storage = Storage(),
    wait_for_output_seconds: float | None = None,
) -> RunSummary:
    """Segment every image under `input` that `output` does not hold yet.

    Args:
        input: folder or URL of images (local path, file://, s3://, memory://, ...).
        output: where masks/, errors/ and the run manifest go.
        model: registry name, checkpoint URL, torchvision weights; all empty = bundled CamVid FCN-8s.
        refinement: the CRF kind (none, dense, ...) and the parameters set explicitly; each overrides only itself.
        execution: Ray address, shard size, batch size, actors, device: how the work runs, never what it produces.
        incremental: force (redo everything), prune (drop rows of deleted images), retry_errors, content_hash.
        storage: the name of a Prefect Secret block with JSON fsspec storage options (credentials), if any.
        wait_for_output_seconds: how long to wait while another run writes `output`; empty waits until it ends.
    """
    cfg = JobSpec(input=input, output=output, model=model, refinement=refinement, execution=execution, incremental=incremental, storage=storage).to_config()
    return run_job(cfg, "segment", wait_for_output_seconds).summary


def run_segment_flow(cfg: SegmentConfig, wait_for_output_seconds: float | None = None) -> RunSummary:
    """Run `segment_flow` in this process for an already-built config (the CLI's entry point).

    The config's storage options reach the flow through a context variable, not as
    parameters, so they are never written to Prefect's database.
    """
    with storage_options_scope(cfg.storage_options):
        return segment_flow(**flow_parameters(cfg), wait_for_output_seconds=wait_for_output_seconds)
