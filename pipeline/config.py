"""Job configuration: one frozen object per job, defaults in one place.

The CLI, the Prefect flows and config files all build these same objects. What changes
the masks (the model and the CRF) is hashed into fingerprints that every output row
carries; what only changes how the work runs (actors, shard size, Ray address, storage
credentials) is not, so tuning the engine never invalidates results.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, get_args

from pydantic import Field

from segflow.errors import ConfigError
from segflow.fingerprint import digest  # noqa: F401  (re-exported)
from segflow.models.crf import DEFAULT_REFINEMENT, refinement_kind

TTAMode = Literal["none", "flip", "flip-scales"]  # segflow.models.tta's, without importing torch in the driver
TTA_MODES = get_args(TTAMode)
from segflow.models.crf.dense import CRFParams  # noqa: F401  (re-exported)

DEFAULT_SHARD_SIZE = 64
DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb limit, ~ a 7300x5500 photo


@dataclass(frozen=True)
class ModelRef:
    """Which model to run: a registry name, a checkpoint URL, torchvision weights, a seed.

    The model branch of a job's configuration tree (segflow.flows.parameters.JobSpec): each
    field's description is its `--flag`'s help and its Prefect form label, so it is written
    here once. All None means the bundled CamVid FCN-8s. `tta` averages the network's logits over
    mirrored (and rescaled) copies inside the model actor, before the refinement; it is part
    of the model fingerprint when it is not "none".
    """

    model: Annotated[str | None, Field(description="registry name (`segflow models`: fcn8s_resnet18, deeplabv3_resnet50, ...); none: the bundled CamVid FCN-8s")] = None
    checkpoint: Annotated[str | None, Field(description="checkpoint URL (local path, s3://...): safetensors with segflow metadata")] = None
    weights: Annotated[str | None, Field(description="torchvision weights for the registry model: DEFAULT, an enum name, or none")] = None
    num_classes: Annotated[int | None, Field(description="classes of an untrained registry model with weights none")] = None
    seed: Annotated[int, Field(description="seed of an untrained registry model's initialisation")] = 0
    tta: Annotated[TTAMode, Field(description="test-time augmentation, averaged in logit space before the CRF: flip (2 passes) or flip-scales (0.75/1/1.25, 6 passes)")] = "none"
    working_size: Annotated[int | Literal["full"] | None, Field(description=(
        "long side (px) the network and the CRF run at; larger images are resized, their masks come back at the image's size; "
        "none: the checkpoint's training scale, else 512; full: every pixel"))] = None
    tiles: Annotated[tuple[int, int] | None, Field(description=(
        "(size, stride): sliding-window inference over SIZE px tiles STRIDE px apart, logits averaged where they overlap; "
        "memory bounded by the tile; implies working size full unless given; none: the whole image at once"))] = None

    def __post_init__(self):
        if self.tta not in TTA_MODES:
            raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        from segflow.models.working_size import FULL, MIN_WORKING_SIZE

        if self.working_size is not None and self.working_size != FULL:
            if isinstance(self.working_size, bool) or not str(self.working_size).isdigit() or int(self.working_size) < MIN_WORKING_SIZE:
                raise ConfigError(f"--working-size must be {FULL} or a long side >= {MIN_WORKING_SIZE} px, got {self.working_size!r}")
            object.__setattr__(self, "working_size", int(self.working_size))
        if self.tiles is not None:
            size, stride = (int(v) for v in self.tiles)
            if size < MIN_WORKING_SIZE or not 0 < stride <= size:
                raise ConfigError(f"--tiles SIZE,STRIDE needs SIZE >= {MIN_WORKING_SIZE} and 0 < STRIDE <= SIZE, got {size},{stride}")
            object.__setattr__(self, "tiles", (size, stride))


@dataclass(frozen=True)
class LabelPairing:
    """How `evaluate` pairs images with ground-truth labels and decodes them.

    `format`: "index" (class-index PNG), "palette" (P-mode PNG whose indices are classes,
    VOC style) or "rgb" (colour-coded, decoded through `colors`). `remap` maps raw label
    values to classes (Cityscapes labelIds -> trainIds); unmapped values become ignore.
    """

    labels: str
    image_suffix: str = ""
    label_suffix: str = ""
    format: str = "index"
    colors: tuple[tuple[tuple[int, int, int], int], ...] = ()
    remap: tuple[tuple[int, int], ...] = ()
    ignore_index: int | None = None
    boundary_tolerance: int = 2
    trimap_width: int = 8


@dataclass(frozen=True)
class SegmentConfig:
    """Everything one `segment` (or `evaluate`) run needs."""

    input: str
    output: str
    model: ModelRef = field(default_factory=ModelRef)
    refinement: str = DEFAULT_REFINEMENT  # a kind in segflow.models.crf.REFINEMENTS; "none" skips it
    crf_params: tuple[tuple[str, float | int | str], ...] = ()  # explicit parameters; each overrides only itself
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    ray_address: str | None = None
    model_actors: int | None = None  # None: one per GPU, or one on a CPU-only cluster
    crf_workers: int | None = None  # None: in the model actors on CPU-only clusters, else one per free CPU; 0: in the model actors
    max_shards_in_flight: int | None = None
    max_shard_attempts: int = 3
    force: bool = False
    prune: bool = False
    retry_errors: bool = False
    content_hash: bool = False
    device: str = "auto"  # auto | cpu | cuda
    autocast: str = "auto"  # auto (bf16 on GPU) | off | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    evaluation: LabelPairing | None = None
    progress: bool = True
    storage_options: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.max_shard_attempts < 1:
            raise ConfigError(f"--max-shard-attempts must be >= 1, got {self.max_shard_attempts}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.autocast not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"--autocast must be auto, off, bf16 or fp16, got {self.autocast!r}")

        refinement_kind(self.refinement)  # a one-line error for an unknown kind, before any work
        object.__setattr__(self, "crf_params", tuple(sorted(dict(self.crf_params).items())))

    def with_(self, **changes) -> "SegmentConfig":
        return replace(self, **changes)
