"""Flags shared by the commands that run the engine, and their translation into SegmentConfig.

Every flag maps onto one field of `segflow.pipeline.config` objects; `config_from_args` is the
only place that translation happens, so the CLI, config files and flows agree.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from segflow.errors import UsageError
from segflow.pipeline.config import DEFAULT_MAX_PIXELS, DEFAULT_SHARD_SIZE, CRFParams, LabelPairing, ModelRef, SegmentConfig


def add_engine_args(p) -> None:
    """Model, CRF, engine and storage flags (segment, evaluate, reprocess)."""
    p.add_argument("--config", help="TOML or JSON file of option defaults (keys are flag names with underscores)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="registry name (fcn8s_resnet18, deeplabv3_resnet50, ...); default: the bundled CamVid FCN-8s")
    m.add_argument("--checkpoint", help="checkpoint URL (local path, s3://...): safetensors with segflow metadata")
    m.add_argument("--weights", help="torchvision weights for --model: DEFAULT, an enum name, or none")
    m.add_argument("--num-classes", type=int, help="classes of an untrained --model with --weights none")
    m.add_argument("--seed", type=int, default=0, help="seed for --weights none")
    c = p.add_argument_group("dense CRF (pydensecrf2)")
    c.add_argument("--no-crf", action="store_true", help="skip the CRF: masks are the model's argmax")
    defaults = CRFParams()
    for name, help_text in (
        ("iterations", "mean-field iterations"),
        ("gaussian_sxy", "smoothness kernel width, px"),
        ("gaussian_compat", "smoothness kernel weight"),
        ("bilateral_sxy", "appearance kernel spatial width, px"),
        ("bilateral_srgb", "appearance kernel colour width, intensity levels"),
        ("bilateral_compat", "appearance kernel weight"),
    ):
        kind = int if name == "iterations" else float
        c.add_argument(f"--crf-{name.replace('_', '-')}", dest=f"crf_{name}", type=kind, help=f"{help_text} (default {getattr(defaults, name)}, or the checkpoint's tuned value)")
    e = p.add_argument_group("engine")
    e.add_argument("--ray-address", help="existing Ray cluster: auto, ray://host:port (default: start a local Ray)")
    e.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard (unit of scheduling, retry, commit)")
    e.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same-size images only)")
    e.add_argument("--model-actors", type=int, help="model actors (default: one per GPU, or one on CPU)")
    e.add_argument("--crf-workers", type=int, help="concurrent CRF tasks (default: none on CPU-only clusters, where the model actors refine their own images; one per free CPU with GPUs; 0: always in the model actors)")
    e.add_argument("--max-shards-in-flight", type=int, help="bound on open shards (memory); default 2 per model actor")
    e.add_argument("--max-shard-attempts", type=int, default=3, help="tries before a shard's images become error rows")
    e.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit per image")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--autocast", choices=("auto", "off", "bf16", "fp16"), default="auto", help="GPU mixed precision (auto: bf16 on GPU)")
    e.add_argument("--compile", action="store_true", help="torch.compile the network in each model actor")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("incremental runs")
    r.add_argument("--force", action="store_true", help="reprocess every image, even up-to-date ones")
    r.add_argument("--prune", action="store_true", help="remove rows of images deleted from the source")
    r.add_argument("--retry-errors", action="store_true", help="try again images that have error rows")
    r.add_argument("--content-hash", action="store_true", help="detect changes by sha256 of the bytes, not size+etag/mtime")
    s = p.add_argument_group("storage")
    s.add_argument("--storage-options", help="JSON of fsspec options (e.g. endpoint, profile); prefer env vars for secrets")


def apply_config_file(parser, path: str) -> None:
    """Make a TOML/JSON file's values the parser's defaults; flags on the command line still win."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({exc})") from None
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})


def config_from_args(args, input: str, output: str, evaluation: LabelPairing | None = None) -> SegmentConfig:
    """Build the job's SegmentConfig from parsed flags."""
    crf = None
    if not args.no_crf:
        overrides = {name: getattr(args, f"crf_{name}") for name in CRFParams.__dataclass_fields__ if getattr(args, f"crf_{name}", None) is not None}
        crf = CRFParams(**{**CRFParams().__dict__, **overrides})
        crf_from_model = not overrides
    else:
        crf_from_model = False
    return SegmentConfig(
        input=input,
        output=output,
        model=ModelRef(args.model, args.checkpoint, args.weights, args.num_classes, args.seed),
        crf=crf,
        crf_from_model=crf_from_model,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        ray_address=args.ray_address,
        model_actors=args.model_actors,
        crf_workers=args.crf_workers,
        max_shards_in_flight=args.max_shards_in_flight,
        max_shard_attempts=args.max_shard_attempts,
        force=args.force,
        prune=args.prune,
        retry_errors=args.retry_errors,
        content_hash=args.content_hash,
        device=args.device,
        autocast=args.autocast,
        compile=args.compile,
        evaluation=evaluation,
        progress=not args.no_progress and sys.stderr.isatty(),
        storage_options=json_object("--storage-options", args.storage_options),
    )


def json_object(flag: str, text: str | dict | None) -> dict:
    """Parse a flag's JSON-object value ({} when absent); a bad one is a one-line UsageError.

    A --config file may give the value as a table (TOML) or object (JSON) instead of a string.
    """
    if not text:
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} must be a JSON object ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{{\"key\": 1}}'")
    return value
