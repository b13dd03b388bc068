"""The job's configuration tree (`JobSpec`) and the flows' parameters, which are its branches.

A job is one typed tree: input, output, `model` (the engine's `ModelRef`), `refinement`
(the CRF kind and its explicit parameters), `execution` (how the work runs; never changes a
mask), `incremental` (what a rerun redoes), `storage` (where credentials come from) and,
for an evaluation, `evaluation` (labels and their `Pairing`). The flows take the branches
as parameters, so Prefect's UI form is this tree; the command line generates its flags
from the same leaves (flows/commands/options.py). Defaults are read from the engine's
dataclasses, so a default changes in `pipeline/config.py` and nowhere else.

`JobSpec.to_config` builds the engine's flat `SegmentConfig`, and `flow_parameters` is its
inverse, used when the CLI already holds a config (`run_segment_flow`).
`tests/test_flows.py` round-trips a config whose every field differs from its default,
so a field added to `SegmentConfig` fails that test instead of being dropped silently.

Storage credentials never become flow parameters: Prefect stores every flow run's
parameters in its database and shows them in the UI. They come from the environment
(fsspec's own credential chain: AWS_* variables, ~/.aws, instance roles), from a
Prefect Secret block named by `storage.secret`, or, for an in-process call that
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

    ray_address: str | None = Field(_default(SegmentConfig, "ray_address"), description="existing Ray cluster to join: auto, ray://host:port; none starts a local Ray")
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


class Incremental(BaseModel):
    """What a run into an OUTPUT that already holds results redoes (the engine's plan)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    force: bool = Field(_default(SegmentConfig, "force"), description="reprocess every image, even up-to-date ones")
    prune: bool = Field(_default(SegmentConfig, "prune"), description="remove rows of images deleted from the source")
    retry_errors: bool = Field(_default(SegmentConfig, "retry_errors"), description="try again images that have error rows")
    content_hash: bool = Field(_default(SegmentConfig, "content_hash"), description="detect changes by sha256 of the bytes, not size+etag/mtime")


class Storage(BaseModel):
    """Where credentials for INPUT and OUTPUT come from; never the credentials themselves.

    Prefect stores every parameter in its database, so the storage options (keys, tokens)
    are not a field: they come from the environment (fsspec's own chain), from the Prefect
    Secret block named here, or from the in-process caller (`storage_options_scope`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret: str | None = Field(None, description="name of a Prefect Secret block holding JSON fsspec storage options")


class Evaluation(BaseModel):
    """Where the ground truth is and how it pairs with the images: set, the job is an evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: str = Field(description="folder or URL of ground-truth label images, paired with images by file stem")
    pairing: Pairing = Pairing()


class JobSpec(BaseModel):
    """One job, as a typed tree: input, output, model, refinement, execution, storage, evaluation.

    It is the configuration's single shape: the flows take its branches as parameters (so
    Prefect's form is this tree), the command line's flags are generated from its leaves
    (flows/commands/options.py), a `--config` file may spell it as nested tables, and the
    deployments and benches build their jobs through it. Defaults are the engine's
    (`SegmentConfig`, `ModelRef`), read once; `to_config` gives the engine its frozen,
    flat `SegmentConfig`, and `from_config` is its inverse.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(description="folder or URL of images (local path, file://, s3://, memory://, ...)")
    output: str = Field(description="where masks/, errors/ and the run manifest go")
    model: ModelRef = ModelRef()
    refinement: Refinement = Refinement()
    execution: Execution = Execution()
    incremental: Incremental = Incremental()
    storage: Storage = Storage()
    evaluation: Evaluation | None = None

    def to_config(self) -> SegmentConfig:
        """The engine's job. Storage options come from the Secret block or the in-process caller."""
        evaluation = None
        if self.evaluation is not None:
            evaluation = LabelPairing(labels=self.evaluation.labels, **self.evaluation.pairing.model_dump())
        return SegmentConfig(
            input=self.input,
            output=self.output,
            model=self.model,
            refinement=self.refinement.kind,
            crf_params=tuple(self.refinement.params.items()),
            evaluation=evaluation,
            storage_options=_resolve_storage_options(self.storage.secret),
            **self.execution.model_dump() | {"ray_address": self.execution.ray_address or None},
            **self.incremental.model_dump(),
        )

    @classmethod
    def from_config(cls, cfg: SegmentConfig) -> "JobSpec":
        """The tree that rebuilds `cfg`, credentials left out."""
        evaluation = None
        if cfg.evaluation is not None:
            evaluation = Evaluation(labels=cfg.evaluation.labels, pairing=Pairing(**{name: getattr(cfg.evaluation, name) for name in _PAIRING_FIELDS}))
        return cls(
            input=cfg.input,
            output=cfg.output,
            model=cfg.model,
            refinement=Refinement(kind=cfg.refinement, params=dict(cfg.crf_params)),
            execution=Execution(**{name: getattr(cfg, name) for name in _EXECUTION_FIELDS}),
            incremental=Incremental(**{name: getattr(cfg, name) for name in _INCREMENTAL_FIELDS}),
            evaluation=evaluation,
        )


_EXECUTION_FIELDS = tuple(Execution.model_fields)
_PAIRING_FIELDS = tuple(Pairing.model_fields)
_INCREMENTAL_FIELDS = tuple(Incremental.model_fields)
# The branches every flow takes as parameters, under the tree's own names.
FLOW_BRANCHES = ("model", "refinement", "execution", "incremental", "storage")

_storage_options: contextvars.ContextVar[dict | None] = contextvars.ContextVar("segflow_storage_options", default=None)


def flow_parameters(cfg: SegmentConfig) -> dict:
    """The flow parameters that rebuild `cfg` (the tree's branches), credentials left out.

    `input`/`output`, the branches, and for an evaluation `labels` and `pairing`.
    """
    spec = JobSpec.from_config(cfg)
    params = {"input": spec.input, "output": spec.output, **{name: getattr(spec, name) for name in FLOW_BRANCHES}}
    if spec.evaluation is not None:
        params["labels"] = spec.evaluation.labels
        params["pairing"] = spec.evaluation.pairing
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
