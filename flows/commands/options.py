"""Flags shared by the commands that run the engine, and their translation into SegmentConfig.

Every flag maps onto one field of `segflow.pipeline.config` objects; `config_from_args` is the
only place that translation happens, so the CLI, config files and flows agree.
"""

from __future__ import annotations

import difflib
import json
import sys
import tomllib
from pathlib import Path

from segflow.errors import UsageError
from segflow.flows.parameters import Execution
from segflow.pipeline.config import TTA_MODES, LabelPairing, ModelRef, SegmentConfig


def add_engine_args(p) -> None:
    """Model, CRF, engine and storage flags (segment, evaluate, reprocess)."""
    p.add_argument("--config", help="TOML or JSON file of option defaults (keys are flag names with underscores)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="registry name (fcn8s_resnet18, deeplabv3_resnet50, ...); default: the bundled CamVid FCN-8s")
    m.add_argument("--checkpoint", help="checkpoint URL (local path, s3://...): safetensors with segflow metadata")
    m.add_argument("--weights", help="torchvision weights for --model: DEFAULT, an enum name, or none")
    m.add_argument("--num-classes", type=int, help="classes of an untrained --model with --weights none")
    m.add_argument("--seed", type=int, default=0, help="seed for --weights none (default 0)")
    m.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation, averaged in logit space before the CRF: flip (2 passes) or flip-scales (0.75/1/1.25, 6 passes) (default none)")
    m.add_argument("--working-size", type=working_size_arg, default=None, metavar="PX|full",
                   help="long side (px) the network and the CRF run at; larger images are resized, their masks come back at the image's size "
                        "(default: the checkpoint's training scale, else 512; full: every pixel)")
    m.add_argument("--tiles", type=tiles_arg, default=None, metavar="SIZE,STRIDE",
                   help="sliding-window inference over SIZE px tiles STRIDE px apart, logits averaged where they overlap; memory bounded by the tile; "
                        "implies --working-size full unless given (default none: the whole image at once)")
    add_refinement_args(p)
    e = p.add_argument_group("engine")
    e.add_argument("--ray-address", help="existing Ray cluster: auto, ray://host:port (default: start a local Ray)")
    add_model_fields(e, Execution, skip=("channels_last", "progress"))
    e.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    r = p.add_argument_group("incremental runs")
    r.add_argument("--force", action="store_true", help="reprocess every image, even up-to-date ones")
    r.add_argument("--prune", action="store_true", help="remove rows of images deleted from the source")
    r.add_argument("--retry-errors", action="store_true", help="try again images that have error rows")
    r.add_argument("--content-hash", action="store_true", help="detect changes by sha256 of the bytes, not size+etag/mtime")
    s = p.add_argument_group("storage")
    s.add_argument("--storage-options", help="JSON of fsspec options (e.g. endpoint, profile); prefer env vars for secrets")


PARAMETER_HELP = {
    "iterations": "mean-field iterations",
    "gaussian_sxy": "smoothness kernel width, px",
    "gaussian_compat": "smoothness kernel weight",
    "bilateral_sxy": "appearance kernel spatial width, px",
    "bilateral_srgb": "appearance kernel colour width, intensity levels 0..255",
    "bilateral_compat": "appearance kernel weight",
    "backend": "mean-field message passing: lattice (fully connected, pydensecrf2's model) or window (ConvCRF's local window)",
    "window_size": "window backend: neighbours within this odd window, px at the downsampled resolution",
    "downsample": "window backend: messages computed at 1/N resolution",
}


def add_refinement_args(p) -> None:
    """--crf KIND and one --crf-<param> flag per parameter of any registered kind.

    The flags are generated from the kinds' parameter dataclasses (segflow.models.crf), so a
    new kind's parameters appear here without editing this file. A flag given overrides
    only its own parameter: the others keep the checkpoint's tuned values, else the kind's.
    """
    from dataclasses import fields

    from segflow.models.crf import DEFAULT_REFINEMENT, REFINEMENTS

    c = p.add_argument_group("refinement (CRF)")
    c.add_argument("--crf", dest="refinement", choices=tuple(REFINEMENTS), default=DEFAULT_REFINEMENT,
                   help=f"refinement kind (default {DEFAULT_REFINEMENT}): " + "; ".join(f"{k}: {v.summary}" for k, v in REFINEMENTS.items()))
    c.add_argument("--no-crf", dest="refinement", action="store_const", const="none", default=DEFAULT_REFINEMENT, help=f"the same as --crf none: masks are the model's argmax (default off, i.e. --crf {DEFAULT_REFINEMENT})")
    seen: dict[str, list[str]] = {}
    declared: dict[str, object] = {}
    for name, kind in REFINEMENTS.items():
        for f in fields(kind.params_type) if kind.params_type is not None else ():
            seen.setdefault(f.name, []).append(f"{name}: {f.default}")
            declared.setdefault(f.name, f)
    for pname, defaults in seen.items():
        f = declared[pname]
        kind_type = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}.get(str(f.type), str)
        what = PARAMETER_HELP.get(pname, pname.replace("_", " "))
        c.add_argument(f"--crf-{pname.replace('_', '-')}", dest=f"crf_{pname}", type=kind_type,
                       help=f"{what} (default: the checkpoint's tuned value, else {', '.join(defaults)})")


def refinement_overrides(args) -> dict:
    """The --crf-<param> flags the user gave, by parameter name."""
    prefix = "crf_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and k != "crf_workers" and v is not None}


def add_model_fields(group, model, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a pydantic model, with its description and its one default.

    The flows take the same models as parameters (Prefect's UI form), so the command line
    and the flow schema cannot drift: tests/test_config.py compares them.
    """
    import typing

    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        shown = "none" if info.default is None else info.default
        help_text = f"{info.description} (default {shown})"
        args = typing.get_args(info.annotation)
        if typing.get_origin(info.annotation) is typing.Literal:
            group.add_argument(flag, choices=args, default=info.default, help=help_text)
        elif info.annotation is bool:
            if info.default:
                raise TypeError(f"{model.__name__}.{name}: a flag for a bool that defaults to True needs a --no- form")
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = next((a for a in args if a is not type(None)), info.annotation)
            group.add_argument(flag, type=kind, default=info.default, help=help_text)


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
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a table of option names and values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    if values.pop("no_crf", False):
        values["refinement"] = "none"
    if "crf" in values:  # the flag's name; its destination is `refinement`
        values["refinement"] = values.pop("crf")
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")} | CONFIG_ONLY_KEYS
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--config {path}: unknown option {key!r}{hint}")
    parser.set_defaults(**values)


CONFIG_ONLY_KEYS = {"images", "labels", "output", "input"}  # positional arguments a config file may give by name


def config_from_args(args, input: str, output: str, evaluation: LabelPairing | None = None) -> SegmentConfig:
    """Build the job's SegmentConfig from parsed flags."""
    overrides = refinement_overrides(args) if args.refinement != "none" else {}
    return SegmentConfig(
        input=input,
        output=output,
        model=ModelRef(args.model, args.checkpoint, args.weights, args.num_classes, args.seed, args.tta, args.working_size, args.tiles),
        refinement=args.refinement,
        crf_params=tuple(overrides.items()),
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


def working_size_arg(text: str) -> int | str:
    """--working-size: "full" or a long side in pixels (ModelRef checks the range)."""
    return text if text == "full" else int(text)


def tiles_arg(text: str) -> tuple[int, int]:
    """--tiles SIZE,STRIDE -> (size, stride) (ModelRef checks the values)."""
    size, _, stride = text.partition(",")
    return int(size), int(stride or size)


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
