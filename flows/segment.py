"""`segment_flow`: segment the images under INPUT into masks and Parquet under OUTPUT.

A run into an OUTPUT that already holds results processes only what is new, changed
or produced with other model/CRF fingerprints (the engine's plan decides). The flow
itself only turns parameters into a `SegmentConfig` and runs the stages
(flows/stages.py); `run_segment_flow` does the same for a caller that already has a
config, such as `segflow segment`.
"""

from __future__ import annotations

from prefect import flow

from segflow.flows.parameters import Execution, Refinement, flow_parameters, run_name, segment_config, storage_options_scope
from segflow.flows.stages import run_job
from segflow.pipeline.config import ModelRef, SegmentConfig
from segflow.pipeline.job import RunSummary


@flow(name="segflow-segment", flow_run_name=run_name("segment"), validate_parameters=True)
def segment_flow(
    input: str,
    output: str,
    model: ModelRef = ModelRef(),
    refinement: Refinement = Refinement(),
    ray_address: str | None = None,
    execution: Execution = Execution(),
    force: bool = False,
    prune: bool = False,
    retry_errors: bool = False,
    content_hash: bool = False,
    storage_secret: str | None = None,
    wait_for_output_seconds: float | None = None,
) -> RunSummary:
    """Segment every image under `input` that `output` does not hold yet.

    Args:
        input: folder or URL of images (local path, file://, s3://, memory://, ...).
        output: where masks/, errors/ and the run manifest go.
        model: registry name, checkpoint URL, torchvision weights; all empty = bundled CamVid FCN-8s.
        refinement: the CRF kind (none, dense, ...) and the parameters set explicitly; each overrides only itself.
        ray_address: Ray cluster to join ("auto", "ray://head:10001"); empty starts a local Ray.
        execution: shard size, batch size, actors, device: how the work runs, never what it produces.
        force: reprocess everything, even images whose masks are up to date.
        prune: delete rows of images no longer under `input`.
        retry_errors: reprocess images that ended as error rows last time.
        content_hash: key images by content hash instead of size+version (slower listing; robust to touch/copy).
        storage_secret: name of a Prefect Secret block with JSON fsspec storage options (credentials).
        wait_for_output_seconds: how long to wait while another run writes `output`; empty waits until it ends.
    """
    cfg = segment_config(
        input, output, model=model, refinement=refinement, ray_address=ray_address,
        execution=execution, force=force, prune=prune, retry_errors=retry_errors, content_hash=content_hash,
        storage_secret=storage_secret,
    )
    return run_job(cfg, "segment", wait_for_output_seconds).summary


def run_segment_flow(cfg: SegmentConfig, wait_for_output_seconds: float | None = None) -> RunSummary:
    """Run `segment_flow` in this process for an already-built config (the CLI's entry point).

    The config's storage options reach the flow through a context variable, not as
    parameters, so they are never written to Prefect's database.
    """
    with storage_options_scope(cfg.storage_options):
        return segment_flow(**flow_parameters(cfg), wait_for_output_seconds=wait_for_output_seconds)
