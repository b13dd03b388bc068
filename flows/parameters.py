"""Flow parameters <-> `SegmentConfig`: the one place the three flows build their job.

The flows take typed parameters so Prefect's UI renders a form: the engine's own
frozen dataclass `ModelRef`, and small pydantic models for the rest: `Refinement`
(the CRF kind and its explicit parameters), `Execution` (how the work runs; never
changes a mask) and `Pairing` (how evaluation finds labels). Their defaults are read from the engine's
dataclasses, so a default changes in `pipeline/config.py` and nowhere else.

`segment_config` builds the config from flow parameters and `flow_parameters` is its
inverse, used when the CLI already holds a config (`run_segment_flow`). Every config
field is covered by one or the other; `tests/test_flows.py` round-trips a config whose
every field differs from its default, so a field added to `SegmentConfig` fails that
test instead of being dropped silently.

Storage credentials never become flow parameters: Prefect stores every flow run's
parameters in its database and shows them in the UI. They come from the environment
(fsspec's own credential chain: AWS_* variables, ~/.aws, instance roles), from a
Prefect Secret block named by `storage_secret`, or, for an in-process call that
already holds them, from `storage_options_scope` (see `run_segment_flow`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import MISSING, fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from segflow.pipeline.config import LabelPairing, ModelRef, SegmentConfig
from segflow.errors import ConfigError


def _default(cls, name: str):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


class Execution(BaseModel):
    """How the work is spread over Ray, and at what precision the network runs.

    Only `autocast` changes masks (bf16 agrees with fp32 on ~99.7 % of pixels), so its
    effective value is part of the job fingerprint unless it is off (full precision, the
    CPU default). `batch_size` is left out: at batch 1 and 4 on the CPU, all 32 CamVid val
    images tried gave byte-identical masks, raw and CRF (bench/batch_agreement.py); on a
    GPU, cuDNN may pick other kernels per batch size, which has not been measured. The
    others decide where and when work runs, never what it computes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard_size: int = Field(_default(SegmentConfig, "shard_size"), ge=1, description="images per shard: the unit of scheduling, retry and commit")
    batch_size: int = Field(_default(SegmentConfig, "batch_size"), ge=1, description="images per model forward pass (same-size images only); masks measured identical at 1 and 4 on the CPU")
    max_pixels: int = Field(_default(SegmentConfig, "max_pixels"), ge=1, description="larger images become error rows (decompression-bomb guard)")
    model_actors: int | None = Field(_default(SegmentConfig, "model_actors"), description="model actors; none: one per GPU, or one per core on a CPU-only cluster")
    crf_workers: int | None = Field(_default(SegmentConfig, "crf_workers"), description="concurrent CRF tasks; none: in the model actors on CPU-only clusters, one per free CPU with GPUs; 0: always in the model actors")
    max_shards_in_flight: int | None = Field(_default(SegmentConfig, "max_shards_in_flight"), description="bound on open shards (memory); none: 2 per model actor")
    max_shard_attempts: int = Field(_default(SegmentConfig, "max_shard_attempts"), ge=1, description="tries before a shard's images become error rows")
    device: Literal["auto", "cpu", "cuda"] = Field(_default(SegmentConfig, "device"), description="where the network runs; auto: cuda when Ray has GPUs")
    autocast: Literal["auto", "off", "bf16", "fp16"] = Field(_default(SegmentConfig, "autocast"), description="mixed precision of the network; auto: bf16 on GPU, off on CPU; part of the fingerprint unless off")
    channels_last: bool = Field(_default(SegmentConfig, "channels_last"), description="channels-last memory format on GPU")
    compile: bool = Field(_default(SegmentConfig, "compile"), description="torch.compile the network in each model actor")
    progress: bool = Field(False, description="tqdm bars; off in flows, whose logs are not a terminal")


class Refinement(BaseModel):
    """Which refinement kind runs after the network, and the parameters set explicitly.

    Each parameter given overrides only itself; the others are the checkpoint's tuned
    values for that kind, else the kind's defaults (segflow.models.crf).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(_default(SegmentConfig, "refinement"), description="a kind of `segflow models` (none, dense, ...)")
    params: dict[str, float | int | str] = Field(default_factory=dict, description="explicit parameters, e.g. {\"iterations\": 10}")


class Pairing(BaseModel):
    """How evaluation pairs each image with its label file (LabelPairing without the location)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_suffix: str = _default(LabelPairing, "image_suffix")
    label_suffix: str = _default(LabelPairing, "label_suffix")
    format: Literal["index", "palette", "rgb"] = _default(LabelPairing, "format")
    colors: tuple[tuple[tuple[int, int, int], int], ...] = Field(_default(LabelPairing, "colors"), description="rgb format: ((r, g, b), class) pairs")
    remap: tuple[tuple[int, int], ...] = Field(_default(LabelPairing, "remap"), description="(raw value, class) pairs; unmapped values are ignored")
    ignore_index: int | None = _default(LabelPairing, "ignore_index")
    boundary_tolerance: int = Field(_default(LabelPairing, "boundary_tolerance"), ge=0, description="pixels, for boundary F-score")
    trimap_width: int = Field(_default(LabelPairing, "trimap_width"), ge=1, description="pixels, for the trimap IoU band")


_EXECUTION_FIELDS = tuple(Execution.model_fields)
_PAIRING_FIELDS = tuple(Pairing.model_fields)
# Config fields that are flow parameters of their own, beside input/output/execution.
_TOP_LEVEL = ("model", "ray_address", "force", "prune", "retry_errors", "content_hash")

_storage_options: contextvars.ContextVar[dict | None] = contextvars.ContextVar("segflow_storage_options", default=None)


def segment_config(
    input: str,
    output: str,
    *,
    model: ModelRef,
    refinement: Refinement,
    ray_address: str | None,
    execution: Execution,
    force: bool,
    prune: bool,
    retry_errors: bool,
    content_hash: bool,
    labels: str | None = None,
    pairing: Pairing | None = None,
    storage_secret: str | None = None,
) -> SegmentConfig:
    """The job a flow run does. `labels` set makes it an evaluation."""
    evaluation = None
    if labels is not None:
        evaluation = LabelPairing(labels=labels, **(pairing or Pairing()).model_dump())
    return SegmentConfig(
        input=input,
        output=output,
        model=model,
        refinement=refinement.kind,
        crf_params=tuple(refinement.params.items()),
        ray_address=ray_address or None,
        force=force,
        prune=prune,
        retry_errors=retry_errors,
        content_hash=content_hash,
        evaluation=evaluation,
        storage_options=_resolve_storage_options(storage_secret),
        **execution.model_dump(),
    )


def flow_parameters(cfg: SegmentConfig) -> dict:
    """Inverse of `segment_config`: the flow parameters that rebuild `cfg`, credentials left out."""
    params = {"input": cfg.input, "output": cfg.output, **{name: getattr(cfg, name) for name in _TOP_LEVEL}}
    params["refinement"] = Refinement(kind=cfg.refinement, params=dict(cfg.crf_params))
    params["execution"] = Execution(**{name: getattr(cfg, name) for name in _EXECUTION_FIELDS})
    if cfg.evaluation is not None:
        params["labels"] = cfg.evaluation.labels
        params["pairing"] = Pairing(**{name: getattr(cfg.evaluation, name) for name in _PAIRING_FIELDS})
    return params


@contextlib.contextmanager
def storage_options_scope(storage_options: dict):
    """Hand credentials to flows called in this thread without making them parameters."""
    token = _storage_options.set(dict(storage_options) if storage_options else None)
    try:
        yield
    finally:
        _storage_options.reset(token)


def _resolve_storage_options(storage_secret: str | None) -> dict:
    in_process = _storage_options.get()
    if storage_secret is None:
        return dict(in_process or {})
    if in_process:
        raise ConfigError("storage options were given both in-process and as storage_secret; pass one")
    from prefect.blocks.system import Secret

    value = Secret.load(storage_secret).get()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Secret block {storage_secret!r} is not JSON storage options: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"Secret block {storage_secret!r} must hold a JSON object of fsspec storage options")
    return value


def run_name(kind: str):
    """A `flow_run_name` callable: "<kind>-<last segment of OUTPUT>", so runs are told apart in the UI.

    Only the last path segment is used, which keeps credentials embedded in a URL
    (user:password@host) out of the name.
    """

    def name() -> str:
        from prefect.runtime import flow_run

        output = str(flow_run.parameters.get("output") or "")
        tail = output.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit("@", 1)[-1]
        return f"{kind}-{tail}" if tail else kind

    return name
